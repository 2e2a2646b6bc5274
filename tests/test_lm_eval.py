"""lm-eval (EleutherAI's evaluation harness) on dsv3, both ways, held against the model itself:
- against `dsv3 serve`: `lm_eval --model local-completions` with lm-eval's remote tokenizer (the server's /tokenize),
  as a subprocess against a live server over the tiny trained model;
- in process: `dsv3 eval RUN --lm-eval TASKS` (`dsv3.infer.harness.Dsv3LM` through `lm_eval.simple_evaluate`).

Two local tasks, written into a temporary folder with their JSONL data (no network): multiple choice by
log-likelihood over the synthetic corpus' words, and a rolling perplexity task whose long document spans several
context windows. Every figure is recomputed from plain forwards over the token ids lm-eval builds (its
context/continuation split, its prefix token, its rolling windows): accuracy must be equal, every log-likelihood
and perplexity within 1e-4 (relative).
"""

import ast
import glob
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv3
from conftest import WORDS, live_server
from dsv3.cli import main
from dsv3.errors import Dsv3Error
from dsv3.infer import Engine
from dsv3.tokenizer import EOT, load_tokenizer

MC_TASK, PPL_TASK = "dsv3_words_mc", "dsv3_words_ppl"
REL = 1e-4  # relative tolerance of a log-likelihood or a perplexity (fp32 forwards, batched vs one by one)
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ------------------------------------------------------------------------------------------------ the tasks
def write_tasks(folder) -> tuple[list[dict], list[dict]]:
    """Two lm-eval task YAML files and their JSONL data in `folder`: (multiple-choice docs, perplexity docs)."""
    rng = random.Random(17)
    mc = []
    for _ in range(16):
        context = rng.choice(["KING", "LORD", "FOOL"]) + ".\n" + " ".join(rng.choice(WORDS)
                                                                         for _ in range(rng.randint(3, 8)))
        mc.append({"context": context, "choices": rng.sample(WORDS, 4), "gold": rng.randrange(4)})
    # two short texts and one of ~150 words (~500 tokens of this tokenizer): several windows of the 256-token context
    ppl = [{"text": " ".join(rng.choice(WORDS) for _ in range(n)) + "."} for n in (6, 17, 150)]
    for name, docs in (("mc", mc), ("ppl", ppl)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: {MC_TASK}\n" + head.format(json.dumps(str(folder / "mc.jsonl"))) +
        'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    (folder / "ppl.yaml").write_text(
        f"task: {PPL_TASK}\n" + head.format(json.dumps(str(folder / "ppl.jsonl"))) +
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return mc, ppl


# ------------------------------------------------------------------------------------------------ the reference
def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1]: log p(ids[i] | ids[:i]) for i >= 1, from one plain forward over ids[:-1] (no cache)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]), mtp=False).logits[0].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids  # what the server's /tokenize gives lm-eval


def choice_loglikelihood(model, tok, context: str, choice: str) -> float:
    """log p(" " + choice | context) with lm-eval's split: the continuation is what encoding context + continuation
    adds past the context's own ids."""
    ctx = encode(tok, context)
    cont = encode(tok, context + " " + choice)[len(ctx):]
    return float(token_logprobs(model, ctx + cont)[len(ctx) - 1:].sum())


def rolling_loglikelihood(model, ids: list[int], prefix: int, window: int) -> float:
    """log p(ids) in disjoint windows of `window` predicted tokens: the first reads the prefix token then its
    tokens; every later one reads the window + 1 tokens ending at its last token and scores only its own."""
    total = 0.0
    for start in range(0, len(ids), window):
        end = min(start + window, len(ids))
        seq = [prefix] + ids[:end] if start == 0 else ids[end - window - 1 : end]
        total += float(token_logprobs(model, seq)[-(end - start):].sum())
    return total


def mc_reference(model, tok, mc) -> dict:
    """Each choice's log-likelihood and the accuracy of their argmax, from the model directly."""
    lls = [[choice_loglikelihood(model, tok, d["context"], c) for c in d["choices"]] for d in mc]
    acc = sum(max(range(len(x)), key=x.__getitem__) == d["gold"] for x, d in zip(lls, mc)) / len(mc)
    return {"choice_lls": lls, "acc": acc}


