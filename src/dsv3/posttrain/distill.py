"""Sequence-level distillation, the R1 -> V3 path (DeepSeek-V3 report, section 5.1, "Reasoning Data"): the
teacher answers each training question k times through the engine, a rule-based verifier keeps only the correct
replies (rejection sampling), and the student is fine-tuned on the kept conversations (`train.sft`). The keep rate
says how much of the teacher's sampling the verifier threw away. Logit distillation (`dsv3 distill --mode
logits`) is the trainer's `teacher` setting instead (`train.losses.distillation_kl`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..checkpoint import load_pretrained
from ..infer import Engine, SamplingParams
from ..runs import resolve_checkpoint, write_atomic
from ..tasks import check
from ..tokenizer import ChatTemplate, load_tokenizer, stop_token_ids


def rejection_sample(teacher: str | Path, records: list[dict], samples: int = 4, temperature: float = 0.7,
                     max_new_tokens: int = 128, seed: int = 0, batch: int = 32,
                     progress: Callable[[int, int], None] | None = None) -> tuple[list[dict], dict]:
    """The teacher's verified replies: for each record ("prompt", "answer"), `samples` replies at `temperature`
    (per-request seeds from `seed`), kept when the task checker accepts them; at most one kept reply per distinct
    text. Returns (kept conversations {"messages": [user, assistant], "prompt", "answer"}, stats {"questions",
    "sampled", "kept", "keep_rate", "questions_solved"})."""
    source = resolve_checkpoint(teacher)
    model, tok, template = load_pretrained(source).eval(), load_tokenizer(source), ChatTemplate(source)
    stops = stop_token_ids(tok, source)
    engine = Engine(model, tok, max_batch=batch)
    kept, sampled, solved = [], 0, 0
    for start in range(0, len(records), max(1, batch // samples)):
        chunk = records[start:start + max(1, batch // samples)]
        reqs = []
        for i, rec in enumerate(chunk):
            prompt = template.encode(tok, [{"role": "user", "content": rec["prompt"]}])
            reqs.append([engine.submit(prompt, SamplingParams(
                max_new_tokens=max_new_tokens, temperature=temperature, seed=(seed * 1_000_003 + start + i) * 101 + s,
                stop_ids=stops, stop_strings=template.default_stops)) for s in range(samples)])
        while not all(r.done for group in reqs for r in group):
            engine.step()
        for rec, group in zip(chunk, reqs):
            sampled += len(group)
            texts = list(dict.fromkeys(r.text.strip() for r in group if check(rec["answer"], r.text)))
            solved += bool(texts)
            kept += [{"messages": [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": t}],
                      "prompt": rec["prompt"], "answer": rec["answer"]} for t in texts]
        if progress is not None:
            progress(min(start + len(chunk), len(records)), len(records))
    stats = {"questions": len(records), "sampled": sampled, "kept": len(kept),
             "keep_rate": len(kept) / sampled if sampled else 0.0, "questions_solved": solved}
    return kept, stats


def write_samples(out: str | Path, kept: list[dict], stats: dict) -> Path:
    """OUT/train.jsonl (the kept conversations) and OUT/stats.json; returns OUT."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "train.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    write_atomic(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    return out
