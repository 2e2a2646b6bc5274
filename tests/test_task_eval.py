"""`dsv3 eval --task` (`posttrain.evaluate.task_accuracy`): prompts rendered by the chat template, replies graded
by the task's checker, accuracy counted over every record (a stub engine answers; the real one runs in the CLI
test)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import dsv3.posttrain.evaluate as evaluate
from dsv3.cli import main
from dsv3.tasks import make_splits
from dsv3.tokenizer import ChatTemplate, load_tokenizer


class _StubEngine:
    """Answers the gold solution for every other prompt it has seen, a wrong answer otherwise."""

    seen: list[list[int]] = []

    def __init__(self, model, tokenizer, max_batch):
        self.by_prompt = _StubEngine.answers

    def generate(self, prompts, params):
        out = []
        for ids in prompts:
            _StubEngine.seen.append(ids)
            n = len(_StubEngine.seen)
            out.append(SimpleNamespace(text=self.by_prompt[tuple(ids)] if n % 2 else "Answer: -1"))
        return out


def test_accuracy_counts_checker_verdicts(monkeypatch, dataset):
    tok = load_tokenizer(dataset)
    template = ChatTemplate(None)
    _, val = make_splits("add", 0, 7, seed=5)
    records = [e.record() for e in val]
    prompts = [template.encode(tok, [{"role": "user", "content": r["prompt"]}]) for r in records]
    _StubEngine.answers = {tuple(p): e.solution for p, e in zip(prompts, val)}
    _StubEngine.seen = []
    monkeypatch.setattr(evaluate, "Engine", _StubEngine)
    result = evaluate.task_accuracy(None, tok, template, records, batch=3)
    assert _StubEngine.seen == prompts  # every record, in order, as the chat template renders the user turn
    assert result["correct"] == 4 and result["n"] == 7 and abs(result["accuracy"] - 4 / 7) < 1e-12
    assert [s["correct"] for s in result["samples"]] == [True, False, True, False, True]


def test_cli_task_eval_runs_the_engine(trained_run, tmp_path, capsys):
    assert main(["data", "tasks", "--task", "reverse", "--out", str(tmp_path / "t"), "--train", "5", "--val", "4"]) == 0
    capsys.readouterr()
    assert main(["eval", str(trained_run), "--task", str(tmp_path / "t"), "--max-new-tokens", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and 0 <= result["correct"] <= 4 and len(result["samples"]) == 4
    assert main(["eval", str(trained_run), "--task", "nosuch"]) == 2
    assert "--task nosuch" in capsys.readouterr().err