def ppl_reference(model, tok, ppl, window: int) -> dict:
    """Each document's rolling log-likelihood and lm-eval's three perplexity figures, from the model directly."""
    prefix = tok.token_to_id(EOT)  # the tiny run's tokenizer names no BOS: lm-eval conditions on EOS
    docs = [rolling_loglikelihood(model, encode(tok, d["text"]), prefix, window) for d in ppl]
    total, words = sum(docs), sum(len(re.split(r"\s+", d["text"])) for d in ppl)
    n_bytes = sum(len(d["text"].encode()) for d in ppl)
    return {"doc_lls": docs, "word_perplexity": math.exp(-total / words),
            "byte_perplexity": math.exp(-total / n_bytes), "bits_per_byte": -total / n_bytes / math.log(2)}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def setup(trained_run, tmp_path_factory):
    """(run, checkpoint, model, tokenizer, task folder, mc docs, ppl docs)."""
    ckpt = dsv3.resolve_checkpoint(trained_run)
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    mc, ppl = write_tasks(folder)
    return trained_run, ckpt, dsv3.load_pretrained(ckpt).eval(), load_tokenizer(ckpt), folder, mc, ppl


def lm_eval_command(port: int, context: int, folder, out) -> list[str]:
    """`lm_eval --model local-completions` against a dsv3 server on `port`, with lm-eval's remote tokenizer."""
    model_args = (f"model=tiny,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=remote,"
                  f"tokenized_requests=True,max_length={context},num_concurrent=1,max_retries=1,auth_token=k")
    return [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
            "--tasks", f"{MC_TASK},{PPL_TASK}", "--include_path", str(folder), "--batch_size", "8",
            "--output_path", str(out), "--log_samples"]


