"""Post-training end to end on this CPU (issue 16): SFT, GRPO and distillation on one verifiable task.

The story, every stage through the `dsv3` CLI in this process (`dsv3.cli.main`), so each one can be rerun by hand:
1. data: `dsv3 data tasks --task TASK [--size LO,HI]` (`--task`, default reverse; `--size`, default the mode's):
   train / held-out val, worked solutions ending "Answer: X";
2. bases: one dataset from `dsv3 data prepare` over `plays` Shakespeare plays plus the task's training conversations
   rendered as plain "User: ...\nAssistant: ..." text (so the shared BPE has seen the task's words), then a `small`
   teacher base and a `tiny` student base pre-trained on it (`dsv3 train`): the same tokenizer for both, as logit
   distillation needs;
3. teacher: `dsv3 sft` on the worked solutions, held-out accuracy; `dsv3 grpo` from it, held-out accuracy again;
4. student (`tiny`) four ways at equal optimizer steps and batch: SFT on gold final answers only (assistant =
   "Answer: X"), SFT on gold worked solutions, sequence-level distillation from the GRPO'd teacher (rejection
   sampling; keep rate), logit distillation from it on the gold worked-solution conversations;
5. a markdown table (stage, steps, minutes, held-out greedy accuracy, n), the keep rate, the GRPO reward curve, and
   one JSON line (also written to WORK/summary.json).

Held-out accuracy: greedy decoding through the engine, the task checker's exact match on the first `eval_n`
records of the held-out split (never in any training data, pre-training included).

    python benchmarks/post_training.py [--short | --quick] [--task reverse] [--size LO[,HI]] [--set KEY=VALUE]
                                       [--work runs/post-training] [--overwrite] [--threads 1]

Modes (budgets in MODES below, any knob overridable with --set; each stage's minutes are printed): --short runs
every stage with tiny budgets in about 5 minutes (checks that the pipeline works; its numbers mean nothing);
--quick is the measured story: `reverse` on 3-word lists (`--size 3`), the bases pre-trained on the task text, the
teacher's SFT at a constant lr stopped at 135 steps, in the middle of its accuracy's sharp rise (measured from the
same base: 0% at 120 steps, 7% at 130, 58% at 135, 86% at 140 on 100 held-out questions), GRPO with a 5-step lr
warm-up, the students 450 steps at a constant lr; 37 minutes on the 2-core CPU with one torch thread, the CPU
shared (small about 3 s per step of 8 x 256 tokens with the story's 477-token vocabulary, tiny 0.4 s, logit
distillation of tiny from small 1.1 s, a GRPO step of 8 x 8 replies 10 s). The default mode keeps the
original budgets on the default sizes (3-6 words), where no model got past 0% in 40 minutes (not re-measured).
`--threads 1` when something else uses the CPU.

A stage that cannot run (sequence distillation when the teacher solves no training question: nothing to
fine-tune on) is reported as "not run" with its exit status, and the story goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch

from dsv3.cli import _size_range  # `dsv3 data tasks --size`'s own parser: LO,HI or N
from dsv3.cli import main as dsv3
from dsv3.runs import claim_output, resolve_checkpoint
from dsv3.tasks import TASKS, read_task_records

# Every knob of a mode (override any with --set KEY=VALUE):
#   data: train / val examples, size (the task's difficulty, `dsv3 data tasks --size LO,HI`; None: the task's
#     default), plays (Shakespeare plays mixed into the pre-training corpus), vocab (BPE vocabulary)
#   base_small / base_tiny: pre-training steps (batch 8 x 256 tokens) and their peak lr (base_*_lr)
#   teacher_sft / student: SFT steps (batch 8 x 256 tokens, packed), their peak lr (teacher_lr, student_lr),
#     warm-up steps (*_warmup; 0: a tenth of the steps) and final lr fraction (*_min_lr_ratio; 1.0: constant)
#   grpo_*: steps x prompts x group, lr, warm-up steps, policy updates per batch, KL beta, temperature
#   questions x samples: the teacher's rejection sampling; kd_alpha / kd_temperature: logit distillation
#   max_new: reply limit in tokens (rollouts, sampling, evaluation); eval_n: held-out records graded
_COMMON = dict(base_small_lr=1.5e-3, base_tiny_lr=3e-3, teacher_lr=1e-3, student_lr=2e-3, teacher_warmup=0,
               student_warmup=0, teacher_min_lr_ratio=0.1, student_min_lr_ratio=0.1, grpo_lr=5e-5,
               grpo_warmup=0, grpo_updates=2, grpo_beta=0.04, grpo_temperature=1.0, kd_alpha=1.0,
               kd_temperature=1.0, size=None, max_new=96)
MODES = {
    "short": dict(_COMMON, train=300, val=40, plays=2, vocab=1024, base_small=20, base_tiny=20, teacher_sft=20,
                  grpo_steps=2, grpo_prompts=4, grpo_group=4, student=15, questions=16, samples=2, eval_n=16),
    # quick: 3-word `reverse`, measured (see the module docstring): the teacher's SFT stops mid-way through the
    # sharp rise of its accuracy (steps 130-140 at this constant lr), so that GRPO starts between 20% and 80%
    "quick": dict(_COMMON, train=3000, val=300, size=[3, 3], plays=1, vocab=2048, base_small=100, base_tiny=300,
                  teacher_sft=135, teacher_warmup=15, teacher_min_lr_ratio=1.0, grpo_steps=15, grpo_prompts=8,
                  grpo_group=8, grpo_lr=1e-4, grpo_warmup=5, student=450, student_warmup=30,
                  student_min_lr_ratio=1.0, questions=1000, samples=2, max_new=40, eval_n=200),
    "default": dict(_COMMON, train=5000, val=500, plays=4, vocab=2048, base_small=300, base_tiny=300,
                    teacher_sft=300, grpo_steps=16, grpo_prompts=8, grpo_group=8, student=200, questions=300,
                    samples=4, eval_n=200),
}
PLAYS = ["hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "king_lear_gut.txt", "the_tempest_gut.txt",
         "romeo_and_juliet_gut.txt", "julius_caesar_gut.txt", "twelfth_night_gut.txt"]


class Story:
    def __init__(self, work: Path, mode: str, budget: dict, seed: int, task: str):
        self.work, self.mode, self.b, self.seed, self.task = work, mode, budget, seed, task
        self.t0 = time.time()
        self.rows: list[dict] = []
        self.commands: list[str] = []

    def log(self, text: str) -> None:
        print(f"[{(time.time() - self.t0) / 60:5.1f} min] {text}", flush=True)

    def cli(self, *argv: str, quiet: bool = True, check: bool = True) -> str | int:
        """`dsv3 ARGV` in this process; returns its stdout (echoed unless quiet). A non-zero status stops the
        story, or with check=False is returned instead of the output."""
        argv = [str(a) for a in argv]
        self.commands.append("dsv3 " + " ".join(argv))
        self.log("dsv3 " + " ".join(argv))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = dsv3(argv)
        out = buf.getvalue()
        if not quiet or rc:
            print(out, end="", flush=True)
        if rc and check:
            sys.exit(f"post_training: `dsv3 {' '.join(argv)}` exited with {rc}")
        return rc if rc else out

    def accuracy(self, run: Path) -> dict:
        """Greedy held-out accuracy of `run`'s latest checkpoint (what `dsv3 eval RUN --task DIR` prints)."""
        from dsv3.checkpoint import load_pretrained
        from dsv3.posttrain.evaluate import task_accuracy
        from dsv3.tokenizer import ChatTemplate, load_tokenizer, stop_token_ids

        ckpt = resolve_checkpoint(run)
        records = read_task_records(self.work / "task" / "val.jsonl")[: self.b["eval_n"]]
        tok = load_tokenizer(ckpt)
        model = load_pretrained(ckpt).eval()
        with torch.no_grad():
            result = task_accuracy(model, tok, ChatTemplate(ckpt), records, stop_token_ids(tok, ckpt),
                                   max_new_tokens=self.b["max_new"], batch=32)
        self.commands.append(f"dsv3 eval {run} --task {self.work / 'task'} --task-examples {self.b['eval_n']} "
                             f"--max-new-tokens {self.b['max_new']}")
        return result

    def row(self, stage: str, steps: str, seconds: float, result: dict | None, **extra) -> None:
        r = {"stage": stage, "steps": steps, "minutes": round(seconds / 60, 2),
             "accuracy": None if result is None else result["accuracy"], "n": None if result is None else result["n"],
             **extra}
        if result is not None:
            r["sample"] = result["samples"][0] if result["samples"] else None
        self.rows.append(r)
        (self.work / "rows.json").write_text(json.dumps(self.rows, indent=1) + "\n")  # so far, if a later stage fails
        acc = "" if result is None else f": held-out accuracy {result['accuracy']:.1%} of {result['n']}"
        self.log(f"{stage} ({steps}, {seconds / 60:.1f} min){acc}")

    def timed(self, fn, *args, **kw):
        t = time.time()
        out = fn(*args, **kw)
        return out, time.time() - t


