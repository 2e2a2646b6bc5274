"""The `dsv3` command: every subcommand's --help and one real invocation each, the deprecated spellings, and usage
errors (`dsv3 CMD: error: ...`, exit status 2, no traceback).

Commands run in-process through `dsv3.cli.main` (fast: torch is imported once); `serve` runs as a subprocess on a
free loopback port. `dsv3 plot` is exercised in test_train.py (test_plot_writes_three_pngs_with_layer_names).
"""

import argparse
import dataclasses
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from safetensors import safe_open

import dsv3
from dsv3.cli import build_parser, main, serve_threads
from dsv3.config import get_config
from dsv3.cost import pipeline_bubbles, training_cost
from dsv3.infer import Engine, SamplingParams
from dsv3.params import count_parameters
from dsv3.runs import Run, resolve_checkpoint
from dsv3.tokenizer import ChatTemplate, ChatTemplateError, load_tokenizer, stop_token_ids
from dsv3.train.evaluate import evaluate
from dsv3.train.losses import IGNORE
from dsv3.train.sft import ConversationData
from dsv3.train.trainer import BALANCE_MODES, PP_SCHEDULES, PRECISIONS, TrainConfig

# the documented flags of each subcommand (what its --help must list); the test of each command is named beside it
FLAGS = {
    "params": ["--model-config"],  # test_params
    "data prepare": ["--out", "--overwrite", "--corpus", "--vocab-size", "--val-fraction", "--split-digits",
                     "--retrieval-docs", "--retrieval-words", "--retrieval-keys", "--copy-docs", "--tokenizer"],
    # test_data_prepare, test_data_prepare_with_a_given_tokenizer; test_context.py
    "data tasks": ["--task", "--out", "--overwrite", "--train", "--val", "--seed", "--size"],  # test_tasks.py
    "data retrieval": ["--out", "--overwrite", "--train", "--val", "--words", "--seed"],  # test_data_retrieval
    "train": ["--config", "--resume", "--overwrite", "--model-config", "--data", "--out", "--max-steps", "--minutes",
              "--batch-size", "--grad-accum", "--seq-len", "--lr", "--balance", "--precision", "--pp-schedule",
              "--keep-checkpoints", "--no-progress", "--objective", "--compile"],  # test_train_then_resume; --compile:
    # test_train.py
    "distill": ["--teacher", "--student", "--mode", "--data", "--out", "--samples", "--questions",
                "--sample-temperature", "--sample-max-tokens", "--kd-temperature", "--kd-alpha", "--max-steps",
                "--config", "--no-progress"],  # test_distill.py
    "grpo": ["--task", "--out", "--overwrite", "--steps", "--prompts", "--group", "--temperature", "--max-new-tokens",
             "--updates", "--lr", "--warmup-steps", "--clip-eps", "--beta", "--seed", "--no-progress", "--resume",
             "--checkpoint-every"],  # test_grpo.py
    "sft": ["--config", "--resume", "--overwrite", "--data", "--out", "--max-steps", "--batch-size", "--seq-len",
            "--no-progress"],  # test_sft.py
    "eval": ["--data", "--seq-len", "--max-tokens", "--device", "--precision", "--lm-eval", "--lm-eval-include",
             "--limit", "--task", "--task-examples", "--seed", "--max-new-tokens"],  # test_eval, ...; test_lm_eval.py,
    # test_task_eval.py
    "plot": ["--out", "--overwrite"],  # test_train.py::test_plot_writes_three_pngs_with_layer_names
    "simulate-routing": ["--out", "--experts", "--groups", "--topk-groups", "--top-k", "--steps", "--gamma", "--skew",
                         "--seed"],  # test_simulate_routing
    "convert": ["--out", "--overwrite", "--dtype", "--format"],  # test_convert_bf16; test_gguf.py
    "generate": ["--prompt", "--verbose", "--max-new-tokens", "--max-len", "--temperature", "--top-k", "--top-p",
                 "--seed", "--speculative", "--draft-tokens", "--draft-vocab", "--compile", "--stop", "--prefill-chunk",
                 "--prefill-share", "--prefix-cache-mb", "--device", "--precision"],  # test_generate, test_device_...
    "chat": ["--max-new-tokens", "--max-len", "--temperature", "--speculative", "--draft-tokens", "--draft-vocab",
             "--compile", "--stop", "--prefix-cache-mb", "--device", "--precision"],  # test_chat
    "serve": ["--host", "--port", "--max-batch", "--max-len", "--speculative", "--draft-tokens", "--draft-vocab",
              "--compile",
              "--model-name", "--max-queue", "--request-timeout", "--api-key", "--prefill-chunk", "--prefill-share",
              "--prefix-cache-mb", "--device", "--precision", "--expert-stats", "--expert-stats-window"],
    # test_serve; test_prefill.py, test_logprobs.py; test_web.py (the page, --expert-stats)
    "cost": ["--model-config", "--tokens", "--gpus", "--gpu", "--mfu", "--seq-len", "--price", "--pp",
             "--micro-batches"],  # test_cost
    "plan": ["--model-config", "--pp", "--dp", "--ep", "--zero", "--pp-schedule", "--optimizer-state-dtype", "--gpu",
             "--gpu-memory", "--ranks", "--serve-tokens", "--json", "--dry-run"],  # test_parallel
    "demo": ["--minutes", "--data", "--out", "--overwrite"],  # test_demo
    "runs upgrade": [],  # test_runs_upgrade_needs_an_old_run; the conversion itself: test_run_safety.py
}


