// dsv3 serve's page: chat (streamed through /v1/chat/completions), experts live (/web/experts), routing simulator
// (/web/simulate, the project's own router and bias update running in the server).
//
// Rules: everything the server sends (model output, error messages, numbers) reaches the page as text
// (textContent, append(string), canvas fillText), never as HTML; the only requests go to this page's own origin;
// the API key, when the server has one, lives in sessionStorage and goes out as "Authorization: Bearer KEY".
"use strict";

const KEY_STORE = "dsv3-api-key";
const POLL_STREAMING_MS = 300;  // expert and speed refreshes while a reply streams
const POLL_IDLE_MS = 2000;
const MODE_NAMES = { frozen: "frozen bias", aux_free: "aux-loss-free", aux_loss: "aux loss" };
const MODE_COLORS = { frozen: "#c0392b", aux_free: "#2f6fd0", aux_loss: "#2e8b57" };

const $ = (id) => document.getElementById(id);
const state = {
  info: null,          // /web/info
  needKey: false,      // the last protected request got 401
  streaming: false,    // a chat reply is streaming
  chatAbort: null,     // its AbortController
  history: [],         // [{role, content}] sent with each chat request
  experts: null,       // the last /web/experts answer
  refreshes: 0,        // expert heatmap redraws with new data
  lastGenerated: null, // [time ms, generated tokens] of the previous /health poll
  pollTimer: null,
  sim: null,           // the running or last simulation: {settings, steps, modes: {mode: {max_vio, load, bias}}}
  simAbort: null,
  simDrawQueued: false,
};

// ------------------------------------------------------------------------------------------------ helpers
function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showNotice(text) {
  const n = $("notice");
  n.textContent = text;
  n.hidden = !text;
}

// An error body of this server ({"error": {"message"}}) as text, else the status line.
async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && typeof body.error.message === "string") return body.error.message;
  } catch (e) { /* not JSON */ }
  return `HTTP ${resp.status} ${resp.statusText}`;
}

// Read a streamed response body to its end, calling onRecord with each piece of text between separators
// ("\n\n": server-sent events; "\n": one JSON object per line), in order, as they arrive.
async function readRecords(resp, separator, onRecord) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf(separator)) >= 0) {
      const record = buffer.slice(0, cut);
      buffer = buffer.slice(cut + separator.length);
      onRecord(record);
    }
  }
}

// GET a protected JSON route; null (with the notice set) on 401 or a failure.
async function getJSON(path) {
  let resp;
  try {
    resp = await fetch(path, { headers: headers(), cache: "no-store" });
  } catch (e) {
    showNotice(`the server cannot be reached (${e.message})`);
    return null;
  }
  if (resp.status === 401) {
    state.needKey = true;
    showNotice("This server needs an API key: enter it in the field above (it is kept for this tab only).");
    return null;
  }
  if (!resp.ok) {
    showNotice(`${path}: ${await errorText(resp)}`);
    return null;
  }
  state.needKey = false;
  return resp.json();
}

function fmt(x, digits) {
  return Number.isFinite(x) ? x.toFixed(digits) : "–";
}

// A canvas sized to its CSS width (and the given CSS height) at the device's pixel ratio; returns its 2D context
// in CSS pixels, and the width and height.
function fitCanvas(canvas, cssHeight) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(canvas.clientWidth, 50);
  canvas.style.height = cssHeight + "px";
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(cssHeight * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, cssHeight);
  return { ctx, width, height: cssHeight };
}

// Diverging colour [r, g, b] for t in [0, 1] (0 blue, 0.5 light grey, 1 red), like matplotlib's coolwarm.
function coolwarmRGB(t) {
  t = Number.isFinite(t) ? Math.min(Math.max(t, 0), 1) : 0.5;
  const lo = [59, 76, 192], mid = [221, 221, 221], hi = [180, 4, 38];
  const [a, b, u] = t < 0.5 ? [lo, mid, t / 0.5] : [mid, hi, (t - 0.5) / 0.5];
  return a.map((v, i) => Math.round(v + (b[i] - v) * u));
}

