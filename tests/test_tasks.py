"""Verifiable synthetic tasks (`dsv3.tasks`, `dsv3 data tasks`): every checker accepts its own gold answers and
rejects corrupted ones, splits are reproducible and held out, bad files are named by line and field."""

from __future__ import annotations

import json
import random

import pytest

from dsv3.cli import main
from dsv3.tasks import SIZES, TASKS, TaskError, check, extract_answer, make_splits, read_task_records


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


def _size_of(task: str, prompt: str) -> int | list[int]:
    """What `size` measures in a prompt: digits of each operand (add), of the first factor (multiply), the list
    length (sort, count, reverse)."""
    if task == "add":
        return [len(x) for x in prompt.removeprefix("What is ").removesuffix("?").split(" + ")]
    if task == "multiply":
        return len(prompt.removeprefix("What is ").split(" * ")[0])
    return len(prompt.split(": ", 1)[1].split())


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 6)])
def test_size_knob_draws_that_size_and_the_checker_still_holds(task, size):
    """`size=(lo, hi)`: every prompt's size lies in lo..hi (each end drawn), gold answers pass the checker and
    corrupted ones fail; the default size draws exactly what the generator drew before the knob."""
    train, val = make_splits(task, 150, 10, seed=4, size=size)
    sizes = set()
    for ex in train + val:
        got = _size_of(task, ex.prompt)
        for n in got if isinstance(got, list) else [got]:
            assert size[0] <= n <= size[1], (ex.prompt, size)
            sizes.add(n)
        assert check(ex.answer, ex.solution), ex
        for wrong in _corruptions(ex.answer):
            assert not check(ex.answer, f"Answer: {wrong}"), (ex, wrong)
    assert sizes == set(range(size[0], size[1] + 1))
    default = [e.record() for e in make_splits(task, 30, 5, seed=4)[0]]
    assert default == [e.record() for e in make_splits(task, 30, 5, seed=4, size=SIZES[task])[0]]


def test_size_out_of_range_or_too_small_a_space_is_refused(tmp_path, capsys):
    with pytest.raises(TaskError, match="1 <= LO <= HI <= 47"):
        make_splits("reverse", 1, 1, size=(2, 48))
    with pytest.raises(TaskError, match="size 3,2"):
        make_splits("sort", 1, 1, size=(3, 2))
    with pytest.raises(TaskError, match="too few prompts outside"):  # 1-word lists: 47 prompts, all held out
        make_splits("reverse", 5, 47, size=(1, 1))
    out = tmp_path / "rev"
    assert main(["data", "tasks", "--task", "reverse", "--size", "2,3", "--out", str(out), "--train", "20",
                 "--val", "4"]) == 0
    assert json.loads((out / "task.json").read_text())["size"] == [2, 3]
    assert {len(r["answer"].split()) for r in read_task_records(out / "train.jsonl")} == {2, 3}
    assert main(["data", "tasks", "--task", "add", "--size", "20", "--out", str(tmp_path / "a")]) == 2
    assert "1 <= LO <= HI <= 18" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "tasks", "--task", "add", "--size", "4,2", "--out", str(tmp_path / "b")])
    assert "LO <= HI" in capsys.readouterr().err


def test_worked_arithmetic_is_right():
    rng = random.Random(0)
    for _ in range(300):
        ex = TASKS["add"](rng, SIZES["add"])
        a, b = (int(x) for x in ex.prompt.removeprefix("What is ").removesuffix("?").split(" + "))
        assert ex.answer == str(a + b)
        ex = TASKS["multiply"](rng, SIZES["multiply"])
        a, b = (int(x) for x in ex.prompt.removeprefix("What is ").removesuffix("?").split(" * "))
        assert ex.answer == str(a * b)
        ex = TASKS["sort"](rng, SIZES["sort"])
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
