"""The `dsv3` command line. Each subcommand imports what it needs, so `dsv3 --help` stays fast.

Naming scheme (the same in every subcommand; see `dsv3 --help`):
  --model-config NAME|PATH   a model config: a preset name or a config.json (train, params, cost)
  --config TOML              only ever the training settings file
  CHECKPOINT                 a positional checkpoint directory or training run (its latest checkpoint)
  --out PATH                 always what the command creates (dataset, run, checkpoint, folder, PNG)
  --seq-len N                training / evaluation sample length; --max-len N the serving cache capacity
  --compile/--no-compile     torch.compile the decode step (generate, chat: off; serve: on), or the training
                             layers (train, sft: off)
  --init-from CKPT           train from a checkpoint's weights and config (fresh optimizer; --extend-context F)
  --context-lengths L1,L2    eval: held-out loss per evaluation length and by position
  --device cpu|cuda[:N]      generate, chat, serve, eval: where the model runs (default cpu)
  --precision fp32|bf16      the compute precision: training's GEMMs (train adds fp8), inference's weights and
                             cache (`convert --dtype` is the storage format)
Old spellings (`--preset`, a positional config, `convert SRC DST`) still work and print a one-line warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

SCHEME = """naming scheme, the same in every command:
  --model-config NAME|PATH  model config: a preset (tiny, small, deepseek-v3-671b) or a config.json
  --config TOML             training settings file (dsv3 train only)
  CHECKPOINT                a checkpoint directory, or a training run (meaning its latest checkpoint)
  --out PATH                what the command creates; it never overwrites what it did not create
  --overwrite               move an existing non-empty --out aside (OUT.old-<timestamp>); nothing is deleted
  --seq-len N               training / evaluation sample length   --max-len N  serving cache capacity
  --compile/--no-compile    torch.compile the decode step (generate, chat: off by default; serve: on), or the
                            training layers (train, sft, distill: off)
  --init-from CKPT          train from a checkpoint's weights and config (fresh optimizer); --extend-context F: YaRN
  --context-lengths L1,L2   eval: held-out loss per evaluation length and by position (--out PNG)
  --device cpu|cuda[:N]     generate, chat, serve, eval: where the model runs (default: cpu)
  --precision fp32|bf16     compute precision (train also fp8); `convert --dtype` is the storage format
errors: `dsv3 COMMAND: error: ...` on stderr, exit status 2."""


def _deprecated(old: str, new: str) -> None:
    print(f"dsv3: warning: {old} is deprecated; use {new}", file=sys.stderr)


def _model_config(args: argparse.Namespace) -> str:
    """--model-config, or the deprecated positional config (with a warning)."""
    if args.legacy_config is not None:
        if args.model_config is not None:
            raise _UsageError("give the model config once, as --model-config")
        _deprecated(f"a positional config ({args.legacy_config})", f"--model-config {args.legacy_config}")
        return args.legacy_config
    if args.model_config is None:
        raise _UsageError("the model config is required: --model-config NAME|PATH")
    return args.model_config


class _UsageError(Exception):
    """A wrong combination of flags; printed as `dsv3 CMD: error: ...`."""


def _claim_out(out, overwrite: bool, hint: str = "choose another --out") -> None:
    """--out must be absent or empty; --overwrite moves an existing one aside (and says where), never deletes."""
    from .runs import claim_output

    aside = claim_output(out, overwrite, hint)
    if aside is not None:
        print(f"moved the existing {out} to {aside}", file=sys.stderr)


def _params(args: argparse.Namespace) -> int:
    from .config import get_config
    from .params import count_parameters, print_report

    name = _model_config(args)
    print_report(count_parameters(get_config(name)), name)
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from .train.data import given_tokenizer, prepare
    from .train.passkey import RETRIEVAL_MAX_KEYS

    inputs = args.paths or None
    if inputs and args.corpus:
        raise _UsageError("give either --corpus or input paths, not both")
    if args.retrieval_keys > RETRIEVAL_MAX_KEYS or (args.retrieval_keys > 1 and not args.retrieval_docs):
        raise _UsageError(f"--retrieval-keys {args.retrieval_keys}: 1 to {RETRIEVAL_MAX_KEYS} numbers per retrieval "
                          "document (each under its own name), with --retrieval-docs")
    if args.tokenizer:
        if args.vocab_size or args.split_digits:
            raise _UsageError("--tokenizer encodes with an existing tokenizer; --vocab-size and --split-digits shape "
                              "a new one: give one or the other")
        out, source = os.path.realpath(args.out), os.path.realpath(args.tokenizer)
        if source == out or source.startswith(out + os.sep):
            raise _UsageError(f"--tokenizer {args.tokenizer} lies inside --out {args.out}, which this command replaces")
        given_tokenizer(args.tokenizer)  # a bad one fails before --overwrite moves anything aside
    _claim_out(args.out, args.overwrite)
    sizes = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    meta = prepare(args.out, inputs, val_fraction=args.val_fraction, retrieval_docs=args.retrieval_docs,
                   retrieval_words=tuple(args.retrieval_words), retrieval_keys=args.retrieval_keys,
                   copy_docs=args.copy_docs, split_digits=args.split_digits, tokenizer=args.tokenizer, **sizes)
    for split, s in meta["splits"].items():
        print(f"{split}: {s['tokens']:,} tokens from {len(s['documents'])} document(s), {s['bytes']:,} bytes")
    print(f"vocab {meta['vocab_size']:,}; written to {args.out}")
    return 0


def _data_tasks(args: argparse.Namespace) -> int:
    from .tasks import TASKS, TaskError, write_task_data

    if args.task not in TASKS:
        raise _UsageError(f"--task {args.task}: choose one of {', '.join(TASKS)}")
    _claim_out(args.out, args.overwrite)
    try:
        meta = write_task_data(args.out, args.task, args.train, args.val, args.seed, args.size)
    except TaskError as e:
        raise _UsageError(str(e)) from None
    print(f"{meta['task']}: {meta['train']:,} train and {meta['val']:,} held-out examples (seed {meta['seed']}, "
          f"size {meta['size'][0]}-{meta['size'][1]}) written to {args.out}")
    return 0


def _data_retrieval(args: argparse.Namespace) -> int:
    from .train.data import write_retrieval_data
    from .train.passkey import RETRIEVAL_MAX_KEYS

    if (args.tokenizer is None) != (args.max_tokens is None):
        raise _UsageError("--max-tokens and --tokenizer go together (records are measured in that tokenizer's tokens)")
    if args.keys > RETRIEVAL_MAX_KEYS:
        raise _UsageError(f"--keys {args.keys}: 1 to {RETRIEVAL_MAX_KEYS} numbers per retrieval record")
    _claim_out(args.out, args.overwrite)
    meta = write_retrieval_data(args.out, args.train, args.val, tuple(args.words), args.seed, text=args.text,
                                tokenizer=args.tokenizer, max_tokens=args.max_tokens, keys=args.keys)
    text = f" (and {meta['text']:,} text records)" if meta["text"] else ""
    dropped = sum(meta["dropped"].values())
    dropped = f"; {dropped:,} over {meta['max_tokens']} tokens dropped" if meta["max_tokens"] else ""
    keys = f", {meta['keys']} numbers each" if meta["keys"] > 1 else ""
    print(f"retrieval: {meta['train']:,} train{text} and {meta['val']:,} held-out prompt-completion records of "
          f"{meta['words'][0]}-{meta['words'][1]} words{keys} (seed {meta['seed']}) written to {args.out}{dropped}")
    return 0


# ------------------------------------------------------------------------------------------------ train
def _train_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (but `skip`): its help text and closed set of values come from the field."""
    from .train.trainer import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text, choices = f.metadata["help"], f.metadata["choices"]
        if f.name == "progress":
            p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
            continue
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default: {'on' if f.default else 'off'})")
            continue
        # a field that defaults to None takes the type its annotation names ("int | None" -> int)
        typ = type(f.default) if f.default is not None else {"int": int, "float": float, "str": str}[
            str(f.type).split(" | ")[0]]
        default = "" if f.default is None else f" (default: {f.default})"
        p.add_argument(flag, dest=f.name, type=typ, default=None, choices=choices, help=help_text + default,
                       metavar=None if choices else f.name.upper())
    p.add_argument("--preset", dest="legacy_preset", default=None, help=argparse.SUPPRESS)