def leaf_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every runnable subcommand ("data prepare" included) and its parser."""

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{prefix} {name}".strip())
                return
        yield prefix, parser

    return dict(walk(build_parser(), ""))


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `dsv3 ARGV` in-process: (exit status, stdout, stderr). argparse's own exits count as statuses."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich and argparse: no wrapped lines to match against


def assert_usage_error(code, err, command, *needles):
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") <= 5, err  # the usage (wrapped) and the error line
    assert f"dsv3 {command}: error:" in err, err
    for needle in needles:
        assert needle in err, err


# ------------------------------------------------------------------------------------------------ help
def test_every_subcommand_is_covered():
    assert set(leaf_parsers()) == set(FLAGS)


def test_top_level_help_lists_commands_and_scheme(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == 0
    for name in ("params", "data", "train", "eval", "plot", "simulate-routing", "convert", "generate", "chat",
                 "serve", "cost", "demo"):
        assert re.search(rf"^\s+{name}\s", out, re.M), name
    assert "--model-config NAME|PATH" in out and "exit status 2" in out


@pytest.mark.parametrize("command", list(FLAGS))
def test_help_lists_the_flags(capsys, command):
    code, out, err = cli(capsys, *command.split(), "--help")
    assert code == 0 and err == ""
    for flag in FLAGS[command]:
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", out), f"{command} --help lacks {flag}"
    parser = leaf_parsers()[command]
    options = {s for a in parser._actions for s in a.option_strings}
    assert ("--config" in options) == (command in ("train", "sft", "distill")), "--config is only the training TOML"
    assert "--preset" not in out and "legacy" not in out  # deprecated spellings are accepted, not advertised


def test_every_train_flag_explains_itself(capsys):
    parser = leaf_parsers()["train"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        words = re.sub(r"\(default: [^)]*\)", "", action.help or "")
        assert len(re.findall(r"[A-Za-z]{2,}", words)) >= 2, f"{action.option_strings}: {action.help!r}"
    _, out, _ = cli(capsys, "train", "--help")
    for flag, choices in (("--balance", BALANCE_MODES), ("--precision", PRECISIONS),
                          ("--pp-schedule", PP_SCHEDULES)):
        assert f"{flag} {{{','.join(choices)}}}" in out


def test_every_train_flag_parses_a_value_of_its_fields_type():
    """Each `dsv3 train` flag turns its text into the TrainConfig field's type, the fields that default to None
    included (--init-from, --teacher and --extend-context once failed with "invalid NoneType value")."""
    from dsv3.train.trainer import TrainConfig

    parser = leaf_parsers()["train"]
    samples = {"int": "3", "float": "2.5", "str": "some/path", "bool": None}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).split(" | ")[0]
        if f.name == "progress" or f.metadata["choices"]:
            continue  # --no-progress; closed sets are checked by --help above
        if kind == "bool":  # --compile / --no-compile, absent: the config's default
            assert getattr(parser.parse_args(["--data", "d", flag]), f.name) is True, flag
            assert getattr(parser.parse_args(["--data", "d", "--no-" + flag[2:]]), f.name) is False, flag
            assert getattr(parser.parse_args(["--data", "d"]), f.name) is None, flag
            continue
        value = getattr(parser.parse_args(["--data", "d", flag, samples[kind]]), f.name)
        assert value == {"int": int, "float": float, "str": str}[kind](samples[kind]), flag


# ------------------------------------------------------------------------------------------------ one run each
def test_params(capsys):
    code, out, err = cli(capsys, "params", "--model-config", "tiny")
    r = count_parameters(get_config("tiny"))
    assert code == 0 and err == ""
    assert f"main model: {r.total:,} parameters" in out and "KV cache per token" in out


def test_data_prepare(capsys, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"doc{i}.txt").write_text(f"the king {i} speaks to the lord and the fool.\n" * 40)
    code, out, _ = cli(capsys, "data", "prepare", src, "--out", tmp_path / "data", "--vocab-size", 280,
                       "--val-fraction", 0.25)
    assert code == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["vocab_size"] <= 280 and (tmp_path / "data" / "tokenizer.json").exists()
    for split in ("train", "val"):
        s = meta["splits"][split]
        assert f"{split}: {s['tokens']:,} tokens from {len(s['documents'])} document(s)" in out
    assert len(meta["splits"]["val"]["documents"]) == 1
    code, _, err = cli(capsys, "data", "prepare", src, "--corpus", "shakespeare", "--out", tmp_path / "x")
    assert_usage_error(code, err, "data prepare", "--corpus")
    code, out, err = cli(capsys, "data", "prepare", src, "--out", tmp_path / "r", "--vocab-size", 280,
                         "--retrieval-docs", 3, "--retrieval-words", "5,20", "--copy-docs", 4)
    assert code == 0, err
    train = json.loads((tmp_path / "r" / "meta.json").read_text())["splits"]["train"]["documents"]
    assert sum(d.startswith("retrieval-") for d in train) == 3 and sum(d.startswith("copy-") for d in train) == 4
    for bad in ("20,5", "5", "0,5"):
        code, _, err = cli(capsys, "data", "prepare", src, "--out", tmp_path / "y", "--retrieval-words", bad)
        assert_usage_error(code, err, "data prepare", "--retrieval-words")


def test_data_retrieval(capsys, tmp_path, trained_run):
    code, out, err = cli(capsys, "data", "retrieval", "--out", tmp_path / "r", "--train", 6, "--val", 2,
                         "--words", "10,30")
    assert code == 0, err
    assert "6 train and 2 held-out prompt-completion records" in out
    records = {s: [json.loads(x) for x in (tmp_path / "r" / f"{s}.jsonl").read_text().splitlines()]
               for s in ("train", "val")}
    assert [len(records["train"]), len(records["val"])] == [6, 2]
    for r in records["train"] + records["val"]:
        key = r["completion"].strip().rstrip(".")
        assert key.isdigit() and r["prompt"].count(key) == 1
    first = (tmp_path / "r" / "train.jsonl").read_bytes()
    code, _, err = cli(capsys, "data", "retrieval", "--out", tmp_path / "r", "--train", 6)
    assert code == 2 and "already exists" in err and (tmp_path / "r" / "train.jsonl").read_bytes() == first
    code, _, _ = cli(capsys, "data", "retrieval", "--out", tmp_path / "r2", "--train", 6, "--val", 2, "--words",
                     "10,30")
    assert code == 0 and (tmp_path / "r2" / "train.jsonl").read_bytes() == first  # reproducible from the seed
    code, _, err = cli(capsys, "data", "retrieval", "--out", tmp_path / "y", "--words", "30,10")
    assert_usage_error(code, err, "data retrieval", "--words")
    # `dsv3 sft` reads the records: the loss falls on the completion (number, full stop, newline) and EOT only
    data = ConversationData(tmp_path / "r", resolve_checkpoint(trained_run), seq_len=1024)
    tok = load_tokenizer(resolve_checkpoint(trained_run))
    ids, labels = data.conversations[0]
    learned = [y for y in labels if y != IGNORE]
    assert learned == tok.encode(records["train"][0]["completion"]).ids + [data.eot_id]
    # --text mixes plain-text records into train only; --max-tokens drops records `dsv3 sft` would find too long
    code, out, err = cli(capsys, "data", "retrieval", "--out", tmp_path / "t", "--train", 6, "--val", 2, "--words",
                         "10,60", "--text", 4, "--tokenizer", trained_run, "--max-tokens", 160)
    assert code == 0, err
    assert "6 train (and 4 text records) and 2 held-out" in out and "over 160 tokens dropped" in out
    mixed = {s: [json.loads(x) for x in (tmp_path / "t" / f"{s}.jsonl").read_text().splitlines()]
             for s in ("train", "val")}
    plain = [r for r in mixed["train"] if not r["completion"].strip().rstrip(".").isdigit()]
    assert len(mixed["train"]) == 10 and len(plain) == 4 and len(mixed["val"]) == 2
    assert all(r["completion"].startswith("\n") and r["completion"].count("\n") >= 2 for r in plain)
    meta = json.loads((tmp_path / "t" / "retrieval.json").read_text())
    assert meta["text"] == 4 and meta["max_tokens"] == 160 and sum(meta["dropped"].values()) > 0
    data = ConversationData(tmp_path / "t", resolve_checkpoint(trained_run), seq_len=160)  # takes every record
    assert len(data.conversations) == 10
    code, _, err = cli(capsys, "data", "retrieval", "--out", tmp_path / "u", "--max-tokens", 48)
    assert_usage_error(code, err, "data retrieval", "--tokenizer")
    code, out, err = cli(capsys, "data", "retrieval", "--out", tmp_path / "k", "--train", 3, "--val", 1, "--keys", 2)
    assert code == 0 and "2 numbers each" in out, err
    first = json.loads((tmp_path / "k" / "train.jsonl").read_text().splitlines()[0])
    assert len(re.findall(r" is \d{5}\.", first["prompt"])) == 2
    assert json.loads((tmp_path / "k" / "retrieval.json").read_text())["keys"] == 2
    code, _, err = cli(capsys, "data", "retrieval", "--out", tmp_path / "k", "--overwrite", "--keys", 9)
    assert_usage_error(code, err, "data retrieval", "--keys 9")
    assert (tmp_path / "k" / "train.jsonl").read_text().count("\n") == 3  # refused before the old one was moved
    code, _, err = cli(capsys, "data", "retrieval", "--out", tmp_path / "v", "--words", "200,300", "--train", 5,
                       "--tokenizer", trained_run, "--max-tokens", 48)
    assert code != 0 and "--max-tokens 48: most train records" in err and not (tmp_path / "v" / "train.jsonl").exists()


def test_data_prepare_with_a_given_tokenizer(capsys, tmp_path, trained_run):
    """--tokenizer encodes new data with a checkpoint's tokenizer (here a run's: its latest checkpoint's), which
    `dsv3 train --init-from` then accepts; a missing one, or one with a new tokenizer's flags, is named."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"doc{i}.txt").write_text(f"what shall we do now, sweet lord {i}? hence away.\n" * 30)
    code, _, err = cli(capsys, "data", "prepare", src, "--out", tmp_path / "more", "--tokenizer", trained_run)
    assert code == 0, err
    ckpt_tokenizer = (resolve_checkpoint(trained_run) / "tokenizer.json").read_bytes()
    assert (tmp_path / "more" / "tokenizer.json").read_bytes() == ckpt_tokenizer
    tok = load_tokenizer(tmp_path / "more")
    ids = np.fromfile(tmp_path / "more" / "train.bin", dtype=np.uint16)
    assert tok.decode(ids[1:40].tolist()).startswith("what shall we do now, sweet lord")
    code, _, err = cli(capsys, "train", "--model-config", "tiny", "--data", tmp_path / "more", "--out",
                       tmp_path / "cont", "--init-from", trained_run, "--max-steps", 1, "--seq-len", 16,
                       "--batch-size", 2, "--no-progress")
    assert code == 0, err
    code, _, err = cli(capsys, "data", "prepare", src, "--out", tmp_path / "x", "--tokenizer", tmp_path / "nothing")
    assert code != 0 and "--tokenizer" in err and "nothing" in err and "Traceback" not in err
    code, _, err = cli(capsys, "data", "prepare", src, "--out", tmp_path / "x", "--tokenizer", trained_run,
                       "--vocab-size", 300)
    assert_usage_error(code, err, "data prepare", "--tokenizer")
    code, _, err = cli(capsys, "data", "prepare", src, "--out", tmp_path / "more", "--tokenizer", tmp_path / "more",
                       "--overwrite")  # would move its own tokenizer aside first
    assert_usage_error(code, err, "data prepare", "--tokenizer")
    code, _, err = cli(capsys, "data", "prepare", src, "--out", tmp_path / "again", "--tokenizer", tmp_path / "more",
                       "--retrieval-docs", 2, "--retrieval-keys", 3, "--retrieval-words", "5,20")
    assert code == 0, err  # a dataset directory's tokenizer, copied byte for byte
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == ckpt_tokenizer
    for bad in (["--retrieval-keys", 9, "--retrieval-docs", 2], ["--retrieval-keys", 2]):
        code, _, err = cli(capsys, "data", "prepare", src, "--out", tmp_path / "y", *bad)
        assert_usage_error(code, err, "data prepare", "--retrieval-keys")


