"""Verifiable synthetic tasks (`dsv3.tasks`, `dsv3 data tasks`): every checker accepts its own gold answers and
rejects corrupted ones, splits are reproducible and held out, bad files are named by line and field."""

from __future__ import annotations

import json
import random

import pytest

from dsv3.cli import main
from dsv3.tasks import TASKS, TaskError, check, extract_answer, make_splits, read_task_records


def _corruptions(answer: str) -> list[str]:
    """Wrong answers near the gold one: a changed character, a dropped or added item, the order changed."""
    out = []
    if any(c.isdigit() for c in answer):
        i = max(i for i, c in enumerate(answer) if c.isdigit())
        out.append(answer[:i] + str((int(answer[i]) + 1) % 10) + answer[i + 1:])
        out.append(answer + "0")
    words = answer.split()
    if len(words) > 1:
        out += [" ".join(words[1:]), " ".join(words[::-1]), " ".join(words + words[:1])]
    else:
        out.append(answer + answer[-1])
    return [c for c in out if c != answer]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_checker_accepts_gold_and_rejects_corruptions(task):
    train, val = make_splits(task, 200, 50, seed=3)
    for ex in train + val:
        assert ex.solution.rstrip().endswith(f"Answer: {ex.answer}")
        assert check(ex.answer, ex.solution), ex
        assert check(ex.answer, f"some reasoning\nAnswer:   {ex.answer}  \n")  # whitespace does not matter
        assert not check(ex.answer, ex.solution.replace("Answer:", "answer"))  # no answer line: wrong
        for wrong in _corruptions(ex.answer):
            assert not check(ex.answer, f"Answer: {wrong}"), (ex, wrong)
        assert not check(ex.answer, f"Answer: {ex.answer}\nAnswer: x")  # the last answer line counts


def test_worked_arithmetic_is_right():
    rng = random.Random(0)
    for _ in range(300):
        ex = TASKS["add"](rng)
        a, b = (int(x) for x in ex.prompt.removeprefix("What is ").removesuffix("?").split(" + "))
        assert ex.answer == str(a + b)
        ex = TASKS["multiply"](rng)
        a, b = (int(x) for x in ex.prompt.removeprefix("What is ").removesuffix("?").split(" * "))
        assert ex.answer == str(a * b)
        ex = TASKS["sort"](rng)
        assert ex.answer.split() == sorted(ex.prompt.split(": ")[1].split(), key=int)


def test_splits_are_reproducible_and_held_out():
    a_train, a_val = make_splits("sort", 300, 60, seed=1)
    b_train, b_val = make_splits("sort", 300, 60, seed=1)
    assert [e.record() for e in a_train + a_val] == [e.record() for e in b_train + b_val]
    assert len({e.prompt for e in a_val}) == 60
    assert not {e.prompt for e in a_val} & {e.prompt for e in a_train}
    assert make_splits("sort", 5, 5, seed=2)[1] != a_val[:5]
    with pytest.raises(TaskError, match="unknown task"):
        make_splits("divide", 1, 1)


def test_extract_answer():
    assert extract_answer("x\nAnswer: 12 3 \nmore") == "12 3"
    assert extract_answer("no answer here") is None


def test_cli_writes_splits_and_refuses_existing(tmp_path, capsys):
    out = tmp_path / "add"
    assert main(["data", "tasks", "--task", "add", "--out", str(out), "--train", "40", "--val", "8"]) == 0
    train, val = read_task_records(out / "train.jsonl"), read_task_records(out / "val.jsonl")
    assert len(train) == 40 and len(val) == 8
    assert all(r["messages"][0]["role"] == "user" and check(r["answer"], r["messages"][1]["content"])
               for r in train + val)
    assert json.loads((out / "task.json").read_text())["task"] == "add"
    before = (out / "val.jsonl").read_bytes()
    assert main(["data", "tasks", "--task", "add", "--out", str(out), "--val", "9"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "val.jsonl").read_bytes() == before
    assert main(["data", "tasks", "--task", "divide", "--out", str(tmp_path / "d")]) == 2
    assert "--task divide" in capsys.readouterr().err


def test_bad_task_files_name_file_line_and_field(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b"}\n')
    with pytest.raises(TaskError, match=r"t\.jsonl:3: field 'answer'"):
        read_task_records(f)
    f.write_text('{"prompt": "a", "answer": "1"}\nnot json\n')
    with pytest.raises(TaskError, match=r"t\.jsonl:2: not JSON"):
        read_task_records(f)


def test_split_digits_tokenizer_reads_numbers_digit_by_digit():
    from dsv3.tokenizer import train_tokenizer

    texts = ["What is 4614 + 925? Answer: 5539. And 4614 again, 4614."] * 200
    merged = train_tokenizer(texts, 400).encode(" 4614").tokens
    split = train_tokenizer(texts, 400, split_digits=True)
    assert len(merged) < 4  # BPE learned the frequent number as one or two tokens
    tokens = split.encode("What is 4614 + 925?").tokens
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("4614925")
    assert split.decode(split.encode("What is 4614 + 925?").ids) == "What is 4614 + 925?"
