"""Verifiable synthetic tasks for post-training: generated offline from a seed, each with a worked solution (the
"reasoning trace" a teacher or SFT learns from) and a rule-based checker (the reward of rejection sampling and GRPO,
DeepSeek-V3 report section 5.2.1: "rule-based reward model").

One example is one JSONL record, an OpenAI-style conversation plus what the checker needs:

    {"task": "add", "messages": [{"role": "user", "content": PROMPT},
                                 {"role": "assistant", "content": WORKED SOLUTION ending "Answer: 579"}],
     "prompt": PROMPT, "answer": "579"}

The answer is whatever follows the last "Answer:" in a response (`extract_answer`), compared exactly after
collapsing whitespace (`check`); a response with no "Answer:" line is wrong. Tasks (`TASKS`):

- `add`: a + b, each 2-4 digits; the solution adds column by column from the right with carries.
- `multiply`: a 2-3 digit number times a 1-digit one; the solution multiplies digit by digit with carries.
- `sort`: 4-7 two-digit numbers in ascending order; the solution takes the smallest remaining one at a time.
- `count`: how many of 5-9 words start with a given letter; the solution lists the matches and counts them.
- `reverse`: a list of 3-6 words backwards (copying with a twist); the solution reads them from the last.

The ranges above are each task's default *size* (`SIZES`): digits per operand (`add`), digits of the first factor
(`multiply`), list length (`sort`, `count`, `reverse`). `size=(lo, hi)` (`dsv3 data tasks --size LO,HI`) draws it
uniformly from lo..hi instead, the difficulty knob; the default draws exactly what it drew before the knob existed.

`make_splits` draws train and held-out examples from one seed; a held-out prompt never appears in train.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import Dsv3Error

ANSWER = "Answer:"
_ANSWER_RE = re.compile(r"Answer:\s*(.*)")
_WORDS = ("apple baker candle dragon eagle forest garden harbor island jacket kettle ladder meadow needle orange "
          "pepper quiver river saddle timber umbrella velvet walnut yellow zephyr anchor bottle cactus desert ember "
          "falcon goblet hammer iris jungle kernel lemon marble nickel olive pillow quartz rocket silver tulip "
          "valley willow").split()


class TaskError(Dsv3Error, ValueError):
    """An unknown task name or an impossible split request; the message names it."""


@dataclass(frozen=True)
class Example:
    """One task instance: the user's prompt, the worked solution (ends with "Answer: <answer>") and the answer."""

    task: str
    prompt: str
    solution: str
    answer: str

    def record(self) -> dict:
        """The JSONL record (see the module docstring)."""
        return {"task": self.task, "messages": [{"role": "user", "content": self.prompt},
                                                {"role": "assistant", "content": self.solution}],
                "prompt": self.prompt, "answer": self.answer}


def extract_answer(response: str) -> str | None:
    """What follows the last "Answer:" in `response` (first line of it, whitespace collapsed), or None."""
    found = _ANSWER_RE.findall(response)
    if not found:
        return None
    return " ".join(found[-1].split())


def check(answer: str, response: str) -> bool:
    """True when `response`'s extracted answer equals the gold `answer` exactly (whitespace collapsed)."""
    got = extract_answer(response)
    return got is not None and got == " ".join(answer.split())


# ------------------------------------------------------------------------------------------------ generators
def _digits(n: int) -> list[int]:
    return [int(c) for c in str(n)]


def _columns(pairs: list[tuple[int, int]], sign: str, value) -> tuple[list[str], str]:
    """Schoolbook column arithmetic from the right: each column's value(x, y) plus the carry, its last digit
    written, the rest carried. pairs: (x, y) per column, lowest first. Returns (the steps, the digits written)."""
    steps, carry, out = [], 0, []
    for x, y in pairs:
        v = value(x, y) + carry
        steps.append(f"{x}{sign}{y}" + (f"+{carry}" if carry else "") + f"={v}, write {v % 10}" +
                     (f", carry {v // 10}" if v >= 10 else ""))
        out.append(v % 10)
        carry = v // 10
    if carry:
        steps.append(f"write the carry {carry}")
        out.append(carry)
    return steps, "".join(map(str, out[::-1])).lstrip("0") or "0"


def _add(rng: random.Random, size: tuple[int, int]) -> Example:
    a, b = (rng.randint(10 ** (d - 1), 10**d - 1) for d in (rng.randint(*size), rng.randint(*size)))
    da, db = _digits(a)[::-1], _digits(b)[::-1]
    n = max(len(da), len(db))
    steps, written = _columns([(da[i] if i < len(da) else 0, db[i] if i < len(db) else 0) for i in range(n)], "+",
                              lambda x, y: x + y)
    answer = str(a + b)
    assert written == answer
    return Example("add", f"What is {a} + {b}?", "\n".join(steps) + f"\n{ANSWER} {answer}", answer)


def _multiply(rng: random.Random, size: tuple[int, int]) -> Example:
    a, b = rng.randint(10 ** (size[0] - 1), 10 ** size[1] - 1), rng.randint(2, 9)
    steps, written = _columns([(x, b) for x in _digits(a)[::-1]], "*", lambda x, y: x * y)
    answer = str(a * b)
    assert written == answer
    return Example("multiply", f"What is {a} * {b}?", "\n".join(steps) + f"\n{ANSWER} {answer}", answer)


def _sort(rng: random.Random, size: tuple[int, int]) -> Example:
    nums = [rng.randint(10, 99) for _ in range(rng.randint(*size))]
    left, steps, done = list(nums), [], []
    while left:
        m = min(left)
        left.remove(m)
        done.append(m)
        steps.append(f"smallest of the rest: {m}")
    answer = " ".join(map(str, done))
    return Example("sort", f"Sort in ascending order: {' '.join(map(str, nums))}",
                   "\n".join(steps) + f"\n{ANSWER} {answer}", answer)


