"""Passkey retrieval, the long-context probe of the report's Needle-in-a-Haystack figure: a random number stated once
inside filler text at a chosen depth, asked for at the end; greedy decoding must reproduce it exactly.

The filler is neutral prose repeated (the classic passkey filler of Mohtashami & Jaggi, "Landmark Attention",
2023), not the training corpus, and the phrasing of the key and the question is fixed here, so nothing in a
pre-training corpus matches it; a run that trains on retrieval-style documents must use other wording.

`passkey_prompt` builds one trial from a seed (reproducible), `check_answer` is the exact-match rule (a near miss
— one digit off, a digit missing or added — fails), `passkey_grid` runs lengths x depths x trials with greedy
decoding over the model's latent cache, and `plot_passkey` draws the heatmap.

`retrieval_document` writes the training side (`dsv3 data prepare --retrieval-docs N`): a number stated once in
a stretch of the training corpus and stated again at the end, so that a model learns to look a long way back and
copy (`--retrieval-keys K`: K numbers under K names, all recalled at the end). It shares no sentence with the
evaluation's text: the filler is the corpus itself, each number is named "the WORD NOUN" with a word drawn from the
corpus and a noun from `RETRIEVAL_NOUNS` (thousands of names, so that what is learned is retrieval by whatever
name, not by eight fixed ones; the word "pass" is never drawn, so "the pass key" never occurs), and its sentences
are `RETRIEVAL_STATE` / `RETRIEVAL_ASK`, not `KEY` / `QUESTION` (tests/test_context.py checks that no evaluation
sentence occurs in a training document).
`retrieval_example` writes the same text as a prompt-completion record (`dsv3 data retrieval`, trained by `dsv3
sft` with the loss on the completion alone: the number, its full stop and newline): the prompt ends where the
number is recalled (`--keys K`: K numbers stated, one of them recalled).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from ..model import DeepseekV3

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = "There is an important number hidden inside a lot of irrelevant text. Find it and memorize it.\n"
KEY = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
DIGITS = 5

RETRIEVAL_NOUNS = ("number", "code", "key", "pin", "combination", "count", "figure", "mark")
RETRIEVAL_MAX_KEYS = 8
RETRIEVAL_STATE = ("Note that {name} is {key}.", "Write this down: {name} is {key}.", "Mind that {name} is {key}.",
                   "{name} is {key}.")
RETRIEVAL_ASK = ("Now, once more: {name} is {key}.", "To repeat it, {name} is {key}.", "So {name} is {key}.",
                 "{name} is {key}.")
_EVAL_WORDS = ("pass",)  # "the pass key" is the evaluation's name


def _capital(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _name(lines: list[str], rng: random.Random, taken: set[str]) -> str:
    """A name for a number, "the WORD NOUN": a random word of a random corpus line (its letters, lower case, 3 or
    more; never one of the evaluation's) and one of RETRIEVAL_NOUNS, not in `taken`.

    Raises:
        ValueError: 1,000 draws found no new name (the lines have too few words of 3+ letters).
    """
    for _ in range(1000):
        words = lines[rng.randrange(len(lines))].split()
        word = re.sub("[^a-z]", "", rng.choice(words).lower()) if words else ""
        name = f"the {word} {rng.choice(RETRIEVAL_NOUNS)}"
        if len(word) >= 3 and word not in _EVAL_WORDS and name not in taken:
            return name
    raise ValueError("the corpus lines have too few distinct words of 3 or more letters to name the numbers")


def corpus_stretch(lines: list[str], words: int, rng: random.Random, min_lines: int = 1) -> list[str]:
    """Consecutive `lines` from a random start (one `rng.randrange` draw; wrapping at the end), at least `min_lines`
    of them, until they hold `words` words: the text of retrieval documents and records (`_stated`) and of plain-text
    records (`data.text_example`).

    Raises:
        ValueError: no lines, words < 1, or lines without a word.
    """
    if not lines or words < 1:
        raise ValueError("a stretch of the corpus needs corpus lines with text and at least one word")
    start, body, count = rng.randrange(len(lines)), [], 0
    while count < words or len(body) < min_lines:
        if count == 0 and len(body) > len(lines):
            raise ValueError("a stretch of the corpus needs corpus lines with text and at least one word")
        line = lines[(start + len(body)) % len(lines)]
        body.append(line)
        count += len(line.split())
    return body


def _stated(lines: list[str], words: int, rng: random.Random, keys: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Consecutive corpus `lines` of about `words` words from a random start with `keys` numbers stated at random
    lines (each under its own name): (the lines, [(name, key)] in statement order). Checks the arguments."""
    if not 1 <= keys <= RETRIEVAL_MAX_KEYS:
        raise ValueError(f"a retrieval document holds 1 to {RETRIEVAL_MAX_KEYS} keys, got {keys}")
    body = corpus_stretch(lines, words, rng)
    stated = []
    for _ in range(keys):
        name = _name(lines, rng, {n for n, _ in stated})
        key = str(rng.randrange(10 ** (DIGITS - 1), 10**DIGITS))
        body.insert(rng.randrange(len(body) + 1), _capital(rng.choice(RETRIEVAL_STATE).format(name=name, key=key)))
        stated.append((name, key))
    return body, stated


def _ask(name: str, key: str, rng: random.Random) -> str:
    return _capital(rng.choice(RETRIEVAL_ASK).format(name=name, key=key))


def retrieval_document(lines: list[str], words: int, rng: random.Random, keys: int = 1) -> str:
    """One training document of about `words` words: consecutive `lines` of the corpus from a random start,
    `keys` DIGITS-digit numbers, each under its own name (`_name`), stated at random lines
    (`RETRIEVAL_STATE`) and all stated again at the end (`RETRIEVAL_ASK`, one per line, in a random order);
    deterministic given `rng`'s state. Several keys make the document multi-query associative recall (Arora et al.
    2023, "Zoology"): more digits to copy per token, each found by its name.

    Raises:
        ValueError: no lines, words < 1, keys outside 1..RETRIEVAL_MAX_KEYS, or too few words to name the numbers.
    """
    body, stated = _stated(lines, words, rng, keys)
    if keys > 1:
        rng.shuffle(stated)
    return "\n".join(body + [_ask(name, key, rng) for name, key in stated]) + "\n"


def retrieval_example(lines: list[str], words: int, rng: random.Random, keys: int = 1) -> dict[str, str]:
    """One prompt-completion record (`train.sft`): {"prompt": a retrieval document of about `words` words with
    `keys` numbers, each under its own name, ending in the recall of one of them (uniform) cut just before the number,
    "completion": " NUMBER." and a newline}. Trained with the loss on the completion only, the recall weighs as much
    as a whole row would under the plain language-model loss, where it is a few tokens of hundreds: at `small`'s
    scale the plain loss does not teach retrieval in a session's budget, a weighted answer does when the ids to copy
    are few (`benchmarks/copy_task.py --task needle`). With keys > 1 the other numbers are distractors (the
    multi-key needle of RULER, Hsieh et al. 2024): the one to copy is found by its name, not by being the only
    number. Deterministic given `rng`'s state (keys = 1 draws exactly what earlier versions drew); shares no
    sentence with the evaluation (its closest form, "The crown key is 12345." and a prompt ending "The crown key
    is", differs from the evaluation's by the name).

    Raises:
        ValueError: no lines, words < 1, keys outside 1..RETRIEVAL_MAX_KEYS, or too few words to name the numbers.
    """
    body, stated = _stated(lines, words, rng, keys)
    name, key = stated[rng.randrange(keys)] if keys > 1 else stated[0]
    ask = _ask(name, key, rng)
    cut = ask.rindex(" " + key)
    return {"prompt": "\n".join(body + [ask[:cut]]), "completion": ask[cut:] + "\n"}


def copy_document(vocabulary: list[str], rng: random.Random, words: tuple[int, int] = (8, 40),
                  repeats: tuple[int, int] = (2, 4)) -> str:
    """One copying document: a line of random words (uniform from `vocabulary`, their count uniform in `words`)
    written `repeats` times (uniform), one line each; deterministic given `rng`'s state. Every repeat is predictable
    only by looking back, the signal that grows induction heads (Olsson et al. 2022, "In-context learning and
    induction heads"), the copying circuit that retrieval needs (`benchmarks/copy_task.py` measures how many steps
    a model takes to find it on bare repeated tokens).

    Raises:
        ValueError: an empty vocabulary, or a range with min < 1 or min > max.
    """
    if not vocabulary:
        raise ValueError("a copy document needs a vocabulary")
    for lo, hi in (words, repeats):
        if not 1 <= lo <= hi:
            raise ValueError(f"a copy document's ranges need 1 <= min <= max, got {words} words, {repeats} repeats")
    line = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(*words)))
    return (line + "\n") * rng.randint(*repeats)


