"""Held-out accuracy on a verifiable task: the model answers each prompt greedily through the engine (the chat
template renders the user turn, as the server would), and the task's rule-based checker grades the reply
(`dsv3.tasks.check`: the text after the last "Answer:" must equal the gold answer)."""

from __future__ import annotations

from collections.abc import Callable

from ..infer import Engine, SamplingParams
from ..tasks import check
from ..tokenizer import ChatTemplate


def task_accuracy(model, tokenizer, template: ChatTemplate, records: list[dict], stop_ids: tuple[int, ...] = (),
                  max_new_tokens: int = 128, batch: int = 16, samples: int = 5,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Greedy exact-match accuracy over `records` (dicts with "prompt" and "answer", as `dsv3 data tasks` writes).

    stop_ids: tokens that end a reply (the checkpoint's end-of-text / EOS); the template's own stop strings (the
    plain template's next "User:" turn) apply too. Returns {"accuracy": fraction correct, "correct", "n", "samples":
    the first `samples` (prompt, reply, answer, correct)}.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=tuple(stop_ids),
                            stop_strings=template.default_stops)
    engine = Engine(model, tokenizer, max_batch=batch)
    prompts = [template.encode(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in records]
    correct, shown = 0, []
    for start in range(0, len(records), batch):
        for rec, req in zip(records[start:start + batch], engine.generate(prompts[start:start + batch], params)):
            ok = check(rec["answer"], req.text)
            correct += ok
            if len(shown) < samples:
                shown.append({"prompt": rec["prompt"], "reply": req.text, "answer": rec["answer"], "correct": ok})
        if progress is not None:
            progress(min(start + batch, len(records)), len(records))
    return {"accuracy": correct / len(records) if records else 0.0, "correct": correct, "n": len(records),
            "samples": shown}