def _train_overrides(args: argparse.Namespace) -> dict:
    from .train.trainer import TrainConfig

    if args.legacy_preset is not None:
        if args.model_config is not None:
            raise _UsageError("give the model config once, as --model-config")
        _deprecated("--preset", "--model-config")
        args.model_config = args.legacy_preset
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name, None) is not None}


def _train(args: argparse.Namespace) -> int:
    from .train.trainer import TrainConfig, Trainer, resume_config

    overrides = _train_overrides(args)
    if args.resume:
        if args.config:
            raise _UsageError("--resume continues a run with its own settings; --config cannot be combined with it")
        cfg = resume_config(args.resume, **overrides)
    else:
        cfg = TrainConfig.from_toml(args.config, **overrides) if args.config else TrainConfig(**overrides)
    if cfg.pp > 1:
        from .train.pipeline_trainer import PipelineTrainer as Trainer  # noqa: N806
    if args.resume and args.overwrite:
        raise _UsageError("--resume continues the run; --overwrite would move it aside: give one of them")
    trainer = Trainer(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    if trainer.moved_aside is not None:
        print(f"moved the existing {cfg.out} to {trainer.moved_aside}", file=sys.stderr)
    if args.resume and trainer.main_rank:
        print(f"resuming {args.resume} at step {trainer.step}")
    if trainer.world > 1:  # each rank says what it holds (its shard), so a layout's memory split is visible
        from .model import DeepseekV3

        held, whole = trainer.held_memory(), DeepseekV3(trainer.model.config, device="meta").num_parameters()
        copies = " (DualPipe: two stage copies)" if cfg.pp > 1 and cfg.pp_schedule == "dualpipe" else ""
        print(f"rank {trainer.rank} of {trainer.world} holds {held['parameters']:,} parameters of the model's "
              f"{whole:,}{copies} ({held['parameter_bytes'] / 2**20:.1f} MiB)", flush=True)
    if cfg.precision == "fp8":  # what actually runs in FP8 here (a wrapper that lost it would show)
        f = trainer.fp8_inventory()
        who = f"rank {trainer.rank}: " if trainer.world > 1 else ""
        print(f"{who}FP8 GEMMs in {f['fp8_linears']} of {f['fp8_linears'] + f['high_linears']} linears (the "
              f"output head stays high precision) and {f['fp8_expert_groups']} of "
              f"{f['fp8_expert_groups'] + f['high_expert_groups']} routed-expert groups", flush=True)
    last = trainer.fit()
    if not trainer.main_rank:
        return 0
    if last is None:
        print(f"nothing to do: {cfg.out} is already at step {trainer.step} of {trainer.total_steps}")
    else:
        print(f"step {last.step}: loss {last.loss:.4f}, {last.tokens_per_s:,.0f} tokens/s, "
              f"MaxVio {max(last.max_vio, default=0):.3f}; checkpoints in {trainer.run.checkpoints_dir}")
    return 0


def _sft(args: argparse.Namespace) -> int:
    """`dsv3 sft BASE --data FILE.jsonl --out RUN`: `dsv3 train --objective sft --init-from BASE` (train.sft)."""
    if args.resume:
        if args.base is not None:
            raise _UsageError("--resume continues an SFT run with its own base; do not give BASE")
    elif args.base is None:
        raise _UsageError("the checkpoint to fine-tune is required: dsv3 sft BASE --data FILE.jsonl --out RUN")
    args.objective = "sft"
    args.init_from = args.base
    return _train(args)


def _distill(args: argparse.Namespace) -> int:
    """`dsv3 distill --teacher T --student S --data TASK_OR_FILE --mode sequence|logits --out RUN`."""
    from pathlib import Path

    from .tasks import TASKS, TaskError, make_splits, read_task_records

    if args.resume:
        raise _UsageError("continue a distillation run with `dsv3 sft --resume RUN`")
    args.objective, args.init_from = "sft", args.student
    if args.mode == "logits":
        args.teacher = args.teacher_ckpt
        return _train(args)
    # sequence: the teacher's verified replies become the student's SFT data
    from .posttrain.distill import rejection_sample, write_samples

    samples_dir = Path(f"{args.out}.samples")
    _claim_out(args.out, args.overwrite)
    _claim_out(samples_dir, args.overwrite)
    try:
        if args.data in TASKS:
            records = [e.record() for e in make_splits(args.data, args.questions, 0, args.seed or 0)[0]]
        else:
            path = Path(args.data)
            records = read_task_records(path / "train.jsonl" if path.is_dir() else path)[: args.questions]
    except TaskError as e:
        raise _UsageError(str(e)) from None
    show = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show:
            print(f"\rteacher sampling {done}/{total}", end="" if done < total else "\n", file=sys.stderr)

    kept, stats = rejection_sample(args.teacher_ckpt, records, args.samples, args.sample_temperature,
                                   args.sample_max_tokens, args.seed or 0, progress=progress)
    write_samples(samples_dir, kept, stats)
    print(f"teacher: kept {stats['kept']} of {stats['sampled']} replies (keep rate {stats['keep_rate']:.3f}, "
          f"{stats['questions_solved']} of {stats['questions']} questions solved) -> {samples_dir}")
    if not kept:
        raise _UsageError("the teacher solved no question: nothing to distill (see the keep rate above)")
    args.data, args.teacher, args.overwrite = str(samples_dir), None, False
    return _train(args)


def _grpo(args: argparse.Namespace) -> int:
    """`dsv3 grpo POLICY --task NAME --out RUN` (or `--resume RUN`): GRPO on a verifiable task (posttrain.grpo)."""
    from pathlib import Path

    from .posttrain.grpo import GRPOConfig, GRPOError, run_grpo

    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.resume:
        if args.policy is not None or args.task is not None or args.out is not None or args.overwrite:
            raise _UsageError("--resume RUN continues a GRPO run with its own settings: give only --steps (to "
                              "extend it) besides")
        try:
            saved = json.loads((Path(args.resume) / "grpo_config.json").read_text())
        except (OSError, ValueError) as e:
            raise _UsageError(f"--resume {args.resume}: not a GRPO run ({e})") from None
        given = {**saved, **{k: v for k, v in given.items() if k == "steps"}}
    elif args.policy is None or args.task is None or args.out is None:
        raise _UsageError("give POLICY, --task and --out (or --resume RUN)")
    cfg = GRPOConfig(**given)
    try:
        cfg.validate()
    except GRPOError as e:
        raise _UsageError(str(e)) from None
    if not args.resume:
        _claim_out(cfg.out, args.overwrite)
    try:
        history = run_grpo(cfg, log=print if args.progress else (lambda _: None), resume=bool(args.resume))
    except GRPOError as e:
        raise _UsageError(str(e)) from None
    if not history:
        print(f"nothing to do: {cfg.out} is already at step {cfg.steps}")
        return 0
    first, last = history[0], history[-1]
    print(f"{cfg.steps} steps: reward {first['reward']:.3f} -> {last['reward']:.3f}, sampled accuracy "
          f"{first['accuracy']:.3f} -> {last['accuracy']:.3f}; checkpoint in {cfg.out}/checkpoints")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .runs import resolve_checkpoint, train_setting
    from .train.evaluate import evaluate

    ckpt = resolve_checkpoint(args.checkpoint)
    if args.task:
        return _task_eval(args, ckpt)
    if args.lm_eval:
        return _lm_eval(args, ckpt)
    if args.lm_eval_include or args.limit is not None:
        raise _UsageError("--lm-eval-include and --limit go with --lm-eval TASKS")
    data = args.data or train_setting(ckpt, "data")
    seq_len = args.seq_len or train_setting(ckpt, "seq_len") or 256
    if not data:
        raise _UsageError("this checkpoint does not record its dataset; pass --data DIR")
    model = _load_model(args, ckpt)
    if args.passkey:
        return _passkey(args, ckpt, model)
    if args.context_lengths:
        from .train.evaluate import EvalError, evaluate_lengths, plot_lengths

        if args.out:
            _claim_out(args.out, args.overwrite)
        try:
            by_length = evaluate_lengths(model, data, args.context_lengths, max_tokens=args.max_tokens or 16384)
        except EvalError as e:
            raise _UsageError(str(e)) from None
        print(json.dumps({"checkpoint": str(ckpt), "data": str(data), "context_lengths": by_length}, indent=2))
        if args.out:
            print(plot_lengths(by_length, args.out, f"{ckpt.name}: held-out loss by position"), file=sys.stderr)
        return 0
    result = evaluate(model, data, seq_len=seq_len, max_tokens=args.max_tokens)
    print(json.dumps({"checkpoint": str(ckpt), "data": str(data), **result}, indent=2))
    return 0


def _task_eval(args: argparse.Namespace, ckpt) -> int:
    """`dsv3 eval CKPT --task NAME|FILE`: greedy held-out accuracy on a verifiable task (`posttrain.evaluate`);
    NAME draws the held-out split `dsv3 data tasks --task NAME` writes for the same --seed (the first
    --task-examples of it), FILE is such a val.jsonl (or a task directory holding one)."""
    from pathlib import Path

    from .posttrain.evaluate import task_accuracy
    from .tasks import TASKS, TaskError, make_splits, read_task_records
    from .tokenizer import ChatTemplate, load_tokenizer, stop_token_ids

    if args.lm_eval or args.passkey or args.context_lengths:
        raise _UsageError("--task does not combine with --lm-eval, --passkey or --context-lengths")
    try:
        if args.task in TASKS:
            records = [e.record() for e in make_splits(args.task, 0, args.task_examples, args.seed)[1]]
        else:
            path = Path(args.task)
            path = path / "val.jsonl" if path.is_dir() else path
            if not path.is_file():
                raise _UsageError(f"--task {args.task}: neither a task ({', '.join(TASKS)}) nor a JSONL file")
            records = read_task_records(path)[: args.task_examples]
    except TaskError as e:
        raise _UsageError(str(e)) from None
    model, tok = _load_model(args, ckpt), load_tokenizer(ckpt)
    show = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show:
            print(f"\r{args.task}: {done}/{total}", end="" if done < total else "\n", file=sys.stderr)

    result = task_accuracy(model, tok, ChatTemplate(ckpt), records, stop_token_ids(tok, ckpt),
                           max_new_tokens=args.max_new_tokens, progress=progress)
    print(json.dumps({"checkpoint": str(ckpt), "task": args.task, **result}, indent=2))
    return 0


def _lm_eval(args: argparse.Namespace, ckpt) -> int:
    """`dsv3 eval CKPT --lm-eval TASKS`: lm-eval's tasks on the model in this process (`infer/harness.py`); lm-eval's
    "results" (task -> metric -> value) as JSON on stdout. Without lm-eval installed: an error naming the extra."""
    if args.passkey or args.context_lengths:
        raise _UsageError("--lm-eval runs lm-eval's tasks; it does not combine with --passkey or --context-lengths")
    from .infer.harness import evaluate_tasks  # LmEvalMissing (a Dsv3Error) names the extra when lm-eval is absent
    from .tokenizer import load_tokenizer

    model = _load_model(args, ckpt)
    result = evaluate_tasks(model, load_tokenizer(ckpt), args.lm_eval, include=args.lm_eval_include,
                            limit=args.limit, checkpoint=ckpt, max_length=args.seq_len)
    print(json.dumps(result["results"], indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
    return 0


def _passkey(args: argparse.Namespace, ckpt, model) -> int:
    """`dsv3 eval CKPT --passkey`: the lengths x depths grid (`train.passkey`), JSON on stdout, a heatmap PNG."""
    from .tokenizer import load_tokenizer
    from .train.passkey import passkey_grid, plot_passkey

    if args.out:
        _claim_out(args.out, args.overwrite)
    lengths = args.context_lengths or [n for n in (256, 1024, 4096) if n + 8 <= model.config.max_position_embeddings]
    show = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show:
            print(f"\rpasskey {done}/{total}", end="" if done < total else "\n", file=sys.stderr)

    try:
        result = passkey_grid(model, load_tokenizer(ckpt), lengths, args.depths, args.trials, args.seed,
                              progress=progress)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    cells = [a for row in result["accuracy"] for a in row]
    print(json.dumps({"checkpoint": str(ckpt), "passkey": result, "mean_accuracy": sum(cells) / len(cells),
                      "worst_cell": min(cells)}, indent=2))
    if args.out:
        print(plot_passkey(result, args.out, f"{ckpt.name}: passkey retrieval"), file=sys.stderr)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .train.plots import plot_run

    if args.out:
        from .runs import read_metrics

        read_metrics(args.run)  # a missing run is the error to report, before anything is moved
        _claim_out(args.out, args.overwrite)
    for path in plot_run(args.run, args.out):
        print(path)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from .train.simulate import plot_simulation, simulate

    hist = simulate(n_experts=args.experts, n_group=args.groups, topk_group=args.topk_groups, top_k=args.top_k,
                    steps=args.steps, gamma=args.gamma, skew=args.skew, seed=args.seed)
    for mode, h in hist.items():
        v = h["max_vio"]
        tail = sum(v[-20:]) / len(v[-20:])
        print(f"{mode:>9}: MaxVio {v[0]:.3f} at step 1 -> {tail:.3f} (mean of the last 20 steps)")
    print(plot_simulation(hist, args.out))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(minutes=args.minutes, data_dir=args.data, run_dir=args.out, overwrite=args.overwrite)


def _convert(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_pretrained, save_pretrained
    from .runs import resolve_checkpoint

    if args.legacy_dst is not None:
        if args.out is not None:
            raise _UsageError("give the destination once, as --out")
        _deprecated(f"`convert SRC DST` ({args.legacy_dst})", f"--out {args.legacy_dst}")
        args.out = args.legacy_dst
    if args.out is None:
        where = "--out FILE.gguf" if args.format == "gguf" else "--out DIR"
        raise _UsageError(f"the destination is required: {where}")
    if args.format == "gguf":
        return _convert_gguf(args)
    if args.dtype is None:
        raise _UsageError("--dtype is required: fp8, bf16 or fp32")
    if args.dtype == "fp16":
        raise _UsageError("--dtype fp16 is for --format gguf; a checkpoint is stored as fp8, bf16 or fp32")
    dtype = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    src = resolve_checkpoint(args.checkpoint)
    if not args.overwrite:
        _claim_out(args.out, False)  # refuse before the (long) load
    model = load_pretrained(src)
    extra = {f.name: f.read_bytes() for f in src.iterdir()
             if f.name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")}
    _claim_out(args.out, args.overwrite)
    dst = save_pretrained(model, args.out, dtype=dtype, extra_files=extra)
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(f"wrote {dst} ({args.dtype}, {size / 2**20:.1f} MiB of safetensors)")
    return 0


def _convert_gguf(args: argparse.Namespace) -> int:
    """`dsv3 convert CKPT --out FILE.gguf --format gguf [--dtype fp32|fp16|bf16]`: llama.cpp's deepseek2 file."""
    from pathlib import Path

    from .gguf_export import export_gguf
    from .runs import resolve_checkpoint

    storage = {None: "f32", "fp32": "f32", "fp16": "f16", "bf16": "bf16"}.get(args.dtype)
    if storage is None:
        raise _UsageError(f"--dtype {args.dtype}: a GGUF file is written as fp32, fp16 or bf16")
    out = Path(args.out)
    if out.is_dir():
        raise _UsageError(f"--out {out} is a directory; give the .gguf file to write")
    src = resolve_checkpoint(args.checkpoint)
    _claim_out(out, args.overwrite)  # an existing file is refused, or moved aside with --overwrite
    export_gguf(src, out, storage, progress=sys.stderr.isatty())
    print(f"wrote {out} (GGUF, deepseek2, {args.dtype or 'fp32'}, {out.stat().st_size / 2**20:.1f} MiB; the MTP "
          f"modules are not exported)")
    return 0


def _runs_upgrade(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .runs import LEGACY_TRAINER_STATE, Run, RunError, upgrade_trainer_state

    path = Path(args.run)
    ckpts = [path] if (path / "config.json").exists() else Run(path).checkpoints()
    old = [c for c in ckpts if (c / LEGACY_TRAINER_STATE).exists()]
    if not old:
        raise RunError(f"{path}: no {LEGACY_TRAINER_STATE} to convert (not an older dsv3 run or checkpoint)")
    for ckpt in old:
        written = upgrade_trainer_state(ckpt)
        print(f"{ckpt}: " + (f"wrote {', '.join(f.name for f in written)}" if written else "already converted")
              + f"; {LEGACY_TRAINER_STATE} left in place (no longer read)")
    return 0


def _cost(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .config import get_config
    from .cost import pipeline_bubbles, training_cost

    name = _model_config(args)
    cfg = get_config(name)
    est = training_cost(cfg, args.tokens, args.gpus, args.gpu, args.mfu, args.seq_len, args.price)
    console = Console()
    console.print(f"{name}: {est.flops_per_token / 1e9:.1f} GFLOP per trained token at {args.seq_len} "
                  f"context (forward + backward, MTP included)")
    console.print(f"{args.tokens:.4g} tokens: {est.total_flops:.3e} FLOP = {est.gpu_hours / 1e6:.3f}M "
                  f"{args.gpu.upper()} GPU-hours at {args.mfu:.0%} MFU (of the dense BF16 peak) = "
                  f"{est.wall_days:.1f} days on {args.gpus} GPUs = ${est.dollars / 1e6:.2f}M at ${args.price}/GPU-hour")
    table = Table(title=f"pipeline bubble, PP={args.pp}, {args.micro_batches} micro-batches, F=1 B=2 W=1",
                  title_justify="left")
    for col in ("schedule", "bubble (x F)", "share of step", "parameters", "activations"):
        table.add_column(col)
    for sched, b in pipeline_bubbles(args.pp, args.micro_batches).items():
        table.add_row(sched, f"{b['bubble']:.1f}", f"{b['fraction']:.1%}", b["parameters"], b["activations"])
    console.print(table)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .config import get_config
    from .cost import GPU_MEMORY_GB
    from .parallel.plan import Layout, latent_cache_bytes, plan, saved_activations

    name = _model_config(args)
    cfg = get_config(name)
    seq_len = args.seq_len or min(4096, cfg.max_position_embeddings)
    layout = Layout(pp=args.pp, dp=args.dp, ep=args.ep, zero=args.zero, schedule=args.pp_schedule,
                    optimizer_state_dtype="bf16" if args.recipe == "paper" else args.optimizer_state_dtype,
                    recipe=args.recipe, rows=args.micro_batch,
                    seq_len=seq_len, chunks=args.pp_chunks)
    if args.ranks is not None:
        ranks = args.ranks
    elif layout.world <= 8:
        ranks = list(range(layout.world))
    else:  # one rank per distinct pipeline position: the first, a middle and the last stage
        ranks = sorted({s * layout.dp * layout.ep for s in (0, layout.pp // 2, layout.pp - 1)})
    if any(not 0 <= r < layout.world for r in ranks):
        raise _UsageError(f"--ranks must lie in 0..{layout.world - 1} for {layout.world} ranks")
    try:
        rows = plan(cfg, layout, ranks)
        # the dry run builds dsv3's own trainer: it is held against the dsv3 recipe's tensors (under FSDP2, those
        # it builds before sharding them)
        ours = dataclasses.replace(layout, recipe="dsv3", zero=0 if layout.zero == 3 else layout.zero)
        built = _plan_dry_run(name, ours, plan(cfg, ours, ranks)) if args.dry_run else None
    except ValueError as e:
        raise _UsageError(str(e)) from None
    memory = args.gpu_memory if args.gpu_memory is not None else GPU_MEMORY_GB[args.gpu]
    worst = max(rows, key=lambda m: m.total_bytes)
    fits = worst.total_bytes <= memory * 1e9
    states_fit = max(m.total_bytes - m.activation_bytes for m in rows) <= memory * 1e9
    block = "moe" if cfg.n_routed_experts else "dense"
    items = saved_activations(cfg, block, layout.rows, seq_len, layout.recipe)
    largest_item = max(items, key=lambda item: item[1])
    if args.json:
        print(json.dumps({"model_config": name, "layout": dataclasses.asdict(layout), "gpu_memory_gb": memory,
                          "ranks": [dataclasses.asdict(m) | {"total_bytes": m.total_bytes} for m in rows],
                          "fits": fits, "states_fit": states_fit,
                          "modelled": ["parameters", "gradients", "optimizer state", "activations"],
                          f"{block}_layer_activations": [{"what": w, "bytes": b} for w, b in items],
                          "serving_cache_bytes": latent_cache_bytes(cfg, args.serve_tokens) if args.serve_tokens
                          else None,
                          "dry_run": built}, indent=1))
        return 0
    unit, size = ("GiB", 2**30) if worst.total_bytes >= 2**30 else ("MiB", 2**20)
    recipe = ("the report's recipe (bf16 weights, fp32 gradients and masters, bf16 moments, recomputation, FP8 "
              "caching)" if layout.recipe == "paper" else f"dsv3's trainer (fp32, AdamW moments "
              f"{layout.optimizer_state_dtype})")
    sharding = {1: ", ZeRO-1", 3: ", FSDP2"}.get(layout.zero, "")
    table = Table(title=f"{name} on pp {layout.pp} x dp {layout.dp} x ep {layout.ep} = {layout.world} ranks, "
                        f"{layout.schedule}{sharding}; {recipe}; micro-batches of {layout.rows} x {seq_len} tokens; "
                        f"bytes in {unit}", title_justify="left")
    for col in ("rank", "pp,dp,ep", "parameters", "params", "grads", "optimizer", "in flight", "activations",
                "total"):
        table.add_column(col, justify="right")
    for m in rows:
        table.add_row(str(m.rank), f"{m.pp_index},{m.dp_index},{m.ep_index}", _count_text(m.parameters),
                      *(f"{b / size:.2f}" for b in (m.parameter_bytes, m.gradient_bytes, m.optimizer_state_bytes)),
                      f"{m.in_flight:g}", f"{m.activation_bytes / size:.2f}", f"{m.total_bytes / size:.2f}")
    console = Console()
    for b in built or []:
        console.print(f"dry run: rank {b['rank']} built {b['parameters']:,} parameters "
                      f"({b['parameter_bytes'] / 2**30:.2f} GiB) on meta, as planned; routed-expert stacks "
                      + (", ".join(str(s) for s in b["expert_stacks"]) or "none"))
    console.print(table)
    terms = {"parameters": worst.parameter_bytes, "gradients": worst.gradient_bytes,
             "optimizer state": worst.optimizer_state_bytes, "activations": worst.activation_bytes}
    if args.serve_tokens:
        cache = latent_cache_bytes(cfg, args.serve_tokens)
        console.print(f"serving: a latent cache of {args.serve_tokens:,} tokens takes {cache / 1e9:.2f} GB in bf16 "
                      f"({cfg.num_hidden_layers + cfg.num_nextn_predict_layers} layers x (kv_lora_rank "
                      f"{cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim}) x 2 B per token) on a GPU holding every "
                      "layer (the report's decoding setup)")
    verdict = "fits" if fits else "does NOT fit" + ("" if not states_fit else " (the states alone would)")
    console.print(f"largest: rank {worst.rank}, {worst.total_bytes / 1e9:.1f} GB of {memory:g} GB: {verdict}; "
                  f"largest term: {max(terms, key=terms.get)}; largest saved activation of a {block} layer: "
                  f"{largest_item[0]} ({largest_item[1] / sum(b for _, b in items):.0%} of its "
                  f"{sum(b for _, b in items) / 1e6:,.0f} MB per micro-batch). Not counted: temporary buffers "
                  "(all-to-all, gathered weights, the allocator's fragmentation). Every assumption: "
                  "dsv3/parallel/plan.py")
    return 0


def _count_text(n: int) -> str:
    """1234 -> '1,234'; 7088222208 -> '7.09B' (a column that fits a terminal)."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:,}"


def _plan_dry_run(name: str, layout, rows) -> list[dict]:
    """Build each planned rank's share with the trainer itself, on the meta device under a fake process group
    (one rank at a time, in this process), and check it holds exactly the parameters the planner counted.
    Returns per rank: rank, parameters, parameter_bytes, expert_stacks (the shapes of its routed-expert tensors)."""
    import torch.distributed as dist

    try:  # torch's fake process group (as torchtitan's dry runs use it): collectives that move nothing
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError:
        raise _UsageError("--dry-run needs torch's fake process group (torch.testing._internal.distributed."
                          "fake_pg), which this torch lacks; dsv3 pins the torch it was tested with") from None

    from .config import get_config
    from .train.trainer import TrainConfig, Trainer

    if dist.is_initialized():
        raise _UsageError("--dry-run sets up its own fake process group; run it outside torchrun")
    chunks = 2 * layout.pp
    cfg = TrainConfig(model_config=name, max_steps=1, pp=layout.pp, dp=layout.dp, ep=layout.ep,
                      zero=int(layout.zero), pp_schedule=layout.schedule, device="cpu",
                      optimizer_state_dtype=layout.optimizer_state_dtype,
                      batch_size=chunks * layout.dp * layout.ep if layout.pp > 1 else layout.world,
                      seq_len=min(256, get_config(name).max_position_embeddings))
    if layout.pp > 1:
        from .train.pipeline_trainer import PipelineTrainer as Trainer  # noqa: N806
    built = []
    for m in rows:
        dist.init_process_group("fake", store=FakeStore(), rank=m.rank, world_size=layout.world)
        try:
            trainer = Trainer(cfg, dry_run=True)
            held = trainer.held_memory()
            stacks = sorted({tuple(p.shape) for mod in trainer._held_modules()
                             for n, p in mod.named_parameters() if ".experts." in n})
        finally:
            dist.destroy_process_group()
        if held["parameters"] != m.parameters:
            raise RuntimeError(f"the dry run of rank {m.rank} built {held['parameters']:,} parameters, the "
                               f"planner counted {m.parameters:,}: a bug in dsv3, please report it")
        built.append({"rank": m.rank, **held, "expert_stacks": [list(s) for s in stacks]})
    return built


# ------------------------------------------------------------------------------------------------ inference
def _compute_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="weights, activations and latent cache in this precision (default: fp32; on CPU fp32 is "
                        "the faster one)")


def _load_model(args: argparse.Namespace, ckpt):
    """The checkpoint's model on --device in --precision, for inference.

    Raises:
        _UsageError: a device torch cannot parse, or CUDA asked for where there is none (or not that index).
    """
    import torch

    from .checkpoint import load_pretrained

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise _UsageError(f"--device {args.device}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise _UsageError(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}"
                              f"{', a CPU-only build' if torch.version.cuda is None else ''})")
        if device.index is not None and device.index >= count:
            raise _UsageError(f"--device {args.device}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise _UsageError(f"--device {args.device}: only cpu and cuda[:N] are supported")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    return load_pretrained(ckpt, dtype=dtype, device=device).eval()


def _load_for_inference(args: argparse.Namespace):
    from .runs import resolve_checkpoint
    from .tokenizer import load_tokenizer

    ckpt = resolve_checkpoint(args.checkpoint)
    return ckpt, _load_model(args, ckpt), load_tokenizer(ckpt)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _comma_list(cast, ok, what: str):
    """An argparse type for 'a,b,c': each item cast (int, float) and checked by ok(value); `what` names the
    rule in the error."""
    def parse(text: str) -> list:
        try:
            values = [cast(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"a comma-separated list of {what}, got {text!r}")
        return values
    return parse


_length_list = _comma_list(int, lambda n: n >= 2, "token counts of at least 2")  # '256,1024,4096'
_fraction_list = _comma_list(float, lambda f: 0 <= f <= 1, "fractions in [0, 1]")  # '0,0.5,1'
_word_counts = _comma_list(int, lambda n: n >= 1, "word counts of at least 1")  # '50,2800'


def _word_range(text: str) -> list[int]:
    """'MIN,MAX' -> [min, max]: word counts of at least 1 with MIN <= MAX (`--retrieval-words`, `--words`)."""
    values = _word_counts(text)
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"MIN,MAX with MIN <= MAX, got {text!r}")
    return values


def _size_range(text: str) -> tuple[int, int]:
    """'LO,HI' or 'N' (= N,N) -> (lo, hi): a task size range of `dsv3 data tasks --size` (the task checks its
    own limits)."""
    values = _comma_list(int, lambda n: n >= 1, "one or two sizes of at least 1")(text)
    if len(values) > 2 or values[0] > values[-1]:
        raise argparse.ArgumentTypeError(f"LO or LO,HI with LO <= HI, got {text!r}")
    return values[0], values[-1]


def _count(text: str) -> float:
    from .cost import parse_count

    try:
        return parse_count(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 14.8T, 500B, 1e9)") from None


def _sampling_flags(p: argparse.ArgumentParser, max_new: int, prefix_mb: int = 0) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=max_new, help=f"(default: {max_new})")
    p.add_argument("--max-len", type=_positive_int, default=None,
                   help="cache capacity per sequence, prompt + output (default: the model's context)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=_positive_int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of mass p")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    _decode_flags(p, compile_default=False, prefix_mb=prefix_mb)
    _compute_flags(p)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


PREFILL_CHUNK = 256  # tokens; benchmarks/long_prompts.py measures the stall it bounds
PREFILL_SHARE = 0.5  # mean inter-token latency of running requests at most ~2x while a long prompt is prefilled
EXPERT_STATS_WINDOW = 256  # serve: the page's live expert counts cover the last this-many decode steps
PREFIX_CACHE_MB = 256  # chat and serve: ~120K tokens of `small`'s latent rows (fp32), ~3.8K of the 671B model's (bf16)


def _decode_flags(p: argparse.ArgumentParser, compile_default: bool, prefix_mb: int = 0) -> None:
    p.add_argument("--speculative", choices=["mtp", "none"], default="none",
                   help="MTP speculative decoding: the MTP module drafts, the model verifies (default: none; on "
                        "the small preset it pays eagerly, 1.23x at batch 8, but with --compile on a CPU batch-1 "
                        "decoding is faster without it; README)")
    p.add_argument("--draft-tokens", type=_positive_int, default=3, metavar="K",
                   help="with --speculative mtp: drafts per step, chained through the MTP module (default: 3, "
                        "the fastest k on the small preset, eager and compiled; README)")
    p.add_argument("--draft-vocab", type=_positive_int, default=None, metavar="N",
                   help="with --speculative mtp: draft only among the N tokens the tokenizer ranks most frequent "
                        "(its BPE merge order) and the stop tokens, a cheaper draft head; the output is unchanged "
                        "(default: the whole vocabulary)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=compile_default,
                   help="torch.compile the decode step: faster steps after a compilation of about a minute per "
                        f"batch size on a laptop CPU (default: {'on' if compile_default else 'off'})")
    p.add_argument("--prefill-chunk", type=_positive_int, default=PREFILL_CHUNK, metavar="TOKENS",
                   help="prefill a longer prompt this many tokens per step, between the running requests' decode "
                        f"steps; also bounds prefill memory (default: {PREFILL_CHUNK})")
    p.add_argument("--prefill-share", type=_fraction, default=PREFILL_SHARE, metavar="F",
                   help="the most of the time a long prompt's chunks may take while other requests decode, in "
                        f"(0, 1]; 1 = a chunk every step (default: {PREFILL_SHARE})")
    p.add_argument("--prefix-cache-mb", type=_non_negative_int, default=prefix_mb, metavar="MIB",
                   help="keep the latent cache rows of finished requests, up to this many MiB, and copy them into "
                        "a new request whose prompt starts with the same tokens (a chat's next turn, a shared "
                        f"system prompt) instead of prefilling them; 0 turns it off (default: {prefix_mb})")


def _engine(args, ckpt, model, tok, max_batch: int, log=None, **options):
    from .infer import Engine
    from .tokenizer import frequent_token_ids, stop_token_ids

    draft_vocab = None
    if args.draft_vocab is not None:
        if args.speculative != "mtp":
            raise _UsageError("--draft-vocab restricts the MTP drafts: give it with --speculative mtp")
        draft_vocab = frequent_token_ids(tok, args.draft_vocab, keep=stop_token_ids(tok, ckpt))
    return Engine(model, tok, max_batch=max_batch, max_len=args.max_len, speculative=args.speculative == "mtp",
                  draft_tokens=args.draft_tokens, compile=args.compile, log=log, prefill_chunk=args.prefill_chunk,
                  prefill_share=args.prefill_share, prefix_cache_bytes=args.prefix_cache_mb << 20,
                  draft_vocab=draft_vocab, **options)


def _params_from(args, tokenizer, extra_stops=(), checkpoint=None):
    from .infer import SamplingParams
    from .tokenizer import stop_token_ids

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop_ids=stop_token_ids(tokenizer, checkpoint),
                          stop_strings=tuple(args.stop) + tuple(extra_stops))


def _generate(args: argparse.Namespace) -> int:
    import time

    ckpt, model, tok = _load_for_inference(args)
    log = (lambda m: print(m, file=sys.stderr)) if args.verbose else None
    engine = _engine(args, ckpt, model, tok, 1, log)
    t = time.perf_counter()
    req = engine.submit(tok.encode(args.prompt).ids, _params_from(args, tok, checkpoint=ckpt))
    while not req.done:
        engine.step()
    compile_s = engine.stats["compile_time"]
    dt = time.perf_counter() - t - compile_s
    print(req.text)
    if args.verbose:
        acc = f", MTP acceptance {engine.acceptance_rate:.0%}" if engine.speculative else ""
        comp = f"; compiling took {compile_s:.1f} s more" if engine.compiled else ""
        print(f"{len(req.output)} tokens in {dt:.2f} s ({len(req.output) / dt:.1f} tokens/s{acc}){comp}",
              file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .tokenizer import ChatTemplate, ChatTemplateError

    ckpt, model, tok = _load_for_inference(args)
    template = ChatTemplate(ckpt)
    engine = _engine(args, ckpt, model, tok, 1)
    history: list[dict] = []
    print("dsv3 chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        try:
            prompt = template.encode(tok, history, sanitize_control_tokens=True)
        except ChatTemplateError as e:  # one refused message ends neither the chat nor its history
            history.pop()
            print(f"dsv3 chat: the chat template refused this message, so it was dropped: {e}", file=sys.stderr)
            continue
        prompt = prompt[-(engine.max_len - args.max_new_tokens):]
        print("model> ", end="", flush=True)
        req = engine.submit(prompt, _params_from(args, tok, template.default_stops, ckpt),
                            on_update=lambda r, delta: print(delta, end="", flush=True))
        while not req.done:
            engine.step()
        print()
        history.append({"role": "assistant", "content": req.text.strip()})
    return 0


def serve_threads(requested: int | None, env: dict, cores: int) -> int | None:
    """The CPU threads `dsv3 serve` gives the model's kernels: --threads when given; None (torch's own setting)
    when $OMP_NUM_THREADS is set; else every core but one (at least one; `cores`: torch's default thread count, the
    machine's cores), so that the HTTP side (event loop, streaming) runs beside the kernels instead of stalling their
    parallel regions: with 2 cores, one thread for the kernels measured 1.18-1.35x the tokens/s of two and a lower
    p99 latency (`benchmarks/load_test.py`, README)."""
    if requested is not None:
        return requested
    if env.get("OMP_NUM_THREADS"):
        return None
    return max(1, cores - 1)


def _serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from .infer.server import Server, bind_warning
    from .runs import model_name
    from .web import create_web_app

    threads = serve_threads(args.threads, os.environ, torch.get_num_threads())
    if threads is not None:
        torch.set_num_threads(threads)
    print(f"CPU threads for the model's kernels: {torch.get_num_threads()} ("
          + ("--threads" if args.threads else "$OMP_NUM_THREADS" if threads is None else
             "every core but one, left to the HTTP side; --threads sets it") + ")", file=sys.stderr)
    ckpt, model, tok = _load_for_inference(args)
    engine = _engine(args, ckpt, model, tok, args.max_batch, log=lambda m: print(m, file=sys.stderr),
                     expert_stats=args.expert_stats_window if args.expert_stats else 0)
    if engine.compiled:
        print(f"compiling the decode step for batch sizes {engine.buckets} before serving (--no-compile skips "
              "this)", file=sys.stderr)
        engine.warmup()
    api_key = args.api_key or os.environ.get("DSV3_API_KEY") or None
    server = Server(engine, tok, model_name=args.model_name or model_name(ckpt), checkpoint=ckpt,
                    max_queue=args.max_queue, request_timeout=args.request_timeout, api_key=api_key)
    print(f"serving {ckpt} as model '{server.model_name}' on http://{args.host}:{args.port}/v1", file=sys.stderr)
    print(f"the page (chat, experts live, routing simulator): http://{args.host}:{args.port}/", file=sys.stderr)
    if warning := bind_warning(args.host, api_key):
        print(warning, file=sys.stderr)
    uvicorn.run(create_web_app(server), host=args.host, port=args.port, log_level="warning")
    return 0


# ------------------------------------------------------------------------------------------------ parser
CHECKPOINT_HELP = "checkpoint directory, or a training run (its latest checkpoint)"
OVERWRITE_HELP = "move an existing non-empty --out aside (OUT.old-<timestamp>) instead of stopping"


def _model_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-config", metavar="NAME|PATH",
                   help="a preset (tiny, small, deepseek-v3-671b), a config.json or a checkpoint directory")
    p.add_argument("legacy_config", nargs="?", default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in plain PyTorch.", epilog=SCHEME,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="parameter counts and KV-cache bytes of a model config")
    _model_config_flags(p)
    p.set_defaults(func=_params)

    p = sub.add_parser("data", help="datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = data_sub.add_parser("prepare", help="tokenize a corpus into a dataset directory")
    q.add_argument("paths", nargs="*", help="text files, folders or JSONL files ({\"text\": ...} per line)")
    q.add_argument("--corpus", choices=["shakespeare"], help="the bundled default corpus (used when no paths)")
    q.add_argument("--out", required=True, help="dataset directory to create")
    q.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    q.add_argument("--vocab-size", type=_positive_int, default=None, help="BPE vocabulary size (default: 8192)")
    q.add_argument("--val-fraction", type=float, default=0.05,
                   help="held-out share of documents, your own data only (default: 0.05)")
    q.add_argument("--retrieval-docs", type=_non_negative_int, default=0, metavar="N",
                   help="add N retrieval documents (a number stated once in the corpus' own text and again at the "
                        "end) to the training split, for long-context runs; none of their wording is used by "
                        "`dsv3 eval --passkey` (default: 0)")
    q.add_argument("--retrieval-words", type=_word_range, default=[50, 2800], metavar="MIN,MAX",
                   help="the retrieval documents' lengths in words, log-uniform between MIN and MAX (default: "
                        "50,2800, about 70 to 4,000 tokens)")
    q.add_argument("--retrieval-keys", type=_positive_int, default=1, metavar="K",
                   help="numbers per retrieval document, each under its own name, all recalled at the end (1 to 8; "
                        "more keys, more copying to learn per token; default: 1)")
    q.add_argument("--copy-docs", type=_non_negative_int, default=0, metavar="N",
                   help="add N copying documents (a line of random frequent corpus words, repeated 2-4 times) to the "
                        "training split: the plainest signal for learning to copy from the context, which "
                        "retrieval needs (default: 0)")
    q.add_argument("--split-digits", action="store_true", help="one token per digit (for arithmetic tasks; such "
                   "a tokenizer is not exported to GGUF)")
    q.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="encode with this tokenizer (a tokenizer.json, or a checkpoint, run or dataset directory) "
                        "instead of training one: data for `dsv3 train --init-from` that checkpoint")
    q.set_defaults(func=_data_prepare, command="data prepare")
    q = data_sub.add_parser("tasks", help="a verifiable synthetic task (worked solutions + checker answers) as "
                            "messages JSONL train/val splits")
    q.add_argument("--task", required=True, help="add, multiply, sort, count or reverse")
    q.add_argument("--out", required=True, help="directory to create (train.jsonl, val.jsonl, task.json)")
    q.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    q.add_argument("--train", type=_non_negative_int, default=20000, help="training examples (default: 20000)")
    q.add_argument("--val", type=_non_negative_int, default=500,
                   help="held-out examples, never among the training prompts (default: 500)")
    q.add_argument("--seed", type=int, default=0, help="the same seed gives the same files (default: 0)")
    q.add_argument("--size", type=_size_range, default=None, metavar="LO[,HI]",
                   help="difficulty, drawn uniformly from LO..HI: digits per operand (add; default 2,4), digits of "
                   "the first factor (multiply; 2,3), list length (sort 4,7; count 5,9; reverse 3,6)")
    q.set_defaults(func=_data_tasks, command="data tasks")
    q = data_sub.add_parser("retrieval", help="retrieval examples as prompt-completion JSONL train/val splits (a "
                            "number stated in corpus text, its recall the completion): `dsv3 sft BASE --data OUT` "
                            "learns to retrieve with the loss on the completions only")
    q.add_argument("--out", required=True, help="directory to create (train.jsonl, val.jsonl, retrieval.json)")
    q.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    q.add_argument("--train", type=_non_negative_int, default=20000, help="training records (default: 20000)")
    q.add_argument("--val", type=_non_negative_int, default=500,
                   help="held-out records, their text from the held-out plays (default: 500)")
    q.add_argument("--words", type=_word_range, default=[20, 150], metavar="MIN,MAX",
                   help="words per record, log-uniform between MIN and MAX (default: 20,150)")
    q.add_argument("--text", type=_non_negative_int, default=0, metavar="N",
                   help="also N plain-text training records (prompt: a corpus line, completion: the lines after "
                   "it), shuffled in, so that the fine-tuned model keeps its language (default: 0)")
    q.add_argument("--keys", type=_positive_int, default=1, metavar="K",
                   help="numbers stated per record, each under its own name, one of them recalled: the others are "
                   "distractors, told apart by their names (1 to 8; default: 1)")
    q.add_argument("--tokenizer", help="with --max-tokens: the tokenizer `dsv3 sft` will encode with (a "
                   "tokenizer.json, dataset, checkpoint or run)")
    q.add_argument("--max-tokens", type=_positive_int, metavar="N",
                   help="drop records over N tokens (others are drawn in their place), so that `dsv3 sft --seq-len N` "
                   "takes them all")
    q.add_argument("--seed", type=int, default=0, help="the same seed gives the same files (default: 0)")
    q.set_defaults(func=_data_retrieval, command="data retrieval")

    p = sub.add_parser("train", help="train a model (flags override --config TOML)")
    p.add_argument("--config", metavar="TOML", help="training settings: TrainConfig keys (top level or [train])")
    p.add_argument("--resume", metavar="RUN", help="continue a run from its latest checkpoint, with its settings")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _train_flags(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("sft", help="supervised fine-tuning on chat conversations (messages JSONL; loss on the "
                       "assistant's tokens) or raw prompt-completion records (loss on the completion), packed; the "
                       "trainer's flags")
    p.add_argument("base", nargs="?", help="the checkpoint or run to fine-tune (its tokenizer and chat template "
                   "encode the conversations)")
    p.add_argument("--config", metavar="TOML", help="training settings: TrainConfig keys (top level or [train])")
    p.add_argument("--resume", metavar="RUN", help="continue an SFT run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _train_flags(p, skip=("objective", "init_from"))
    p.set_defaults(func=_sft)

    p = sub.add_parser("distill", help="distill a teacher into a student: sequence (rejection-sampled teacher "
                       "replies, then SFT) or logits (KL to the teacher's distribution); the trainer's flags")
    p.add_argument("--teacher", dest="teacher_ckpt", required=True, help="the teacher checkpoint or run")
    p.add_argument("--student", required=True, help="the student checkpoint or run to fine-tune")
    p.add_argument("--mode", choices=["sequence", "logits"], required=True,
                   help="sequence: the teacher answers --data's questions --samples times, the task checker keeps "
                   "the correct replies, the student is SFT'd on them; logits: SFT on --data's conversations with "
                   "the KL to the teacher (same tokenizer needed)")
    p.add_argument("--samples", type=_positive_int, default=4, help="sequence: replies per question (default 4)")
    p.add_argument("--questions", type=_positive_int, default=2000,
                   help="sequence: questions of --data sampled (default 2000)")
    p.add_argument("--sample-temperature", type=float, default=0.7, help="sequence: sampling temperature (0.7)")
    p.add_argument("--sample-max-tokens", type=_positive_int, default=128, help="sequence: reply limit (128)")
    p.add_argument("--config", metavar="TOML", help="training settings: TrainConfig keys (top level or [train])")
    p.add_argument("--resume", metavar="RUN", help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _train_flags(p, skip=("objective", "init_from", "teacher"))
    p.set_defaults(func=_distill)

    p = sub.add_parser("grpo", help="reinforcement learning with GRPO on a verifiable task (group-relative "
                       "advantages, clipped ratio, KL to the starting policy)")
    p.add_argument("policy", nargs="?", help="the checkpoint or run to improve (also the frozen KL reference)")
    p.add_argument("--task", help="a task name (its training split for --seed) or a task directory / train.jsonl")
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--resume", metavar="RUN", help="continue a GRPO run from its latest checkpoint (exactly as if "
                   "uninterrupted); --steps extends it")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    for name, typ, text in (("steps", int, "rollout batches (default 50)"),
                            ("prompts", int, "questions per batch (default 8)"),
                            ("group", int, "responses per question, G (default 8)"),
                            ("temperature", float, "sampling temperature (default 1.0)"),
                            ("max_new_tokens", int, "reply length limit (default 64)"),
                            ("updates", int, "policy updates per rollout batch (default 1)"),
                            ("lr", float, "AdamW learning rate (default 1e-5)"),
                            ("warmup_steps", int, "linear learning-rate warm-up over the first N steps "
                             "(default 0: none)"),
                            ("clip_eps", float, "ratio clip epsilon (default 0.2)"),
                            ("beta", float, "KL coefficient; 0 drops the reference (default 0.04)"),
                            ("format_reward", float, "reward of a wrong reply with an Answer: line (default 0.1)"),
                            ("seed", int, "rollout seeds and question order (default 0)"),
                            ("checkpoint_every", int, "save every this many steps, and at the end (default 25)")):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=text)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no per-step lines")
    p.set_defaults(func=_grpo)

    p = sub.add_parser("eval", help="held-out loss, perplexity and bits-per-byte of a checkpoint or run; lm-eval "
                       "tasks (--lm-eval)")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--data", help="dataset directory (default: the one the checkpoint was trained on)")
    p.add_argument("--seq-len", type=_positive_int, help="evaluation sample length (default: the training one; with "
                   "--lm-eval: the tokens one forward reads, default the model's context)")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="evaluate at most this many tokens")
    p.add_argument("--context-lengths", type=_length_list, default=None, metavar="L1,L2,...",
                   help="held-out loss at each evaluation length and by position, over the same tokens (e.g. "
                   "256,1024,4096; --max-tokens default 16384)")
    p.add_argument("--passkey", action="store_true", help="passkey retrieval over --context-lengths (default "
                   "256,1024,4096 where the model reaches) x --depths, greedy exact match")
    p.add_argument("--depths", type=_fraction_list, default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="D1,D2,...",
                   help="with --passkey: where the key sits in the filler, 0 (start) to 1 (end)")
    p.add_argument("--trials", type=_positive_int, default=20, help="with --passkey: trials per cell (default 20)")
    p.add_argument("--task", metavar="NAME|FILE", help="greedy held-out accuracy on a verifiable task (add, "
                   "multiply, sort, count, reverse: the held-out split of `dsv3 data tasks` for --seed) or a task "
                   "val.jsonl / directory")
    p.add_argument("--task-examples", type=_positive_int, default=500, help="with --task: examples (default 500)")
    p.add_argument("--seed", type=int, default=0, help="with --task NAME: the split's seed; with --passkey: the "
                   "trials' seed (benchmarks/context_extension.py uses 1) (default 0)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128,
                   help="with --task: reply length limit in tokens (default 128)")
    p.add_argument("--out", help="with --context-lengths: a PNG of the loss by position; with --passkey: the "
                   "heatmap PNG")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--lm-eval", type=_comma_list(str.strip, bool, "lm-eval task names"), default=None,
                   metavar="TASK1,TASK2,...", help="run EleutherAI lm-eval tasks on the model in this process and "
                   "print lm-eval's results as JSON (needs the eval extra: pip install 'dsv3[eval]')")
    p.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR",
                   help="with --lm-eval: a folder of task YAML files, added to lm-eval's own tasks (repeatable)")
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="with --lm-eval: at most N documents per task")
    _compute_flags(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("plot", help="loss, expert-load and bias plots of a run")
    p.add_argument("run", help="training run directory")
    p.add_argument("--out", help="folder for the PNGs (default RUN/plots)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=_plot)

    p = sub.add_parser("simulate-routing", help="aux-loss-free balancing on a skewed synthetic router")
    p.add_argument("--out", default="routing_simulation.png", help="PNG to write (default: routing_simulation.png)")
    p.add_argument("--experts", type=_positive_int, default=64, help="routed experts (default: 64)")
    p.add_argument("--groups", type=_positive_int, default=8, help="expert groups (default: 8)")
    p.add_argument("--topk-groups", type=_positive_int, default=4, help="groups each token may use (default: 4)")
    p.add_argument("--top-k", type=_positive_int, default=8, help="experts per token (default: 8)")
    p.add_argument("--steps", type=_positive_int, default=400, help="simulated training steps (default: 400)")
    p.add_argument("--gamma", type=float, default=0.001, help="bias update speed (default: 0.001)")
    p.add_argument("--skew", type=float, default=1.5, help="strength of the affinity skew (default: 1.5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_simulate)

    p = sub.add_parser("convert", help="rewrite a checkpoint as fp8 (official block-scaled format), bf16 or fp32, "
                       "or export it as a GGUF file for llama.cpp")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("legacy_dst", nargs="?", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", help="checkpoint directory to create (with --format gguf: the .gguf file)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: an official-format checkpoint directory (default); gguf: one file in llama.cpp's "
                   "deepseek2 conventions (MTP modules left out)")
    p.add_argument("--dtype", choices=["fp8", "bf16", "fp32", "fp16"],
                   help="storage format: fp8, bf16 or fp32 for hf (required); fp32 (default), fp16 or bf16 for gguf")
    p.set_defaults(func=_convert)

    p = sub.add_parser("generate", help="generate text from a prompt (the text alone on stdout)")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--prompt", required=True)
    p.add_argument("-v", "--verbose", action="store_true", help="cache size and speed on stderr")
    _sampling_flags(p, 200)
    p.set_defaults(func=_generate)

    p = sub.add_parser("chat", help="interactive streaming chat")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    _sampling_flags(p, 256, prefix_mb=PREFIX_CACHE_MB)
    p.set_defaults(func=_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument("--max-batch", type=_positive_int, default=16, help="sequences decoded together (default: 16)")
    p.add_argument("--max-len", type=_positive_int, default=None,
                   help="cache capacity per sequence, prompt + output (default: the model's context)")
    _decode_flags(p, compile_default=True, prefix_mb=PREFIX_CACHE_MB)
    _compute_flags(p)
    p.add_argument("--model-name", help="the model id clients send (default: the run's name)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for the model's kernels (default: $OMP_NUM_THREADS when set, else every core "
                        "but one, which the HTTP side gets)")
    p.add_argument("--max-queue", type=_positive_int, default=64,
                   help="requests that may wait for a free slot; beyond, clients get 429 (default: 64)")
    p.add_argument("--request-timeout", type=_positive_int, default=600, metavar="SECONDS",
                   help="end a request with an error after this long, queueing included (default: 600)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 route (and the page's /web "
                                     "data); /health and the page itself stay open (default: $DSV3_API_KEY, else "
                                     "none)")
    p.add_argument("--expert-stats", action=argparse.BooleanOptionalAction, default=True,
                   help="count the tokens each routed expert receives in the decode steps, for the page's live "
                        "expert view (/web/experts; benchmarks/expert_stats.py measures the cost) (default: on)")
    p.add_argument("--expert-stats-window", type=_positive_int, default=EXPERT_STATS_WINDOW, metavar="STEPS",
                   help=f"the decode steps the expert counts cover (default: {EXPERT_STATS_WINDOW})")
    p.set_defaults(func=_serve)

    p = sub.add_parser("cost", help="training FLOPs, GPU-hours and dollars; pipeline bubbles per schedule")
    _model_config_flags(p)
    p.add_argument("--tokens", type=_count, default=_count("14.8T"), help="training tokens (default: 14.8T)")
    p.add_argument("--gpus", type=_positive_int, default=2048, help="(default: 2048)")
    p.add_argument("--gpu", default="h800", choices=sorted(_gpu_names()), help="(default: h800)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation, of the dense BF16 peak")
    p.add_argument("--seq-len", type=_positive_int, default=4096, help="training sample length (default: 4096)")
    p.add_argument("--price", type=float, default=2.0, help="dollars per GPU-hour (default: 2.0)")
    p.add_argument("--pp", type=_positive_int, default=16, help="pipeline stages (default: 16)")
    p.add_argument("--micro-batches", type=_positive_int, default=32, help="(default: 32)")
    p.set_defaults(func=_cost)

    p = sub.add_parser("plan", help="per-rank memory of a training layout (parameters, gradients, optimizer state, "
                       "activations)")
    _model_config_flags(p)
    p.add_argument("--pp", type=_positive_int, default=1, help="pipeline stages (default: 1)")
    p.add_argument("--dp", type=_positive_int, default=1, help="data-parallel size (default: 1)")
    p.add_argument("--ep", type=_positive_int, default=1, help="expert-parallel size (default: 1)")
    p.add_argument("--zero", type=int, choices=(0, 1, 3), default=0,
                   help="1: ZeRO-1 optimizer state; 3: FSDP2, everything sharded (default: 0)")
    p.add_argument("--pp-schedule", default="dualpipe", choices=_schedules(), help="(default: dualpipe)")
    p.add_argument("--optimizer-state-dtype", default="fp32", choices=("fp32", "bf16"), help="AdamW moments")
    p.add_argument("--recipe", default="dsv3", choices=("dsv3", "paper"),
                   help="dsv3: what dsv3's trainer holds (fp32 weights, gradients and activations, nothing "
                   "recomputed); paper: the DeepSeek-V3 report's recipe (bf16 weights, fp32 gradients and master "
                   "weights, bf16 moments, RMSNorm and MLA up-projections recomputed, FP8-cached activations, "
                   "the MTP embedding shared); default dsv3")
    p.add_argument("--micro-batch", type=_positive_int, default=1, help="sequences per micro-batch per rank "
                   "(default: 1)")
    p.add_argument("--seq-len", type=_positive_int, default=None,
                   help="tokens per sequence (default: 4096, the report's pre-training length, or the config's "
                   "context if shorter)")
    p.add_argument("--pp-chunks", type=_positive_int, default=None, help="micro-batches per step under a pipeline "
                   "(default: 2 x pp; DualPipe's peak does not grow with it)")
    p.add_argument("--gpu", default="h800", choices=sorted(_gpu_names()), help="its memory decides 'fits'")
    p.add_argument("--gpu-memory", type=float, default=None, help="GB per device (overrides --gpu)")
    p.add_argument("--ranks", type=int, nargs="+", default=None,
                   help="global ranks to show (default: all up to 8, else the first, a middle and the last stage)")
    p.add_argument("--serve-tokens", type=_positive_int, default=None,
                   help="also the bf16 latent cache a server needs for this many cached tokens")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--dry-run", action="store_true", help="also build each shown rank's share with the trainer on "
                   "the meta device under a fake process group, and check it against the plan")
    p.set_defaults(func=_plan)

    p = sub.add_parser("demo", help="the main job: prepare data, train the small preset, evaluate, plot, sample")
    p.add_argument("--minutes", type=float, default=10.0, help="training time (default: 10)")
    p.add_argument("--data", default="data/shakespeare", help="dataset directory (prepared there if absent)")
    p.add_argument("--out", default="runs/demo", help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=_demo)

    p = sub.add_parser("runs", help="training runs")
    runs_sub = p.add_subparsers(dest="runs_command", required=True, metavar="SUBCOMMAND")
    q = runs_sub.add_parser("upgrade", help="convert an older run's trainer_state.pt pickle into JSON + safetensors "
                            "(loads tensors and plain data only; refuses anything else)")
    q.add_argument("run", help="training run directory (every checkpoint) or one checkpoint directory")
    q.set_defaults(func=_runs_upgrade, command="runs upgrade")
    return parser


def _schedules() -> tuple[str, ...]:
    from .parallel.pipeline import SCHEDULES

    return SCHEDULES


def _gpu_names() -> list[str]:
    from .cost import GPU_PEAK_BF16

    return list(GPU_PEAK_BF16)


def main(argv: list[str] | None = None) -> int:
    """`dsv3 ...`: the exit status (0 success, 2 bad input or usage, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .allocator import keep_freed_memory
    from .errors import Dsv3Error

    if args.command not in ("serve", "chat"):  # long-running, varied requests: glibc's default (dsv3.allocator)
        keep_freed_memory()  # large tensors reuse freed memory, not fresh pages each step (DSV3_MALLOC=default: off)

    try:
        return args.func(args)
    except (Dsv3Error, _UsageError) as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsv3 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