def _count(rng: random.Random, size: tuple[int, int]) -> Example:
    letter = rng.choice("abcdefghilmoprstvw")
    words = [rng.choice(_WORDS) for _ in range(rng.randint(*size))]
    pool = [w for w in _WORDS if w.startswith(letter)]
    for _ in range(rng.randint(0, 3) if pool else 0):  # make matches likely
        words[rng.randrange(len(words))] = rng.choice(pool)
    matches = [w for w in words if w.startswith(letter)]
    steps = [f"{i}. {w}" for i, w in enumerate(matches, 1)] or ["none"]
    answer = str(len(matches))
    return Example("count", f"How many of these words start with '{letter}': {' '.join(words)}",
                   f"words starting with '{letter}':\n" + "\n".join(steps) + f"\n{ANSWER} {answer}", answer)


def _reverse(rng: random.Random, size: tuple[int, int]) -> Example:
    words = rng.sample(_WORDS, rng.randint(*size))
    steps = [f"{len(words) - i}. {w}" for i, w in enumerate(reversed(words))]
    answer = " ".join(reversed(words))
    return Example("reverse", f"Write these words in reverse order: {' '.join(words)}",
                   "from the last:\n" + "\n".join(steps) + f"\n{ANSWER} {answer}", answer)


TASKS: dict[str, Callable[[random.Random, tuple[int, int]], Example]] = {  # gen(rng, size) -> Example
    "add": _add, "multiply": _multiply, "sort": _sort, "count": _count, "reverse": _reverse}
SIZES: dict[str, tuple[int, int]] = {"add": (2, 4), "multiply": (2, 3), "sort": (4, 7), "count": (5, 9),
                                     "reverse": (3, 6)}  # each generator's default size (lo, hi), inclusive
_MAX_SIZE = {"add": 18, "multiply": 18, "sort": 100, "count": 100, "reverse": len(_WORDS)}


def task_size(task: str, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """`size` checked for `task` (None: the task's default, `SIZES`): 1 <= lo <= hi <= the task's limit (18
    digits for the arithmetic, the 47 distinct words of `reverse`, 100 items otherwise).

    Raises:
        TaskError: unknown task, or a size out of range (named with the task's limit).
    """
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if size is None:
        return SIZES[task]
    lo, hi = size
    if not 1 <= lo <= hi <= _MAX_SIZE[task]:
        raise TaskError(f"task {task!r}: size {lo},{hi} must satisfy 1 <= LO <= HI <= {_MAX_SIZE[task]}")
    return lo, hi


def make_splits(task: str, train: int, val: int, seed: int = 0,
                size: tuple[int, int] | None = None) -> tuple[list[Example], list[Example]]:
    """`train` and `val` examples of `task` from `seed`: val prompts are distinct and never among train's.
    size: (lo, hi), the task's difficulty (see the module docstring); None is the task's default.

    Raises:
        TaskError: unknown task, a size out of range, or the task's space (at this size) is too small for that
            many distinct held-out prompts or for training prompts outside them.
    """
    size = task_size(task, size)
    gen, rng = TASKS[task], random.Random(f"{task}:{seed}")
    held_out: dict[str, Example] = {}
    tries = 0
    while len(held_out) < val:
        ex = gen(rng, size)
        held_out.setdefault(ex.prompt, ex)
        tries += 1
        if tries > 50 * max(val, 1) + 1000:
            raise TaskError(f"task {task!r}: could not draw {val} distinct held-out prompts")
    train_examples, tries = [], 0
    while len(train_examples) < train:
        ex = gen(rng, size)
        if ex.prompt not in held_out:
            train_examples.append(ex)
        tries += 1
        if tries > 50 * max(train, 1) + 1000:
            raise TaskError(f"task {task!r}: too few prompts outside the {val} held-out ones for {train} training "
                            f"examples (size {size[0]},{size[1]})")
    return train_examples, list(held_out.values())


def write_task_data(out: str | Path, task: str, train: int, val: int, seed: int = 0,
                    size: tuple[int, int] | None = None) -> dict:
    """`dsv3 data tasks`: OUT/train.jsonl, OUT/val.jsonl and OUT/task.json (task, seed, counts, size [lo, hi]).
    `out` must be free (the CLI claims it). Returns the task.json content."""
    from .runs import write_atomic

    out = Path(out)
    size = task_size(task, size)
    train_ex, val_ex = make_splits(task, train, val, seed, size)
    out.mkdir(parents=True, exist_ok=True)
    for name, examples in (("train", train_ex), ("val", val_ex)):
        write_atomic(out / f"{name}.jsonl", "".join(json.dumps(e.record()) + "\n" for e in examples))
    meta = {"task": task, "seed": seed, "train": len(train_ex), "val": len(val_ex), "size": list(size), "format": 1}
    write_atomic(out / "task.json", json.dumps(meta, indent=2) + "\n")
    return meta


def read_task_records(path: str | Path) -> list[dict]:
    """The records of a task JSONL file, each checked for `prompt` and `answer` strings.

    Raises:
        TaskError: the file is unreadable, or a line is not JSON / lacks a field; the message names file and line.
    """
    from .runs import jsonl_records

    path = Path(path)
    records = []
    for n, rec in jsonl_records(path, TaskError):
        for field in ("prompt", "answer"):
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise TaskError(f"{path}:{n}: field '{field}' must be a string")
        records.append(rec)
    return records