function coolwarm(t) {
  const c = coolwarmRGB(t);
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function drawLegend(canvas, left, mid, right, caption) {
  const { ctx, width } = fitCanvas(canvas, 34);
  const w = width - 20;
  for (let x = 0; x < w; x++) {
    ctx.fillStyle = coolwarm(x / (w - 1));
    ctx.fillRect(10 + x, 2, 1, 12);
  }
  ctx.fillStyle = "#5f6b7a";
  ctx.font = "11px system-ui, sans-serif";
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  ctx.fillText(left, 10, 17);
  ctx.textAlign = "center";
  ctx.fillText(mid + (caption ? "  " + caption : ""), 10 + w / 2, 17);
  ctx.textAlign = "right";
  ctx.fillText(right, 10 + w, 17);
}

// A heatmap of rows x columns: color(value) per cell, a label per row. Returns the geometry for hit-testing.
function drawHeatmap(canvas, rows, rowLabels, color, maxRowHeight) {
  const n = rows.length, e = n ? rows[0].length : 0;
  const labelW = 58;
  const rowH = Math.max(3, Math.min(maxRowHeight, Math.floor(420 / Math.max(n, 1))));
  const { ctx, width } = fitCanvas(canvas, Math.max(rowH * n + 16, 24));
  const cellW = e ? (width - labelW) / e : 0;
  ctx.font = "11px system-ui, sans-serif";
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < e; j++) {
      ctx.fillStyle = color(rows[i][j]);
      ctx.fillRect(labelW + j * cellW, i * rowH, Math.ceil(cellW), rowH);
    }
    if (rowH >= 9 || i % Math.ceil(9 / rowH) === 0) {
      ctx.fillStyle = "#5f6b7a";
      ctx.fillText(rowLabels[i], labelW - 6, i * rowH + rowH / 2);
    }
  }
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  ctx.fillStyle = "#5f6b7a";
  ctx.fillText("expert 0", labelW, n * rowH + 3);
  ctx.textAlign = "right";
  ctx.fillText(`expert ${e - 1}`, width, n * rowH + 3);
  return { labelW, rowH, cellW, n, e };
}

function cellAt(canvas, geom, event) {
  if (!geom) return null;
  const r = canvas.getBoundingClientRect();
  const x = event.clientX - r.left - geom.labelW, y = event.clientY - r.top;
  const i = Math.floor(y / geom.rowH), j = Math.floor(x / geom.cellW);
  return i >= 0 && i < geom.n && j >= 0 && j < geom.e ? [i, j] : null;
}

// ------------------------------------------------------------------------------------------------ views
function showView(name) {
  if (!["chat", "experts", "simulator"].includes(name)) name = "chat";
  for (const v of ["chat", "experts", "simulator"]) {
    $("view-" + v).hidden = v !== name;
    $("tab-" + v).setAttribute("aria-selected", String(v === name));
  }
  if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
  if (name === "experts") drawExperts();
  if (name === "simulator") drawSimulation();
}

// ------------------------------------------------------------------------------------------------ info
async function loadInfo() {
  const info = await getJSON("/web/info");
  if (!info) return;
  state.info = info;
  showNotice("");
  $("model-name").textContent = `${info.model} · context ${info.max_len} tokens · batch ${info.max_batch}` +
    (info.compiled ? " · compiled decode" : "");
  $("max-tokens").max = String(info.max_len - 1);
  $("spec-setting").textContent = info.speculative
    ? `on: the server drafts ${info.draft_tokens} token(s) per step with its MTP module (set at start: ` +
      "dsv3 serve --speculative mtp --draft-tokens K; the API has no per-request switch)"
    : "off on this server (start it with --speculative mtp to draft with the MTP module; the API has no " +
      "per-request switch)";
  const fields = info.simulator.fields;
  for (const input of document.querySelectorAll("#sim-form [data-field]")) {
    const f = fields[input.dataset.field];
    if (!f) continue;
    input.min = String(f.min);
    input.max = String(f.max);
    if (!input.dataset.touched) input.value = String(f.default);
  }
}