def test_train_then_resume(capsys, dataset, tmp_path):
    run = tmp_path / "run"
    toml = tmp_path / "train.toml"
    toml.write_text(f'[train]\nmodel_config = "tiny"\ndata = "{dataset}"\nseq_len = 16\nbatch_size = 2\n'
                    "max_steps = 5\nwarmup_steps = 1\n")
    code, out, err = cli(capsys, "train", "--config", toml, "--out", run, "--max-steps", 2, "--checkpoint-every", 1,
                         "--keep-checkpoints", 5, "--no-progress")
    assert code == 0, err
    assert re.search(r"^step 2: loss \d+\.\d{4}, .* tokens/s, MaxVio \d\.\d{3}; checkpoints in ", out, re.M), out
    saved = json.loads(Run(run).config_file.read_text())
    assert (saved["model_config"], saved["seq_len"], saved["max_steps"], saved["progress"]) == ("tiny", 16, 2, False)
    assert [p.name for p in Run(run).checkpoints()] == ["step-00000001", "step-00000002"]

    code, out, err = cli(capsys, "train", "--resume", run, "--max-steps", 3, "--no-progress")
    assert code == 0, err
    assert f"resuming {run} at step 2" in out and "step 3: loss" in out
    assert Run(run).latest_checkpoint().name == "step-00000003"
    code, out, _ = cli(capsys, "train", "--resume", run, "--max-steps", 3, "--no-progress")
    assert code == 0 and f"nothing to do: {run} is already at step 3 of 3" in out

    code, _, err = cli(capsys, "train", "--resume", run, "--config", toml)
    assert_usage_error(code, err, "train", "--config")


