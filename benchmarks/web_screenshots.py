"""The README's pictures of the `dsv3 serve` page: docs/web-chat.png, docs/web-experts.png, docs/web-simulator.png.

Serves a checkpoint (or random `tiny` weights) the way `dsv3 serve` does (`dsv3.web.create_web_app`, expert
statistics on) on a loopback port, drives headless Chromium through Selenium (Debian's `chromium` and
`chromium-driver`, as in tests/test_web.py), sends one chat message and photographs the chat while it streams,
the experts view after it, and the routing simulator once a run with `dsv3 simulate-routing`'s defaults is done.
Each engine step is slowed by --step-delay so that the reply is caught mid-stream: the tokens/s in the chat picture
is not a speed measurement (benchmarks/decode_speed.py is).

    python benchmarks/web_screenshots.py [RUN_OR_CHECKPOINT] [--out docs] [--speculative] [--prompt "KING."]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

import dsv3
from dsv3.infer import Engine
from dsv3.infer.server import Server, serve_in_thread
from dsv3.web import create_web_app


def load(checkpoint: str | None):
    """(model, tokenizer, checkpoint dir or None, name)."""
    from dsv3.runs import resolve_checkpoint
    from dsv3.tokenizer import load_tokenizer, train_tokenizer

    if checkpoint:
        ckpt = resolve_checkpoint(checkpoint)
        return dsv3.load_pretrained(ckpt, dtype=torch.float32).eval(), load_tokenizer(ckpt), ckpt, Path(checkpoint).name
    words = "the king lord thou art my good sir what shall we do now love death night day sweet gentle".split()
    tok = train_tokenizer([" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(40)], 300)
    torch.manual_seed(0)
    return dsv3.DeepseekV3(dsv3.get_config("tiny").replace(vocab_size=tok.get_vocab_size())).eval(), tok, None, "tiny"


def browser() -> webdriver.Chrome:
    os.environ["SE_OFFLINE"] = "true"
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        raise SystemExit("needs Chromium and its driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="checkpoint or run (default: random tiny weights)")
    ap.add_argument("--out", default="docs", help="folder for the PNGs (default: docs)")
    ap.add_argument("--speculative", action="store_true", help="serve with MTP speculation (1 draft token)")
    ap.add_argument("--prompt", default="What say you, my lord?", help="one line (Enter sends it)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--step-delay", type=float, default=0.02,
                    help="seconds added to each engine step, so that the reply is caught mid-stream")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, ckpt, name = load(args.checkpoint)
    engine = Engine(model, tok, max_batch=4, max_len=min(model.config.max_position_embeddings, 512),
                    speculative=args.speculative, expert_stats=256)
    step = engine.step
    engine.step = lambda: (time.sleep(args.step_delay), step())
    server = Server(engine, tok, model_name=name, checkpoint=ckpt)
    d = browser()
    try:
        with serve_in_thread(server, app=create_web_app(server)) as port:
            wait = WebDriverWait(d, 600)
            d.get(f"http://127.0.0.1:{port}/#chat")
            wait.until(lambda d: d.find_element("id", "model-name").text != "")
            field = d.find_element("id", "max-tokens")
            field.clear()
            field.send_keys(str(args.max_tokens))
            d.find_element("id", "prompt").send_keys(args.prompt)
            d.find_element("id", "send").click()
            reply = ".msg.assistant .content"
            wait.until(lambda d: len(d.execute_script(f"return document.querySelector('{reply}').textContent"))
                       > args.max_tokens // 2)
            d.save_screenshot(str(out / "web-chat.png"))
            wait.until(lambda d: d.find_element("css selector", ".msg.assistant").get_attribute("data-state")
                       != "streaming")
            d.find_element("id", "tab-experts").click()
            time.sleep(2.5)  # one idle poll after the reply
            d.save_screenshot(str(out / "web-experts.png"))
            d.find_element("id", "tab-simulator").click()
            d.find_element("id", "sim-run").click()
            wait.until(lambda d: d.find_element("id", "sim-status").get_attribute("data-state") != "running")
            d.save_screenshot(str(out / "web-simulator.png"))
    finally:
        d.quit()
        server.runner.stop()
    for view in ("chat", "experts", "simulator"):
        print(out / f"web-{view}.png")


if __name__ == "__main__":
    main()