// ------------------------------------------------------------------------------------------------ polling
function schedulePoll(delay) {
  clearTimeout(state.pollTimer);
  state.pollTimer = setTimeout(poll, delay);
}

async function poll() {
  try {
    await pollHealth();
    if (!state.needKey) {
      if (!state.info) await loadInfo();
      const experts = state.info ? await getJSON("/web/experts") : null;
      if (experts) {
        const changed = !state.experts || experts.steps !== state.experts.steps || !experts.enabled;
        state.experts = experts;
        if (changed) {
          state.refreshes += 1;
          drawExperts();
        }
      }
    }
  } finally {
    schedulePoll(state.streaming ? POLL_STREAMING_MS : POLL_IDLE_MS);
  }
}

async function pollHealth() {
  let h;
  try {
    const resp = await fetch("/health", { cache: "no-store" });
    h = await resp.json();
  } catch (e) {
    return;
  }
  if (h.status !== "ok") {
    showNotice(`the server's engine is not running: ${h.message || h.status}`);
    return;
  }
  const now = performance.now();
  $("generated").textContent = String(h.generated_tokens);
  $("acceptance").textContent = state.info && !state.info.speculative ? "– (no speculation)"
    : `${fmt(100 * h.acceptance_rate, 1)} %`;
  if (state.lastGenerated) {
    const [t0, g0] = state.lastGenerated;
    const dt = (now - t0) / 1000;
    if (h.generated_tokens > g0 && dt > 0) {
      $("tokens-per-s").textContent = fmt((h.generated_tokens - g0) / dt, 1);
    } else if (!state.streaming && h.running === 0) {
      $("tokens-per-s").textContent = "– (idle)";
    }
  }
  state.lastGenerated = [now, h.generated_tokens];
}

// ------------------------------------------------------------------------------------------------ experts
let expertGeom = null, biasGeom = null;

function drawExperts() {
  const ex = state.experts;
  const heat = $("expert-heatmap"), mini = $("mini-heatmap");
  heat.dataset.refreshes = String(state.refreshes);
  mini.dataset.refreshes = String(state.refreshes);
  if (!ex) return;
  const labels = ex.layers.map((l) => `layer ${l}`);
  if (ex.enabled) {
    heat.dataset.steps = String(ex.steps);
    mini.dataset.steps = String(ex.steps);
    const e = ex.n_experts;
    // tokens each expert got, over an even share (tokens * top_k / E): 1 = balanced
    const even = ex.tokens * ex.top_k / e;
    const rel = ex.counts.map((row) => row.map((c) => (even > 0 ? c / even : 1)));
    const color = (v) => coolwarm(v / 2);
    if (!$("view-experts").hidden) expertGeom = drawHeatmap(heat, rel, labels, color, 28);
    if (!$("view-chat").hidden) drawHeatmap(mini, rel, labels.map((l) => l.replace("layer ", "L")), color, 14);
    const status = ex.steps === 0
      ? `No decode step yet: send a chat message and watch the counts fill (window: the last ${ex.window} steps).`
      : `The last ${ex.steps_in_window} decode steps (window ${ex.window}; ${ex.steps} in all): ${ex.tokens} ` +
        `token positions, each routed to ${ex.top_k} of ${e} experts in each of ${ex.layers.length} MoE layers.`;
    $("experts-status").textContent = status;
    $("mini-status").textContent = ex.steps === 0 ? "no decode step yet"
      : `last ${ex.steps_in_window} decode steps, ${ex.tokens} tokens (red: busy, blue: idle)`;
  } else {
    $("experts-status").textContent = "This server counts no expert statistics (started with --no-expert-stats); " +
      "only the routing biases are shown.";
    $("mini-status").textContent = "expert statistics are off on this server";
  }
  if (!$("view-experts").hidden) {
    const maxAbs = Math.max(0, ...ex.bias.flat().map(Math.abs));
    const scale = maxAbs > 0 ? maxAbs : 1;
    biasGeom = drawHeatmap($("bias-heatmap"), ex.bias, labels, (b) => coolwarm(0.5 + b / (2 * scale)), 28);
    drawLegend($("load-legend"), "0 (idle)", "1 = even share", "2+ × even share", "");
    drawLegend($("bias-legend"), maxAbs > 0 ? (-maxAbs).toPrecision(3) : "", "0", maxAbs > 0 ? maxAbs.toPrecision(3) : "",
      "");
    $("bias-status").textContent = maxAbs > 0
      ? "The biases the checkpoint's training left (serving does not move them); blue: made less attractive, red: more."
      : "Every bias is 0: this checkpoint's routers were never balanced (random weights, or trained without " +
        "aux-loss-free balancing).";
  }
}