@pytest.fixture(scope="module")
def served_results(setup, tmp_path_factory):
    """lm-eval's (results JSON, {task: samples}) from `lm_eval --model local-completions` against a live dsv3
    server of the tiny trained model (API key "k": lm-eval sends OPENAI_API_KEY to /v1, auth_token to /tokenize)."""
    from dsv3.infer.server import Server

    _, ckpt, model, tok, folder, _, _ = setup
    work = tmp_path_factory.mktemp("lm_eval_server")
    engine = Engine(model, tok, max_batch=8, prefill_chunk=64)  # max_len: the model's context
    env = {**os.environ, **OFFLINE, "HF_HOME": str(work / "hf"), "OPENAI_API_KEY": "k"}
    with live_server(Server(engine, tok, model_name="tiny", checkpoint=ckpt, api_key="k")) as port:
        cmd = lm_eval_command(port, model.config.max_position_embeddings, folder, work / "out")
        run = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    (results_file,) = glob.glob(str(work / "out" / "**" / "results_*.json"), recursive=True)
    samples = {}
    for task in (MC_TASK, PPL_TASK):
        (file,) = glob.glob(str(work / "out" / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        with open(file) as f:
            samples[task] = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    with open(results_file) as f:
        return json.load(f), samples


# ------------------------------------------------------------------------------------------------ the tests
@pytest.mark.slow
def test_lm_eval_against_the_server_matches_the_model(setup, served_results):
    """lm-eval's accuracy, every choice's log-likelihood, every document's rolling log-likelihood and the three
    perplexity figures equal the model's own, in lm-eval's windows for local-completions: max_length - 1 tokens
    per request (one kept for the generated token), so max_length - 2 predicted per rolling window."""
    _, _, model, tok, _, mc, ppl = setup
    context = model.config.max_position_embeddings
    results, samples = served_results
    ref = mc_reference(model, tok, mc) | ppl_reference(model, tok, ppl, window=context - 2)
    assert len(encode(tok, ppl[-1]["text"])) > context  # the long document really spans several windows
    assert ref["doc_lls"][-1] != pytest.approx(ppl_reference(model, tok, ppl[-1:], window=context)["doc_lls"][0],
                                               rel=REL)  # and another window size would show
    mc_result, ppl_result = results["results"][MC_TASK], results["results"][PPL_TASK]
    assert mc_result["sample_len"] == len(mc) and ppl_result["sample_len"] == len(ppl)
    assert mc_result["acc,none"] == ref["acc"]
    for sample, lls in zip(samples[MC_TASK], ref["choice_lls"]):
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(lls, rel=REL)
    for sample, ll in zip(samples[PPL_TASK], ref["doc_lls"]):
        assert float(sample["resps"][0][0]) == pytest.approx(ll, rel=REL)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ppl_result[f"{metric},none"] == pytest.approx(ref[metric], rel=REL), metric


@pytest.mark.slow
def test_dsv3_eval_lm_eval_matches_the_model_and_the_server(setup, served_results, capsys, monkeypatch):
    """`dsv3 eval RUN --lm-eval TASKS --lm-eval-include DIR` in process: lm-eval's "results" on stdout; accuracy
    equal to the model's own and to the server path's; rolling windows of the full context here (no token kept for
    generation), so the perplexities are the model's own for that window."""
    run, _, model, tok, folder, mc, ppl = setup
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    code = main(["eval", str(run), "--lm-eval", f"{MC_TASK},{PPL_TASK}", "--lm-eval-include", str(folder)])
    out, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads(out)
    ref = mc_reference(model, tok, mc) | ppl_reference(model, tok, ppl, window=model.config.max_position_embeddings)
    assert results[MC_TASK]["acc,none"] == ref["acc"] == served_results[0]["results"][MC_TASK]["acc,none"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert results[PPL_TASK][f"{metric},none"] == pytest.approx(ref[metric], rel=REL), metric


@pytest.mark.slow
def test_harness_scores_limits_and_generates(setup, monkeypatch):
    """`Dsv3LM` directly: `limit` takes the first documents, each choice's log-likelihood is the model's own;
    generate_until is the greedy continuation of a plain forward loop, cut before `until` or at max_gen_toks, with
    the context left-truncated to leave room for them; sampling and unknown tasks are refused by name."""
    from lm_eval.api.instance import Instance

    from dsv3.infer.harness import Dsv3LM, evaluate_tasks

    _, ckpt, model, tok, folder, mc, _ = setup
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    result = evaluate_tasks(model, tok, [MC_TASK], include=[folder], limit=5, checkpoint=ckpt, log_samples=True)
    assert result["results"][MC_TASK]["sample_len"] == 5
    ref = mc_reference(model, tok, mc[:5])
    assert result["results"][MC_TASK]["acc,none"] == ref["acc"]
    for sample, lls in zip(sorted(result["samples"][MC_TASK], key=lambda s: s["doc_id"]), ref["choice_lls"]):
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(lls, rel=REL)

    lm = Dsv3LM(model, tok, ckpt, max_length=64)
    long_context = " ".join(WORDS * 4)  # ~300 tokens: more than the 64 read here
    asks = [("KING.\nmy good lord", {"until": ["."], "max_gen_toks": 30}),
            ("LORD.\nsweet", {"until": ["\n\n"], "max_gen_toks": 5}),
            (long_context, {"until": ["zzz"], "max_gen_toks": 6})]
    texts = lm.generate_until([Instance("generate_until", {}, a, i) for i, a in enumerate(asks)])
    eot, full = tok.token_to_id(EOT), []
    for text, (context, kw) in zip(texts, asks):
        ids = encode(tok, context)[-(64 - kw["max_gen_toks"]):]
        out = []
        with torch.no_grad():
            while len(out) < kw["max_gen_toks"]:
                token = int(model(torch.tensor([ids + out]), mtp=False).logits[0, -1].argmax())
                if token == eot:
                    break
                out.append(token)
        full.append(tok.decode(out))
        expected = full[-1]
        for stop in kw["until"]:
            expected = expected.split(stop)[0]
        assert text == expected
    assert "." in full[0] and "." not in texts[0]  # the stop string was generated and cut off
    assert len(encode(tok, texts[1])) == 5  # max_gen_toks
    with pytest.raises(Dsv3Error, match="greedily"):
        lm.generate_until([Instance("generate_until", {}, ("KING", {"do_sample": True, "temperature": 1.0}), 0)])
    with pytest.raises(Dsv3Error, match="no_such_task_xyz"):  # looked for in lm-eval's own tasks too
        evaluate_tasks(model, tok, [MC_TASK, "no_such_task_xyz"], include=[folder])


def test_lm_eval_errors_name_the_culprit(trained_run, tmp_path, capsys, monkeypatch):
    """Without lm-eval, `dsv3 eval --lm-eval` names the extra that installs it (exit status 2, no traceback), and
    nothing else in dsv3 imports lm-eval; misplaced flags and a missing include folder are usage errors."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "dsv3.infer.harness", raising=False)
    code = main(["eval", str(trained_run), "--lm-eval", MC_TASK])
    _, err = capsys.readouterr()
    assert code == 2 and "pip install 'dsv3[eval]'" in err and "Traceback" not in err, err
    monkeypatch.undo()

    # only infer/harness.py imports lm_eval, and only cli's `_lm_eval` imports the harness (inside the function)
    src = Path(dsv3.__file__).parent
    for file in src.rglob("*.py"):
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "lm_eval" for n in names):
                assert file == src / "infer" / "harness.py", f"{file} imports lm_eval"
            if any(n.endswith("harness") for n in names):
                assert file == src / "cli.py" and node.col_offset > 0, f"{file}:{node.lineno} imports the harness"

    for argv, needle in ((["--limit", "3"], "--lm-eval"), (["--lm-eval", MC_TASK, "--passkey"], "--passkey"),
                         (["--lm-eval", MC_TASK, "--lm-eval-include", str(tmp_path / "none")], "none")):
        code = main(["eval", str(trained_run), *argv])
        _, err = capsys.readouterr()
        assert code == 2 and needle in err and "Traceback" not in err, err