def trainer_flags(steps: int, lr: float, warmup: int, min_lr_ratio: float = 0.1) -> list[str]:
    """The trainer's flags of a stage: `steps` optimizer steps of 8 x 256 tokens, linear warm-up over `warmup`
    steps to `lr`, then cosine to `min_lr_ratio` x lr (1.0: constant; the MTP loss weight still drops from 0.3 to
    0.1 at 10/14.8 of the steps, so a longer run parts from this one there), one checkpoint at the end."""
    return ["--max-steps", str(steps), "--batch-size", "8", "--seq-len", "256", "--lr", str(lr), "--warmup-steps",
            str(warmup), "--min-lr-ratio", str(min_lr_ratio), "--checkpoint-every", "100000", "--no-progress"]


def run_story(s: Story) -> dict:
    b, w = s.b, s.work
    task = w / "task"
    # 1. data ------------------------------------------------------------------------------------------------------
    size = [] if b["size"] is None else ["--size", ",".join(map(str, b["size"]))]
    s.cli("data", "tasks", "--task", s.task, "--out", task, "--train", b["train"], "--val", b["val"], "--seed", s.seed,
          *size)
    records = read_task_records(task / "train.jsonl")
    answers = w / "answers-only"
    answers.mkdir()
    (answers / "train.jsonl").write_text("".join(json.dumps(
        {"messages": [r["messages"][0], {"role": "assistant", "content": f"Answer: {r['answer']}"}],
         "prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in records))
    # 2. bases: a shared tokenizer over Shakespeare + the task's training conversations ------------------------------
    from dsv3.train.data import shakespeare_files

    plays = {p.name: p for p in shakespeare_files()}
    corpus = w / "corpus"
    corpus.mkdir()
    task_text = corpus / "task-conversations.txt"
    task_text.write_text("\n\n".join(f"User: {r['prompt']}\nAssistant: {r['messages'][1]['content']}"
                                     for r in records) + "\n")
    inputs = [task_text] + [plays[n] for n in PLAYS[: b["plays"]]]
    data = w / "pretrain-data"
    _, sec = s.timed(s.cli, "data", "prepare", *inputs, "--out", data, "--vocab-size", b["vocab"])
    meta = json.loads((data / "meta.json").read_text())
    s.row("pre-training data", f"{meta['splits']['train']['tokens']:,} tokens, vocab {meta['vocab_size']}", sec, None)
    bases = {}
    for preset, steps in (("small", b["base_small"]), ("tiny", b["base_tiny"])):
        out = w / f"base-{preset}"
        _, sec = s.timed(s.cli, "train", "--model-config", preset, "--data", data, "--out", out,
                         *trainer_flags(steps, b[f"base_{preset}_lr"], max(1, steps // 10)))
        bases[preset] = out
        s.row(f"{preset} base (pre-training)", f"{steps} x 8 x 256", sec, None)
    # 3. teacher: SFT, then GRPO -----------------------------------------------------------------------------------
    teacher_sft = w / "teacher-sft"
    _, sec = s.timed(s.cli, "sft", bases["small"], "--data", task, "--out", teacher_sft,
                     *trainer_flags(b["teacher_sft"], b["teacher_lr"],
                                    b["teacher_warmup"] or max(1, b["teacher_sft"] // 10), b["teacher_min_lr_ratio"]))
    acc, esec = s.timed(s.accuracy, teacher_sft)
    s.row("teacher (small): SFT on worked solutions", f"{b['teacher_sft']}", sec, acc, eval_minutes=esec / 60)
    teacher = w / "teacher-grpo"
    _, sec = s.timed(s.cli, "grpo", teacher_sft, "--task", task, "--out", teacher, "--steps", b["grpo_steps"],
                     "--prompts", b["grpo_prompts"], "--group", b["grpo_group"], "--temperature",
                     b["grpo_temperature"], "--max-new-tokens", b["max_new"], "--updates", b["grpo_updates"], "--lr",
                     b["grpo_lr"], "--warmup-steps", b["grpo_warmup"], "--clip-eps", "0.2", "--beta", b["grpo_beta"],
                     "--seed", s.seed, "--no-progress")
    curve = [json.loads(line) for line in (teacher / "metrics.jsonl").read_text().splitlines()]
    acc, esec = s.timed(s.accuracy, teacher)
    s.row("teacher: + GRPO", f"{b['grpo_steps']} x {b['grpo_prompts']} x {b['grpo_group']}", sec, acc,
          eval_minutes=esec / 60)
    # 4. student four ways at equal steps ---------------------------------------------------------------------------
    n = b["student"]
    flags = trainer_flags(n, b["student_lr"], b["student_warmup"] or max(1, n // 10), b["student_min_lr_ratio"])
    ways = [("student (tiny): SFT on gold final answers", ["sft", bases["tiny"], "--data", answers]),
            ("student: SFT on gold worked solutions", ["sft", bases["tiny"], "--data", task]),
            ("student: sequence distillation (teacher samples, verified)",
             ["distill", "--teacher", teacher, "--student", bases["tiny"], "--data", task, "--mode", "sequence",
              "--samples", b["samples"], "--questions", b["questions"], "--sample-temperature", "0.7",
              "--sample-max-tokens", b["max_new"]]),
            ("student: logit distillation (KL to the teacher)",
             ["distill", "--teacher", teacher, "--student", bases["tiny"], "--data", task, "--mode", "logits",
              "--kd-alpha", b["kd_alpha"], "--kd-temperature", b["kd_temperature"]])]
    keep = None
    for i, (label, argv) in enumerate(ways):
        out = w / f"student-{i + 1}"
        printed, sec = s.timed(s.cli, *argv, "--out", out, *flags, check=False)
        extra = {}
        if (out.parent / f"{out.name}.samples" / "stats.json").exists():
            keep = json.loads((out.parent / f"{out.name}.samples" / "stats.json").read_text())
            extra["keep"] = keep
        if isinstance(printed, int):  # e.g. the teacher solved nothing: no data to distill; the story goes on
            s.row(label, f"not run (exit {printed})", sec, None, **extra)
            continue
        acc, esec = s.timed(s.accuracy, out)
        s.row(label, f"{n}", sec, acc, eval_minutes=esec / 60, **extra)
    return {"task": s.task, "mode": s.mode, "budget": b, "seed": s.seed, "rows": s.rows, "keep": keep,
            "grpo_curve": [{k: c[k] for k in ("step", "lr", "reward", "accuracy", "kl", "response_tokens") if k in c}
                           for c in curve],
            "minutes_total": round((time.time() - s.t0) / 60, 2), "commands": s.commands}


def report(summary: dict) -> str:
    b = summary["budget"]
    lines = [f"post-training story, task `{summary['task']}`, mode {summary['mode']}: {b['train']:,} training "
             f"examples, held-out accuracy on the first {b['eval_n']} of {b['val']} val examples (greedy, exact "
             f"match), {summary['minutes_total']:.1f} min in all", "",
             "| stage | steps | minutes | held-out accuracy | n |", "|---|---|---|---|---|"]
    for r in summary["rows"]:
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
        minutes = r["minutes"] + r.get("eval_minutes", 0)
        lines.append(f"| {r['stage']} | {r['steps']} | {minutes:.1f} | {acc} | {r['n'] or ''} |")
    if summary["keep"]:
        k = summary["keep"]
        lines.append(f"\nrejection sampling: kept {k['kept']} of {k['sampled']} teacher replies (keep rate "
                     f"{k['keep_rate']:.1%}; {k['questions_solved']} of {k['questions']} questions solved at least "
                     f"once)")
    c = summary["grpo_curve"]
    if c:
        half = max(1, len(c) // 2)
        first, last = c[:half], c[half:] or c[-1:]
        mean = lambda xs, k: sum(x[k] for x in xs) / len(xs)  # noqa: E731
        lines.append(f"GRPO reward (sampled, T=1) step 1 -> {len(c)}: {c[0]['reward']:.3f} -> {c[-1]['reward']:.3f}; "
                     f"first-half mean {mean(first, 'reward'):.3f} -> second-half mean {mean(last, 'reward'):.3f}; "
                     f"sampled accuracy {mean(first, 'accuracy'):.3f} -> {mean(last, 'accuracy'):.3f}; final KL "
                     f"{c[-1]['kl']:.4f}")
    return "\n".join(lines)


def _override(text: str) -> tuple[str, object]:
    """'KEY=VALUE' -> (key, value): VALUE read as JSON (numbers, null, [3, 4]), else as a string."""
    key, eq, value = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--short", action="store_true", help="tiny budgets: checks the pipeline (numbers meaningless)")
    group.add_argument("--quick", action="store_true", help="the measured story, about 40 minutes")
    ap.add_argument("--work", default="runs/post-training", help="directory to create for everything")
    ap.add_argument("--overwrite", action="store_true", help="move an existing --work aside (nothing is deleted)")
    ap.add_argument("--seed", type=int, default=0, help="task split seed")
    ap.add_argument("--task", default="reverse", choices=TASKS, help="the verifiable task (default: reverse)")
    ap.add_argument("--size", type=_size_range, default=None, metavar="LO[,HI]",
                    help="the task's difficulty (`dsv3 data tasks --size`; default: the mode's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], type=_override, metavar="KEY=VALUE",
                    help="override one budget knob of the mode (see MODES), e.g. --set grpo_lr=1e-4; repeatable")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 when sharing the CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "short" if args.short else "quick" if args.quick else "default"
    budget = dict(MODES[mode])
    for key, value in args.overrides:
        if key not in budget:
            ap.error(f"--set {key}: not a knob of the mode ({', '.join(sorted(budget))})")
        budget[key] = value
    if args.size is not None:
        budget["size"] = args.size
    work = Path(args.work)
    aside = claim_output(work, args.overwrite, hint="choose another --work")
    if aside is not None:
        print(f"moved the existing {work} to {aside}", file=sys.stderr)
    work.mkdir(parents=True, exist_ok=True)
    story = Story(work, mode, budget, args.seed, args.task)
    summary = run_story(story)
    text = report(summary)
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (work / "report.md").write_text(text + "\n")
    print("\n" + text + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "commands"}))


if __name__ == "__main__":
    main()