function hoverExperts(event, which) {
  const ex = state.experts;
  if (!ex) return;
  const canvas = which === "load" ? $("expert-heatmap") : $("bias-heatmap");
  const cell = cellAt(canvas, which === "load" ? expertGeom : biasGeom, event);
  if (!cell) return;
  const [i, j] = cell;
  let text = `layer ${ex.layers[i]}, expert ${j}: bias ${ex.bias[i][j].toPrecision(4)}`;
  if (ex.enabled && ex.tokens > 0) {
    const c = ex.counts[i][j];
    text += `; ${c} of ${ex.tokens} tokens (${fmt(100 * c / ex.tokens, 1)} %, ` +
      `${fmt(c / (ex.tokens * ex.top_k / ex.n_experts), 2)} × an even share)`;
  }
  $("expert-hover").textContent = text;
}

// ------------------------------------------------------------------------------------------------ chat
function addMessage(role, text) {
  $("chat-empty").hidden = true;
  const el = document.createElement("div");
  el.className = "msg " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  const meta = document.createElement("div");
  meta.className = "meta";
  el.append(label, content, meta);
  $("messages").append(el);
  el.scrollIntoView({ block: "end" });
  return { el, content, meta };
}

function numberField(id, name, integer) {
  const input = $(id);
  const v = Number(input.value);
  if (input.value.trim() === "" || !Number.isFinite(v) || (integer && !Number.isInteger(v))) {
    throw new Error(`${name} must be ${integer ? "an integer" : "a number"}`);
  }
  return v;
}

async function sendChat(event) {
  event.preventDefault();
  if (state.streaming) return;
  const text = $("prompt").value;
  if (!text.trim()) return;
  let body;
  try {
    body = {
      messages: null, stream: true,
      temperature: numberField("temperature", "temperature", false),
      top_p: numberField("top-p", "top-p", false),
      max_tokens: numberField("max-tokens", "max tokens", true),
    };
  } catch (e) {
    showNotice(e.message);
    return;
  }
  showNotice("");
  $("prompt").value = "";
  state.history.push({ role: "user", content: text });
  body.messages = state.history.slice();
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.el.dataset.state = "streaming";
  const controller = new AbortController();
  state.chatAbort = controller;
  setStreaming(true);
  const t0 = performance.now();
  let received = "", finish = null, failure = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) {
      if (resp.status === 401) state.needKey = true;
      failure = await errorText(resp);
    } else {
      await readRecords(resp, "\n\n", (event) => {  // server-sent events
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) {
            failure = chunk.error.message;
            continue;
          }
          const choice = chunk.choices[0];
          const delta = choice.delta && choice.delta.content;
          if (delta) {
            received += delta;
            reply.content.append(delta);  // a text node: never parsed as HTML
            reply.el.scrollIntoView({ block: "end" });
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      });
    }
  } catch (e) {
    if (e.name !== "AbortError") failure = e.message;
    else finish = "stopped";
  } finally {
    state.chatAbort = null;
    setStreaming(false);
  }
  const seconds = (performance.now() - t0) / 1000;
  if (failure) {
    reply.el.dataset.state = "error";
    reply.meta.textContent = "error: " + failure;
    if (state.needKey) showNotice("This server needs an API key: enter it in the field above.");
  } else {
    reply.el.dataset.state = finish === "stopped" ? "stopped" : "done";
    reply.meta.textContent = `${finish || "ended"} · ${fmt(seconds, 1)} s`;
  }
  if (received) state.history.push({ role: "assistant", content: received });
  else state.history.pop();  // nothing came back: the turn is dropped, so the next one is not two user messages
}