def test_resume_refuses_another_model_config(capsys, trained_run):
    code, _, err = cli(capsys, "train", "--resume", trained_run, "--model-config", "small")
    assert_usage_error(code, err, "train", "model_config")


def test_eval(capsys, trained_run, dataset):
    code, out, err = cli(capsys, "eval", trained_run, "--max-tokens", 100)
    assert code == 0, err
    r = json.loads(out)
    assert r["checkpoint"] == str(resolve_checkpoint(trained_run))
    assert r["data"] == str(dataset)  # recorded by the run, not given
    assert r["tokens"] == 100 and r["perplexity"] == pytest.approx(math.exp(r["loss"])) and 0 < r["bpb"]
    code, _, err = cli(capsys, "eval", trained_run.parent / "no-such-run")
    assert_usage_error(code, err, "eval", "no-such-run")


def test_simulate_routing(capsys, tmp_path):
    png = tmp_path / "sim.png"
    code, out, _ = cli(capsys, "simulate-routing", "--out", png, "--experts", 8, "--groups", 2, "--topk-groups", 1,
                       "--top-k", 2, "--steps", 30)
    assert code == 0
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for mode in ("frozen", "aux_free"):
        assert re.search(rf"^\s*{mode}: MaxVio \d+\.\d{{3}} at step 1 -> \d+\.\d{{3}}", out, re.M), out


