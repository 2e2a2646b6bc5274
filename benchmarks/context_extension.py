"""Context extension on `small`, end to end: pre-train at 256 tokens, teach retrieval at 256, extend to 4,096 in
two phases (YaRN set once for the final length: phase 1 at 1,024, phase 2 at 4,096, as DeepSeek-V3's report does
4K -> 32K -> 128K), and compare against the baselines, on held-out loss by evaluation length and on passkey
retrieval.

Stages (all `small`, one seed, LR 5e-4 unless said):
1. Pre-training (`--base-steps` x 8 x 256 tokens): the bundled corpus plus `--base-retrieval-docs` short retrieval
   documents, digits split (`dsv3 data prepare --split-digits --retrieval-docs N --retrieval-words 20,150`).
2. The retrieval stage, whose result is "the base" of the comparison (`--retrieval-steps` x 8 rows of 256 tokens,
   constant LR): `dsv3 sft` on `dsv3 data retrieval` records, each a stretch of the corpus with a number stated
   under a generated name and recalled at the end, the loss on the recalled number only, with a quarter as many
   plain-text records shuffled in so the model keeps its language. Pre-training alone does not teach `small`
   retrieval in a session's budget (README: the answer is 2 tokens of hundreds under the plain loss). The run stops
   here when the base recalls fewer than `--min-recall` of 100 held-out records exactly (the stage's transition is
   abrupt and its timing varies: README's run had 84%, a run with other retrieval names 41%).
3. Extension (each variant from the same base, LR / 3): `dsv3 sft BASE --extend-context 16 --extend-rope
   yarn|linear|none --seq-len 1024` for `--phase1-steps` x 2 rows, then `--seq-len 4096` for `--phase2-steps` rows,
   on records of the same kinds of 50-700 / 100-2,800 words (none over the row), so that statements and recalls
   lie up to ~4K tokens apart.

Models compared: the pre-trained model (stage 1, for the cost of stage 2), zero-shot (the base, its position limit
raised to 4,096, plain RoPE), YaRN untrained (the base with the YaRN config of the extended runs), and the three
trained variants. None of the training text uses the evaluation's wording (passkey.py). Held-out loss: the
pre-training dataset's val split (two plays never trained on), `evaluate_lengths` at 256, 1,024 and 4,096 tokens
over the same first `--eval-tokens` tokens. Passkey: `passkey_grid` over prompts of 248, 1,016 and 4,088 tokens
(prompt and answer within 256 / 1,024 / 4,096 positions) x depths, `--trials` per cell, greedy exact match; one
heatmap PNG per model.

Everything is written under --work (created; an existing directory is reused stage by stage: a finished stage — a
run with its final checkpoint, a record file, a result file — is not redone, an interrupted run is resumed; a
directory made with other settings is refused, `recipe.json`). `--base RUN --base-data DATA` starts from an
existing 256-token pre-trained run instead of stage 1. With the defaults the whole run took 68 minutes on a 2-core
CPU (two threads): pre-training 8, the retrieval stage 22, each variant's two phases 7-9, each model's evaluation
~2 (README, "Context extension"). The defaults do not meet the issue's passkey target (mean 49%); 800 more
retrieval-stage steps and 500 rows of 4,096 in phase 2 do (mean 98%, worst cell 85%), measured as continuations of
this run with `dsv3` commands (README, "Beyond the defaults"), not yet as one run of this script with
`--retrieval-steps 2400 --phase2-steps 500` (about 2.5 hours with all three variants).

    python benchmarks/context_extension.py --work runs/ctx6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dsv3
from dsv3.config import extended_rope_scaling
from dsv3.runs import Run, resolve_checkpoint, train_setting
from dsv3.tokenizer import load_tokenizer
from dsv3.train.data import prepare, write_retrieval_data
from dsv3.train.evaluate import evaluate_lengths
from dsv3.train.passkey import passkey_grid, plot_passkey
from dsv3.train.trainer import TrainConfig, Trainer, resume_config
from induction_probe import completion_probe

LENGTHS = [256, 1024, 4096]
PASSKEY_LENGTHS = [n - 8 for n in LENGTHS]  # the prompt, so that it and the 7 generated tokens fit in n positions
FACTOR = 16  # 256 -> 4,096


def stage(label: str, t0: float) -> None:
    print(f"[{(time.time() - t0) / 60:5.1f} min] {label}", flush=True)


def train(out: Path, **kw) -> Path:
    """A training run to `out`, resumed when interrupted and skipped when it has its final checkpoint; returns
    that checkpoint."""
    run = Run(out)
    final = run.checkpoint_dir(kw["max_steps"])
    if final not in run.checkpoints():
        if run.latest_checkpoint() is not None:
            Trainer(resume_config(out), resume=True).fit()
        else:  # new, or stopped before its first checkpoint: start over (a started one is moved aside, not deleted)
            Trainer(TrainConfig(out=str(out), progress=False, **kw), overwrite=True).fit()
    return final


def untrained_variant(base: Path, scaling: dict | None) -> dsv3.DeepseekV3:
    """The base weights under another position config (limit 4,096; rope_scaling as given), in memory."""
    model = dsv3.load_pretrained(base)
    cfg = model.config.replace(max_position_embeddings=LENGTHS[-1], rope_scaling=scaling)
    variant = dsv3.DeepseekV3(cfg)
    variant.load_state_dict(model.state_dict())  # the rotary inv_freq is derived from the config, not a weight
    return variant.eval()


def measure(name: str, model, tok, data: Path, work: Path, args) -> dict:
    path = work / f"result-{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    with torch.no_grad():
        losses = evaluate_lengths(model, data, LENGTHS, max_tokens=args.eval_tokens)
        grid = passkey_grid(model, tok, PASSKEY_LENGTHS, args.depths, trials=args.trials, seed=1)
    result = {"name": name, "loss": {str(k): v["loss"] for k, v in losses.items()},
              "by_position": {str(k): v["by_position"] for k, v in losses.items()}, "passkey": grid}
    plot_passkey(grid, work / f"passkey-{name}.png", title=f"passkey retrieval: {name}")
    path.write_text(json.dumps(result, indent=1))
    return result


def transformers_agree(ckpt: Path, data: Path) -> float:
    """Largest |logit difference| between dsv3 and transformers' DeepseekV3ForCausalLM reading `ckpt`, on the
    first 4,096 held-out tokens."""
    import transformers

    from dsv3.train.data import TokenData

    transformers.logging.set_verbosity_error()  # its load report lists the MTP tensors it does not use
    ids = torch.from_numpy(TokenData(data, "val").ids[: LENGTHS[-1]].astype("int64"))[None]
    ours = dsv3.load_pretrained(ckpt).eval()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
    with torch.no_grad():
        return float((ours(ids, mtp=False).logits - hf(input_ids=ids).logits).abs().max())


def records(out: Path, train: int, words: tuple[int, int], text: int, base: Path, max_tokens: int, t0: float) -> Path:
    """`dsv3 data retrieval --out OUT --train N --text M --words A,B --tokenizer BASE --max-tokens T` (skipped when
    written): retrieval records with plain-text records mixed in, none over `max_tokens`."""
    if not (out / "retrieval.json").exists():
        meta = write_retrieval_data(out, train, 500, words, text=text, tokenizer=base, max_tokens=max_tokens)
        stage(f"records {out.name}: {train:,} retrieval + {text:,} text of {words[0]}-{words[1]} words, <= "
              f"{max_tokens} tokens ({sum(meta['dropped'].values())} longer ones redrawn)", t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/context-extension", help="directory for data, runs and results")
    ap.add_argument("--base", help="extend this pre-trained checkpoint or run (trained at 256 tokens) instead of "
                    "pre-training one")
    ap.add_argument("--base-data", help="with --base: its dataset (the held-out split)")
    ap.add_argument("--base-retrieval-docs", type=int, default=20000, help="short one-number retrieval documents "
                    "in the pre-training data")
    ap.add_argument("--base-steps", type=int, default=600, help="pre-training steps at 256 tokens, batch 8")
    ap.add_argument("--retrieval-records", type=int, default=40000, help="retrieval records of the retrieval stage "
                    "(and 1/4 as many text records)")
    ap.add_argument("--retrieval-steps", type=int, default=1600, help="retrieval-stage SFT steps at 256 tokens, "
                    "batch 8")
    ap.add_argument("--long-records", type=int, default=4000, help="retrieval records of each extension phase (and "
                    "1/4 as many text records)")
    ap.add_argument("--phase1-steps", type=int, default=150, help="extension phase 1 steps at 1,024 tokens, batch 2")
    ap.add_argument("--phase2-steps", type=int, default=100, help="extension phase 2 steps at 4,096 tokens, batch 1")
    ap.add_argument("--lr", type=float, default=5e-4, help="LR of pre-training and of the retrieval stage (at 1e-3 "
                    "`small` did not learn benchmarks/copy_task.py's copying in 600 steps, at 5e-4 it did); the "
                    "extension phases use 1/3")
    ap.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens per evaluation length")
    ap.add_argument("--trials", type=int, default=20, help="passkey trials per cell")
    ap.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--variants", default="yarn,linear,none", help="extension trainings to run")
    ap.add_argument("--min-recall", type=float, default=0.5, help="stop after the retrieval stage when the base "
                    "recalls fewer of 100 held-out records exactly (the stage's transition is abrupt and its timing "
                    "varies: README)")
    args = ap.parse_args()
    if bool(args.base) != bool(args.base_data):
        ap.error("--base and --base-data go together")
    if args.base_data and not (Path(args.base_data) / "meta.json").exists():
        ap.error(f"--base-data {args.base_data}: not a dataset (no meta.json)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = {k: v for k, v in vars(args).items()
              if k not in ("eval_tokens", "trials", "depths", "variants", "min_recall")}
    if (work / "recipe.json").exists() and json.loads((work / "recipe.json").read_text()) != recipe:
        ap.error(f"{work} holds the stages of another recipe ({work / 'recipe.json'}): choose another --work")
    (work / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")  # stages found here are reused
    t0 = time.time()
    data = Path(args.base_data) if args.base else work / "data"
    if not (data / "meta.json").exists():
        meta = prepare(data, retrieval_docs=args.base_retrieval_docs, retrieval_words=(20, 150), split_digits=True)
        stage(f"pre-training data: train {meta['splits']['train']['tokens']:,} tokens (with "
              f"{args.base_retrieval_docs} retrieval documents), val {meta['splits']['val']['tokens']:,}", t0)
    common = dict(model_config="small", checkpoint_every=10_000, warmup_steps=20)
    if args.base:
        pretrained = resolve_checkpoint(args.base)
        trained = train_setting(pretrained, "seq_len")
        if trained != LENGTHS[0]:
            ap.error(f"--base {pretrained} was trained at {trained} tokens; this comparison extends a {LENGTHS[0]}-"
                     f"token base {FACTOR}x")
    else:
        pretrained = train(work / "pretrain", data=str(data), seq_len=256, batch_size=8, max_steps=args.base_steps,
                           lr=args.lr, mtp_depth=0, **common)  # later stages keep the checkpoint's MTP depth
        stage(f"pre-trained: {args.base_steps} steps x 8 x 256 = {args.base_steps * 2048:,} tokens -> {pretrained}", t0)
    # the retrieval stage: SFT on retrieval records (the loss on the recalled number) with text records mixed in
    short = records(work / "records-256", args.retrieval_records, (20, 100), args.retrieval_records // 4, pretrained,
                    LENGTHS[0], t0)
    base = train(work / "base", objective="sft", data=str(short), init_from=str(pretrained), seq_len=LENGTHS[0],
                 batch_size=8, max_steps=args.retrieval_steps, lr=args.lr, min_lr_ratio=1.0,
                 **{**common, "warmup_steps": 10})
    tok = load_tokenizer(base)
    with torch.no_grad():  # whether the stage took, before an hour goes into the phases: greedy exact recalls
        exact, n = completion_probe(dsv3.load_pretrained(base).eval(), tok, str(short / "val.jsonl"), 100)
    recall = exact / n
    stage(f"base (retrieval stage): {args.retrieval_steps} steps x 8 rows of 256 tokens -> {base}; held-out recall "
          f"{recall:.0%}", t0)
    if recall < args.min_recall:
        raise SystemExit(f"the retrieval stage did not take: the base recalls {recall:.0%} of 100 held-out records "
                         f"(--min-recall {args.min_recall:.0%}); the extension phases would measure nothing. Try more "
                         f"--retrieval-steps or another pre-training, in a new --work")
    long = [records(work / f"records-{n}", args.long_records, words, args.long_records // 4, base, n, t0)
            for n, words in ((LENGTHS[1], (50, 700)), (LENGTHS[2], (100, 2800)))]
    yarn = extended_rope_scaling("yarn", FACTOR, LENGTHS[0])  # what `--extend-context FACTOR` writes
    results = [measure("pre-trained, before the retrieval stage", untrained_variant(pretrained, None), tok, data,
                       work, args),
               measure("zero-shot", untrained_variant(base, None), tok, data, work, args)]
    stage("measured the pre-trained model and the base, zero-shot", t0)
    results.append(measure("YaRN, untrained", untrained_variant(base, yarn), tok, data, work, args))
    stage("measured YaRN, untrained", t0)
    for variant in args.variants.split(","):
        p1 = train(work / f"{variant}-1024", objective="sft", data=str(long[0]), init_from=str(base),
                   extend_context=FACTOR, extend_rope=variant, seq_len=1024, batch_size=2,
                   max_steps=args.phase1_steps, lr=args.lr / 3, **common)
        p2 = train(work / f"{variant}-4096", objective="sft", data=str(long[1]), init_from=str(p1), seq_len=4096,
                   batch_size=1, max_steps=args.phase2_steps, lr=args.lr / 3, **common)
        stage(f"{variant}: phase 1 {args.phase1_steps} x 2 rows of 1024 tokens, phase 2 {args.phase2_steps} rows "
              f"of 4096 tokens -> {p2}", t0)
        results.append(measure(f"trained, {variant}", dsv3.load_pretrained(p2).eval(), tok, data, work, args))
        stage(f"measured {variant}", t0)
    base_loss = results[1]["loss"]["256"]  # the base: after the retrieval stage, before any extension
    pre = f"the given {pretrained}" if args.base else f"{args.base_steps * 2048:,} tokens at 256"
    print(f"\npre-training: {pre}; retrieval stage {args.retrieval_steps} x 8 rows of 256; extension phases "
          f"{args.phase1_steps} x 2 rows of 1,024 then {args.phase2_steps} rows of 4,096 (YaRN factor {FACTOR}); "
          f"passkey {args.trials} trials per cell, depths {args.depths}\n")
    print("| model | loss @256 | @1024 | @4096 | @256 vs base | passkey mean | worst cell | passkey by length |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        acc = r["passkey"]["accuracy"]
        cells = [c for row in acc for c in row]
        by_len = ", ".join(f"{n}: {sum(row) / len(row):.0%}" for n, row in zip(r["passkey"]["lengths"], acc))
        print(f"| {r['name']} | {r['loss']['256']:.3f} | {r['loss']['1024']:.3f} | {r['loss']['4096']:.3f} | "
              f"{(r['loss']['256'] / base_loss - 1):+.1%} | {sum(cells) / len(cells):.0%} | {min(cells):.0%} | "
              f"{by_len} |")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    if "yarn" in args.variants.split(","):
        diff = transformers_agree(resolve_checkpoint(work / "yarn-4096"), data)
        print(f"\ntransformers reads the YaRN-extended checkpoint: max |logit difference| {diff:.2e} over "
              f"{LENGTHS[-1]} held-out positions")
    stage(f"done; heatmaps in {work}", t0)


if __name__ == "__main__":
    main()