function setStreaming(on) {
  state.streaming = on;
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("messages").dataset.streaming = String(on);
  if (on) schedulePoll(0);
}

function stopChat() {
  if (state.chatAbort) state.chatAbort.abort();
}

function clearChat() {
  stopChat();
  state.history = [];
  for (const el of [...$("messages").querySelectorAll(".msg")]) el.remove();
  $("chat-empty").hidden = false;
}

// ------------------------------------------------------------------------------------------------ simulator
function simQuery() {
  const params = new URLSearchParams();
  for (const input of document.querySelectorAll("#sim-form [data-field]")) {
    params.set(input.dataset.field, input.value.trim());
  }
  const modes = ["frozen", "aux_free", "aux_loss"].filter((m) => $("sim-mode-" + m).checked);
  params.set("modes", modes.join(","));
  return { params, modes };
}

function setSimStatus(text, st) {
  const s = $("sim-status");
  s.textContent = text;
  s.dataset.state = st;
}

async function runSimulation(event) {
  event.preventDefault();
  if (state.simAbort) state.simAbort.abort();
  const { params, modes } = simQuery();
  if (!modes.length) {
    setSimStatus("choose at least one mode", "idle");
    return;
  }
  const controller = new AbortController();
  state.simAbort = controller;
  const sim = { settings: null, steps: 0, total: Number(params.get("steps")), modes: {} };
  for (const m of modes) sim.modes[m] = { max_vio: [], load: [], bias: [] };
  state.sim = sim;
  if (!modes.includes($("sim-show").value)) $("sim-show").value = modes.includes("aux_free") ? "aux_free" : modes[0];
  $("sim-run").disabled = true;
  $("sim-stop").disabled = false;
  $("sim-summary").textContent = "";
  setSimStatus("starting…", "running");
  let failure = null, done = false;
  try {
    const resp = await fetch("/web/simulate?" + params.toString(), { headers: headers(), signal: controller.signal });
    if (!resp.ok) {
      failure = await errorText(resp);
    } else {
      await readRecords(resp, "\n", (line) => {  // one JSON object per line
        if (!line) return;
        const msg = JSON.parse(line);
        if (msg.error) failure = msg.error.message;
        else if (msg.settings) { sim.settings = msg.settings; sim.total = msg.settings.steps; }
        else if (msg.done) done = true;
        else {
          for (const [m, s] of Object.entries(msg.modes)) {
            const h = sim.modes[m];
            h.max_vio.push(s.max_vio);
            h.load.push(s.load);
            h.bias.push(s.bias);
          }
          sim.steps = msg.step;
          setSimStatus(`step ${sim.steps} of ${sim.total}`, "running");
          queueSimDraw();
        }
      });
    }
  } catch (e) {
    if (e.name !== "AbortError") failure = e.message;
  }
  if (state.simAbort === controller) {
    state.simAbort = null;
    $("sim-run").disabled = false;
    $("sim-stop").disabled = true;
  }
  if (state.sim !== sim) return;  // a newer run took over
  if (failure) setSimStatus("error: " + failure, "error");
  else if (done) setSimStatus(`done: ${sim.steps} steps`, "done");
  else setSimStatus(`stopped at step ${sim.steps}`, "stopped");
  drawSimulation();
}