def passkey_prompt(tokenizer, length: int, depth: float, seed: int) -> tuple[list[int], str]:
    """One trial: token ids of about `length` tokens (intro, filler, the key sentence at fraction `depth` of the
    filler, more filler, the question) and the key as a string of DIGITS digits; the same (length, depth, seed)
    always gives the same trial.

    Raises:
        ValueError: depth outside [0, 1], or a length too short to hold the key and the question.
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    key = str(random.Random(f"passkey:{seed}").randrange(10 ** (DIGITS - 1), 10**DIGITS))
    fixed = len(tokenizer.encode(INTRO + KEY.format(key=key) + QUESTION).ids)
    sentences = [f"{s.strip()}. " for s in FILLER.split(". ") if s.strip()]
    sizes = [len(tokenizer.encode(s).ids) for s in sentences]
    room, filler = length - fixed, []
    while room >= sizes[len(filler) % len(sentences)]:  # whole sentences, cycling, while they fit
        room -= sizes[len(filler) % len(sentences)]
        filler.append(sentences[len(filler) % len(sentences)])
    if not filler:
        raise ValueError(f"a passkey prompt of {length} tokens has no room for filler ({fixed} tokens are fixed)")
    before = round(len(filler) * depth)
    text = INTRO + "".join(filler[:before]) + KEY.format(key=key) + "".join(filler[before:]) + QUESTION
    return tokenizer.encode(text).ids, key


def check_answer(generated: str, key: str) -> bool:
    """Whether the generated continuation states exactly `key` as its first number (leading spaces and a trailing
    period allowed; any other digit string — one digit off, one missing or extra — is wrong)."""
    match = re.match(r"\s*(\d+)", generated)
    return match is not None and match.group(1) == key


@torch.no_grad()
def greedy(model: DeepseekV3, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of `ids` by `new_tokens` tokens: one prefill into a latent cache, then cached steps."""
    device = model.lm_head.weight.device
    cache = model.new_cache(1, len(ids) + new_tokens)
    logits = model(torch.tensor([ids], device=device), cache=cache, start_pos=0, mtp=False).logits
    out = []
    pos = len(ids)
    for _ in range(new_tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        logits = model(torch.tensor([[token]], device=device), cache=cache, start_pos=pos, mtp=False).logits
        pos += 1
    return out


def passkey_grid(model: DeepseekV3, tokenizer, lengths: list[int], depths: list[float], trials: int = 20,
                 seed: int = 0, progress=None) -> dict:
    """Exact-match accuracy for every (length, depth) cell over `trials` seeded trials (greedy, DIGITS + 2 new
    tokens). Returns {"lengths", "depths", "trials", "seed", "accuracy": [[cell for each depth] for each length]};
    trial t of every cell is `passkey_prompt(..., seed * 100_003 + t)`.
    progress: called with (done, total) after each trial.

    Raises:
        ValueError: a length beyond the model's max_position_embeddings (or too short, `passkey_prompt`).
    """
    model.eval()
    limit = model.config.max_position_embeddings
    if max(lengths) + DIGITS + 2 > limit:
        raise ValueError(f"passkey length {max(lengths)} (+ {DIGITS + 2} generated) exceeds the model's "
                         f"max_position_embeddings {limit}")
    accuracy, done, total = [], 0, len(lengths) * len(depths) * trials
    for length in lengths:
        row = []
        for depth in depths:
            hits = 0
            for t in range(trials):
                ids, key = passkey_prompt(tokenizer, length, depth, seed * 100_003 + t)
                hits += check_answer(tokenizer.decode(greedy(model, ids, DIGITS + 2)), key)
                done += 1
                if progress is not None:
                    progress(done, total)
            row.append(hits / trials)
        accuracy.append(row)
    return {"lengths": lengths, "depths": depths, "trials": trials, "seed": seed, "accuracy": accuracy}


def plot_passkey(result: dict, path: str | Path, title: str = "") -> Path:
    """The grid as a heatmap (rows: depth, columns: length; green = retrieved), PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.tensor(result["accuracy"]).T  # [depths, lengths]
    fig, ax = plt.subplots(figsize=(1.2 * len(result["lengths"]) + 2, 0.5 * len(result["depths"]) + 1.5))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    ax.set_yticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(title or f"passkey retrieval ({result['trials']} trials per cell)")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