def test_convert_bf16(capsys, trained_run, tmp_path):
    dst = tmp_path / "bf16"
    code, out, err = cli(capsys, "convert", trained_run, "--out", dst, "--dtype", "bf16")
    assert code == 0, err
    assert out.startswith(f"wrote {dst} (bf16, ")
    assert (dst / "tokenizer.json").exists()
    src = dsv3.load_pretrained(resolve_checkpoint(trained_run))
    with safe_open(next(dst.glob("*.safetensors")), "pt") as f:
        w = f.get_tensor("model.embed_tokens.weight")
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w, src.model.embed_tokens.weight.to(torch.bfloat16), atol=0, rtol=0)
    code, _, err = cli(capsys, "convert", trained_run, "--dtype", "bf16")
    assert_usage_error(code, err, "convert", "--out")


def _greedy(ckpt, ids, max_new, stops=()):
    tok = load_tokenizer(ckpt)
    engine = Engine(dsv3.load_pretrained(ckpt).eval(), tok, max_batch=1)
    params = SamplingParams(max_new_tokens=max_new, temperature=0, stop_ids=stop_token_ids(tok, ckpt),
                            stop_strings=stops)
    return engine.generate([ids], params)[0]


def test_generate(capsys, trained_run):
    ckpt = resolve_checkpoint(trained_run)
    expected = _greedy(ckpt, load_tokenizer(ckpt).encode("KING.\n").ids, 12)
    code, out, err = cli(capsys, "generate", trained_run, "--prompt", "KING.\n", "--max-new-tokens", 12,
                         "--temperature", 0, "--speculative", "mtp", "--draft-tokens", 2, "-v")
    assert code == 0, err
    assert out == expected.text + "\n"  # greedy: MTP drafting changes the speed, never the text
    assert f"{len(expected.output)} tokens in " in err and "MTP acceptance" in err
    code, out, err = cli(capsys, "generate", trained_run, "--prompt", "KING.\n", "--max-new-tokens", 12,
                         "--temperature", 0, "--speculative", "mtp", "--draft-vocab", 64, "-v")
    assert code == 0 and out == expected.text + "\n", err  # drafts from 64 tokens: the same text
    assert "MTP drafts over 65 of" in err  # (the 64 and the end-of-text token)
    code, _, err = cli(capsys, "generate", trained_run, "--prompt", "x", "--draft-vocab", 64)
    assert code == 2 and "--speculative mtp" in err
    code, out, err = cli(capsys, "generate", trained_run, "--prompt", "KING.\n", "--max-new-tokens", 12,
                         "--temperature", 0, "--max-len", 64, "--compile", "-v")
    assert code == 0, err
    assert out == expected.text + "\n" and "compiling took" in err
    code, _, err = cli(capsys, "generate", trained_run, "--prompt", "x", "--max-new-tokens", 0)
    assert code == 2 and "--max-new-tokens" in err