function queueSimDraw() {
  if (state.simDrawQueued) return;
  state.simDrawQueued = true;
  requestAnimationFrame(() => {
    state.simDrawQueued = false;
    drawSimulation();
  });
}

// `dsv3 simulate-routing`'s line: "{mode:>9}: MaxVio {first:.3f} at step 1 -> {tail:.3f} (mean of the last 20 steps)"
function summaryLine(mode, vio) {
  const last = vio.slice(-20);
  const tail = last.reduce((a, b) => a + b, 0) / last.length;
  return { text: `${mode.padStart(9)}: MaxVio ${vio[0].toFixed(3)} at step 1 -> ${tail.toFixed(3)} ` +
    "(mean of the last 20 steps)", tail };
}

function drawSimulation() {
  const sim = state.sim;
  if (!sim || $("view-simulator").hidden) return;
  const summary = $("sim-summary");
  summary.textContent = "";
  for (const [m, h] of Object.entries(sim.modes)) {
    if (!h.max_vio.length) continue;
    const { text, tail } = summaryLine(m, h.max_vio);
    const line = document.createElement("div");
    line.className = "sim-line";
    line.dataset.mode = m;
    line.dataset.first = String(h.max_vio[0]);
    line.dataset.tail = String(tail);
    line.dataset.last = String(h.max_vio[h.max_vio.length - 1]);
    line.dataset.steps = String(h.max_vio.length);
    line.textContent = text;
    summary.append(line);
  }
  drawMaxVio(sim);
  const show = sim.modes[$("sim-show").value] ? $("sim-show").value : Object.keys(sim.modes)[0];
  $("sim-loads-caption").textContent = `load / mean per expert (rows) over steps: ${MODE_NAMES[show]}`;
  $("sim-bias-caption").textContent = `e_score_correction_bias per expert over steps: ${MODE_NAMES[show]}`;
  drawSimLoads(sim, sim.modes[show]);
  drawSimBias(sim, sim.modes[show]);
}

function axes(ctx, width, height, pad, xMax, yLabels) {
  ctx.strokeStyle = "#d7dde5";
  ctx.strokeRect(pad.l, pad.t, width - pad.l - pad.r, height - pad.t - pad.b);
  ctx.fillStyle = "#5f6b7a";
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const [y, label] of yLabels) ctx.fillText(label, pad.l - 4, y);
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  ctx.fillText("1", pad.l, height - pad.b + 3);
  ctx.fillText(`step ${xMax}`, width - pad.r - 20, height - pad.b + 3);
}

function drawMaxVio(sim) {
  const { ctx, width, height } = fitCanvas($("sim-maxvio"), 260);
  const pad = { l: 44, r: 8, t: 8, b: 36 };  // the legend goes under the x axis, clear of the curves
  const all = Object.values(sim.modes).flatMap((h) => h.max_vio);
  const lo = 0.01, hi = Math.max(4, ...all);
  const y = (v) => pad.t + (height - pad.t - pad.b) * (1 - (Math.log(Math.max(v, lo)) - Math.log(lo)) /
    (Math.log(hi) - Math.log(lo)));
  const x = (i) => pad.l + (width - pad.l - pad.r) * (sim.total > 1 ? i / (sim.total - 1) : 0);
  const ticks = [0.01, 0.1, 1, 10, 100].filter((t) => t <= hi).map((t) => [y(t), String(t)]);
  axes(ctx, width, height, pad, sim.total, ticks);
  let legendX = pad.l;
  for (const [m, h] of Object.entries(sim.modes)) {
    ctx.strokeStyle = MODE_COLORS[m];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    h.max_vio.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
    ctx.stroke();
    ctx.fillStyle = MODE_COLORS[m];
    ctx.fillRect(legendX, height - 10, 14, 3);
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    ctx.fillText(MODE_NAMES[m], legendX + 18, height - 8);
    legendX += 30 + ctx.measureText(MODE_NAMES[m]).width;
  }
}

function drawSimLoads(sim, h) {
  const { ctx, width, height } = fitCanvas($("sim-loads"), 260);
  const pad = { l: 44, r: 8, t: 8, b: 20 };
  if (!h || !h.load.length) return;
  const e = h.load[0].length, steps = h.load.length;
  // one pixel per (step, expert), scaled up without smoothing
  const img = new ImageData(sim.total, e);
  for (let s = 0; s < steps; s++) {
    const row = h.load[s];
    const mean = row.reduce((a, b) => a + b, 0) / e;
    for (let j = 0; j < e; j++) {
      const c = coolwarmRGB(mean > 0 ? row[j] / mean / 2 : 0.5);
      const k = 4 * (j * sim.total + s);
      img.data[k] = c[0]; img.data[k + 1] = c[1]; img.data[k + 2] = c[2]; img.data[k + 3] = 255;
    }
  }
  const off = document.createElement("canvas");
  off.width = sim.total;
  off.height = e;
  off.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, pad.l, pad.t, width - pad.l - pad.r, height - pad.t - pad.b);
  const rowH = (height - pad.t - pad.b) / e;
  axes(ctx, width, height, pad, sim.total, [[pad.t + rowH / 2, "e0"], [height - pad.b - rowH / 2, `e${e - 1}`]]);
}

function drawSimBias(sim, h) {
  const { ctx, width, height } = fitCanvas($("sim-bias"), 260);
  const pad = { l: 52, r: 8, t: 8, b: 20 };
  if (!h || !h.bias.length) return;
  const e = h.bias[0].length;
  const maxAbs = Math.max(1e-9, ...h.bias.flat().map(Math.abs));
  const y = (v) => pad.t + (height - pad.t - pad.b) * (0.5 - v / (2 * maxAbs));
  const x = (i) => pad.l + (width - pad.l - pad.r) * (sim.total > 1 ? i / (sim.total - 1) : 0);
  axes(ctx, width, height, pad, sim.total, [[y(maxAbs), maxAbs.toPrecision(2)], [y(0), "0"],
    [y(-maxAbs), (-maxAbs).toPrecision(2)]]);
  ctx.lineWidth = 0.8;
  for (let j = 0; j < e; j++) {
    ctx.strokeStyle = `hsl(${Math.round(360 * j / e)}, 60%, 45%)`;
    ctx.beginPath();
    h.bias.forEach((row, i) => (i ? ctx.lineTo(x(i), y(row[j])) : ctx.moveTo(x(i), y(row[j]))));
    ctx.stroke();
  }
}

// ------------------------------------------------------------------------------------------------ start
function start() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    $("api-key").dispatchEvent(new Event("change"));
  });
  $("api-key").addEventListener("change", () => {
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
    state.needKey = false;
    showNotice("");
    loadInfo().then(() => schedulePoll(0));
  });
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  }
  $("chat-form").addEventListener("submit", sendChat);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stopChat);
  $("clear").addEventListener("click", clearChat);
  $("sim-form").addEventListener("submit", runSimulation);
  $("sim-stop").addEventListener("click", () => state.simAbort && state.simAbort.abort());
  $("sim-show").addEventListener("change", drawSimulation);
  for (const input of document.querySelectorAll("#sim-form [data-field]")) {
    input.addEventListener("input", () => { input.dataset.touched = "1"; });
  }
  $("expert-heatmap").addEventListener("mousemove", (e) => hoverExperts(e, "load"));
  $("bias-heatmap").addEventListener("mousemove", (e) => hoverExperts(e, "bias"));
  window.addEventListener("resize", () => { drawExperts(); drawSimulation(); });
  window.addEventListener("hashchange", () => showView(location.hash.slice(1)));
  showView(location.hash.slice(1));
  document.body.dataset.ready = "1";
  loadInfo().then(() => schedulePoll(0));
}

document.addEventListener("DOMContentLoaded", start);