def test_device_and_precision(capsys, trained_run):
    """--precision bf16 generates (the engine's cache and head in bf16); a device that is not here, or not a
    device, is a usage error naming the flag."""
    code, out, err = cli(capsys, "generate", trained_run, "--prompt", "KING.\n", "--max-new-tokens", 6,
                         "--temperature", 0, "--precision", "bf16", "-v")
    assert code == 0 and out.strip(), err
    code, _, err = cli(capsys, "eval", trained_run, "--max-tokens", 256, "--precision", "bf16")
    assert code == 0, err
    for device in (["cuda:7"] if torch.cuda.is_available() else ["cuda"]) + ["tpu", "nonsense"]:
        code, _, err = cli(capsys, "generate", trained_run, "--prompt", "x", "--device", device)
        assert_usage_error(code, err, "generate", f"--device {device}")


def test_chat(capsys, monkeypatch, trained_run):
    lines = iter(["speak, good lord", "what say you"])
    prompts = []

    def fake_input(prompt):
        prompts.append(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    code, out, err = cli(capsys, "chat", trained_run, "--max-new-tokens", 8, "--temperature", 0)
    assert code == 0, err
    assert prompts == ["you> "] * 3 and "dsv3 chat:" in err
    replies = out.split("model> ")[1:]
    assert len(replies) == 2
    ckpt = resolve_checkpoint(trained_run)
    template = ChatTemplate(ckpt)
    ids = template.encode(load_tokenizer(ckpt), [{"role": "user", "content": "speak, good lord"}],
                          sanitize_control_tokens=True)
    assert replies[0] == _greedy(ckpt, ids, 8, template.default_stops).text + "\n"


def test_chat_drops_a_message_the_template_refuses(capsys, monkeypatch, trained_run):
    """A ChatTemplateError (a template's raise_exception, a sandbox refusal) drops that message, says why, and the
    chat goes on with the history it had."""
    lines = iter(["speak, good lord", "refuse me", "what say you"])

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    seen = []
    encode = ChatTemplate.encode

    def strict_encode(self, tokenizer, messages, *a, **kw):
        seen.append([m["content"] for m in messages])
        if any(m["content"] == "refuse me" for m in messages):
            raise ChatTemplateError("this template refuses 'refuse me'")
        return encode(self, tokenizer, messages, *a, **kw)

    monkeypatch.setattr(ChatTemplate, "encode", strict_encode)
    code, out, err = cli(capsys, "chat", trained_run, "--max-new-tokens", 4, "--temperature", 0)
    assert code == 0, err
    assert "refused this message, so it was dropped: this template refuses 'refuse me'" in err
    assert len(out.split("model> ")[1:]) == 2  # the two accepted turns were answered
    assert seen[-1][0] == "speak, good lord" and "refuse me" not in seen[-1] and seen[-1][-1] == "what say you"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve(trained_run, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", str(trained_run), "--port", str(port),
                                 "--max-len", "128", "--model-name", "cli-test", "--no-compile", "--threads", "1"],
                                stdout=stderr, stderr=stderr)
    try:
        deadline = time.monotonic() + 120  # importing torch on a loaded machine is the slow part
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up:\n" + log.read_text()
                time.sleep(0.2)
        body = json.dumps({"model": "cli-test", "prompt": "KING.\n", "max_tokens": 5, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.loads(r.read())
        assert reply["model"] == "cli-test" and 0 < reply["usage"]["completion_tokens"] <= 5
        assert isinstance(reply["choices"][0]["text"], str)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert f"as model 'cli-test' on {url}/v1" in log.read_text()
    assert "CPU threads for the model's kernels: 1 (--threads)" in log.read_text()


def test_serve_threads_leave_a_core_to_the_http_side():
    """--threads wins; else $OMP_NUM_THREADS (torch's own setting, None); else every core but one, at least one."""
    assert serve_threads(3, {"OMP_NUM_THREADS": "2"}, 8) == 3
    assert serve_threads(None, {"OMP_NUM_THREADS": "2"}, 8) is None
    assert serve_threads(None, {"OMP_NUM_THREADS": ""}, 8) == 7
    assert serve_threads(None, {}, 2) == 1 and serve_threads(None, {}, 1) == 1


def test_cost(capsys):
    code, out, err = cli(capsys, "cost", "--model-config", "deepseek-v3-671b", "--tokens", "14.8T", "--gpus", 2048,
                         "--pp", 8, "--micro-batches", 16)
    assert code == 0, err
    est = training_cost(get_config("deepseek-v3-671b"), 14.8e12, 2048, "h800", 0.4, 4096, 2.0)
    assert f"{est.gpu_hours / 1e6:.3f}M H800 GPU-hours at 40% MFU" in out
    assert f"{est.wall_days:.1f} days on 2048 GPUs" in out
    assert "pipeline bubble, PP=8, 16 micro-batches" in out
    for sched, b in pipeline_bubbles(8, 16).items():  # one table row each: schedule, bubble, share of step
        share = f"{b['fraction']:.1%}"
        row = rf"{re.escape(sched)}\W+{b['bubble']:.1f}\W+{re.escape(share)}"
        assert re.search(row, out), row


def test_demo(capsys, monkeypatch, dataset, tmp_path):
    """The whole demo (train, eval, plots, sample) with --minutes 0.05 on the test corpus, made fast by two patches:
    the `small` preset it asks for is swapped for `tiny` (batch 2 x 32 tokens); it evaluates 320 held-out tokens and
    samples 16, not all and 200. (Unpatched, one small-preset step, the evaluation and 200 decoded tokens take
    minutes on a busy 2-core machine.)"""
    import dsv3.demo

    asked = []

    def tiny_config(**settings):
        asked.append(settings)
        return TrainConfig(**{**settings, "model_config": "tiny", "batch_size": 2, "seq_len": 32})

    evaluated = []

    def recording_evaluate(*args, **kwargs):  # and on the first 320 held-out tokens only
        evaluated.append((args[1], evaluate(*args, **{**kwargs, "max_tokens": 320})))
        return evaluated[-1][1]

    sample = dsv3.demo.sample_text
    monkeypatch.setattr(dsv3.demo, "TrainConfig", tiny_config)
    monkeypatch.setattr(dsv3.demo, "evaluate", recording_evaluate)
    monkeypatch.setattr(dsv3.demo, "sample_text", lambda *a, **kw: sample(*a, **{**kw, "max_new_tokens": 16}))
    run = tmp_path / "demo"
    code, out, err = cli(capsys, "demo", "--minutes", 0.05, "--data", dataset, "--out", run)
    assert code == 0, err
    assert [(s["model_config"], s["minutes"], s["data"], s["out"]) for s in asked] == [
        ("small", 0.05, str(dataset), str(run))]
    ckpt = Run(run).latest_checkpoint()
    [(data, result)] = evaluated
    assert str(data) == str(dataset) and result["split"] == "val" and result["tokens"] == 320
    assert f"bits-per-byte {result['bpb']:.3f}" in out and re.search(rf"checkpoint\s+{re.escape(str(ckpt))}", out)
    assert f"1/5 data: using {dataset}" in out and "HAMLET." in out
    assert sorted(p.name for p in Run(run).plots_dir.glob("*.png")) == ["expert_bias.png", "expert_load.png",
                                                                        "loss.png"]


# ------------------------------------------------------------------------------------------------ old spellings
WARNING = re.compile(r"^dsv3: warning: .* is deprecated; use .*\n$")


def test_positional_model_config_warns_and_works(capsys):
    code, old, err = cli(capsys, "params", "tiny")
    assert code == 0 and WARNING.match(err) and "--model-config tiny" in err
    assert old == cli(capsys, "params", "--model-config", "tiny")[1]
    code, _, err = cli(capsys, "cost", "tiny", "--tokens", "1B")
    assert code == 0 and WARNING.match(err)
    code, _, err = cli(capsys, "params", "tiny", "--model-config", "tiny")
    assert_usage_error(code, err, "params", "once")
    code, _, err = cli(capsys, "params")
    assert_usage_error(code, err, "params", "--model-config")


def test_train_preset_warns_and_works(capsys, dataset, tmp_path):
    code, out, err = cli(capsys, "train", "--preset", "tiny", "--data", dataset, "--out", tmp_path / "run",
                         "--max-steps", 1, "--batch-size", 2, "--seq-len", 16, "--no-progress")
    assert code == 0 and WARNING.match(err) and "--preset" in err and "step 1: loss" in out
    assert json.loads(Run(tmp_path / "run").config_file.read_text())["model_config"] == "tiny"
    code, _, err = cli(capsys, "train", "--preset", "tiny", "--model-config", "tiny")
    assert_usage_error(code, err, "train", "once")


def test_toml_preset_key_warns_and_works(dataset, tmp_path):
    toml = tmp_path / "old.toml"
    toml.write_text(f'preset = "tiny"\ndata = "{dataset}"\nmax_steps = 1\n')
    with pytest.warns(FutureWarning, match="'preset' is now 'model_config'"):
        assert TrainConfig.from_toml(toml).model_config == "tiny"


def test_convert_positional_destination_warns_and_works(capsys, trained_run, tmp_path):
    dst = tmp_path / "fp32"
    code, out, err = cli(capsys, "convert", trained_run, dst, "--dtype", "fp32")
    assert code == 0 and WARNING.match(err) and f"--out {dst}" in err and out.startswith(f"wrote {dst}")
    a = dsv3.load_pretrained(resolve_checkpoint(trained_run)).state_dict()
    b = dsv3.load_pretrained(dst).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = cli(capsys, "convert", trained_run, dst, "--out", dst, "--dtype", "fp32")
    assert_usage_error(code, err, "convert", "once")


# ------------------------------------------------------------------------------------------------ usage errors
@pytest.mark.parametrize("argv, needle", [
    (["--gpu", "foo"], "invalid choice: 'foo'"),
    (["--tokens", "abc"], "not a count: 'abc'"),
    (["--gpus", "0"], "must be at least 1"),
    (["--mfu", "1.5"], "mfu"),
])
def test_cost_rejects_bad_values(capsys, argv, needle):
    code, _, err = cli(capsys, "cost", "--model-config", "tiny", *argv)
    assert code == 2 and needle in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith("dsv3 cost: error: ")
