"""The `dsv3` command line. Each subcommand imports what it needs, so `dsv3 --help` stays fast."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path


def _params(args: argparse.Namespace) -> int:
    from .config import get_config
    from .params import count_parameters, print_report

    print_report(count_parameters(get_config(args.config)), args.config)
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from .train.data import prepare

    inputs = args.paths or None
    if inputs and args.corpus:
        raise SystemExit("dsv3 data prepare: give either --corpus or input paths, not both")
    meta = prepare(args.out, inputs, vocab_size=args.vocab_size, val_fraction=args.val_fraction)
    for split, s in meta["splits"].items():
        print(f"{split}: {s['tokens']:,} tokens from {len(s['documents'])} document(s), {s['bytes']:,} bytes")
    print(f"vocab {meta['vocab_size']:,}; written to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------ train
def _train_flags(p: argparse.ArgumentParser) -> None:
    from .train.trainer import TrainConfig

    optional_types = {"max_steps": int, "minutes": float, "mtp_depth": int, "pp_chunks": int, "dp": int}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "progress":
            p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                           help="no progress bar")
            continue
        typ = optional_types.get(f.name) or type(f.default)
        p.add_argument(flag, dest=f.name, type=typ, default=None, help=f"(default: {f.default})")


def _train_overrides(args: argparse.Namespace) -> dict:
    from .train.trainer import TrainConfig

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name, None) is not None}


def _train(args: argparse.Namespace) -> int:
    from .train.trainer import TrainConfig, Trainer, resume_config

    overrides = _train_overrides(args)
    if args.resume:
        cfg = resume_config(args.resume, **overrides)
    else:
        cfg = TrainConfig.from_toml(args.config, **overrides) if args.config else TrainConfig(**overrides)
    if cfg.pp > 1:
        from .dist.pipeline_train import PipelineTrainer as Trainer  # noqa: N806
    trainer = Trainer(cfg, resume=bool(args.resume))
    if args.resume and trainer.main_rank:
        print(f"resuming {args.resume} at step {trainer.step}")
    last = trainer.fit()
    if not trainer.main_rank:
        return 0
    if not last:
        print(f"nothing to do: {cfg.out} is already at step {trainer.step} of {trainer.total_steps}")
    else:
        print(f"step {last['step']}: loss {last['loss']:.4f}, {last['tokens_per_s']:,.0f} tokens/s, "
              f"MaxVio {max(last['max_vio'], default=0):.3f}; checkpoints in {Path(cfg.out) / 'checkpoints'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_pretrained, resolve_checkpoint_dir
    from .train.evaluate import evaluate

    ckpt = resolve_checkpoint_dir(args.checkpoint)
    data = args.data or _checkpoint_setting(ckpt, "data")
    seq_len = args.seq_len or _checkpoint_setting(ckpt, "seq_len") or 256
    if not data:
        raise SystemExit("dsv3 eval: this checkpoint does not record its dataset; pass --data DIR")
    model = load_pretrained(ckpt)
    result = evaluate(model, data, seq_len=seq_len, max_tokens=args.max_tokens)
    print(json.dumps({"checkpoint": str(ckpt), "data": str(data), **result}, indent=2))
    return 0


def _checkpoint_setting(ckpt: Path, key: str):
    state = ckpt / "trainer_state.pt"
    if not state.exists():
        return None
    import torch

    return torch.load(state, map_location="cpu", weights_only=False)["train_config"].get(key)


def _plot(args: argparse.Namespace) -> int:
    from .train.plots import plot_run

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
    from .train.demo import run_demo

    minutes = args.minutes if args.minutes is not None else float(os.environ.get("DEMO_MINUTES", 10))
    return run_demo(minutes=minutes, data_dir=args.data, run_dir=args.out)


def _convert(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_pretrained, resolve_checkpoint_dir, save_pretrained

    dtype = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    src = resolve_checkpoint_dir(args.src)
    model = load_pretrained(src)
    extra = {f.name: f.read_bytes() for f in src.iterdir()
             if f.name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")}
    dst = save_pretrained(model, args.dst, dtype=dtype, extra_files=extra)
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(f"wrote {dst} ({args.dtype}, {size / 2**20:.1f} MiB of safetensors)")
    return 0


def _cost(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .config import get_config
    from .dist.cost import parse_count, pipeline_bubbles, training_cost

    cfg = get_config(args.config)
    est = training_cost(cfg, parse_count(args.tokens), args.gpus, args.gpu, args.mfu, args.seq_len, args.price)
    console = Console()
    console.print(f"{args.config}: {est.flops_per_token / 1e9:.1f} GFLOP per trained token at {args.seq_len} "
                  f"context (forward + backward, MTP included)")
    console.print(f"{args.tokens} tokens: {est.total_flops:.3e} FLOP = {est.gpu_hours / 1e6:.3f}M {args.gpu.upper()}"
                  f" GPU-hours at {args.mfu:.0%} MFU (of the dense BF16 peak) = {est.wall_days:.1f} days on "
                  f"{args.gpus} GPUs = ${est.dollars / 1e6:.2f}M at ${args.price}/GPU-hour")
    table = Table(title=f"pipeline bubble, PP={args.pp}, {args.micro_batches} micro-batches, F=1 B=2 W=1",
                  title_justify="left")
    for col in ("schedule", "bubble (x F)", "share of step", "parameters", "activations"):
        table.add_column(col)
    for name, b in pipeline_bubbles(args.pp, args.micro_batches).items():
        table.add_row(name, f"{b['bubble']:.1f}", f"{b['fraction']:.1%}", b["parameters"], b["activations"])
    console.print(table)
    return 0


# ------------------------------------------------------------------------------------------------ inference
def _load_for_inference(args: argparse.Namespace):
    from .checkpoint import load_pretrained, resolve_checkpoint_dir
    from .train.data import load_tokenizer

    ckpt = resolve_checkpoint_dir(args.checkpoint)
    return ckpt, load_pretrained(ckpt).eval(), load_tokenizer(ckpt)


def _sampling_flags(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", choices=["mtp", "none"], default="none", help="MTP speculative decoding")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _params_from(args, tokenizer, extra_stops=()):
    from .infer import SamplingParams
    from .train.data import EOT

    eot = tokenizer.token_to_id(EOT)
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop_ids=(eot,) if eot is not None else (),
                          stop_strings=tuple(args.stop) + tuple(extra_stops))


def _generate(args: argparse.Namespace) -> int:
    import time

    from .infer import Engine

    _, model, tok = _load_for_inference(args)
    log = (lambda m: print(m, file=sys.stderr)) if args.verbose else None
    engine = Engine(model, tok, max_batch=1, speculative=args.speculative == "mtp", log=log)
    t = time.perf_counter()
    req = engine.submit(tok.encode(args.prompt).ids, _params_from(args, tok))
    while not req.done:
        engine.step()
    dt = time.perf_counter() - t
    print(req.text)
    if args.verbose:
        acc = f", MTP acceptance {engine.acceptance_rate:.0%}" if engine.speculative else ""
        print(f"{len(req.output)} tokens in {dt:.2f} s ({len(req.output) / dt:.1f} tokens/s{acc})", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .infer import Engine
    from .infer.server import ChatTemplate

    ckpt, model, tok = _load_for_inference(args)
    template = ChatTemplate(ckpt)
    engine = Engine(model, tok, max_batch=1, speculative=args.speculative == "mtp")
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
        prompt = tok.encode(template.render(history)).ids[-(engine.max_len - args.max_new_tokens):]
        print("model> ", end="", flush=True)
        req = engine.submit(prompt, _params_from(args, tok, template.default_stops),
                            on_update=lambda r, delta: print(delta, end="", flush=True))
        while not req.done:
            engine.step()
        print()
        history.append({"role": "assistant", "content": req.text.strip()})
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .infer import Engine
    from .infer.server import Server, create_app

    ckpt, model, tok = _load_for_inference(args)
    engine = Engine(model, tok, max_batch=args.max_batch, max_len=args.max_len,
                    speculative=args.speculative == "mtp", log=lambda m: print(m, file=sys.stderr))
    default_name = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name  # the run's name
    server = Server(engine, tok, model_name=args.model_name or default_name or "dsv3", checkpoint=ckpt)
    print(f"serving {ckpt} as model '{server.model_name}' on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    return 0


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="parameter counts and KV-cache bytes of a config")
    p.add_argument("config", help="a preset (tiny, small, deepseek-v3-671b), a config.json or a checkpoint dir")
    p.set_defaults(func=_params)

    p = sub.add_parser("data", help="datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = data_sub.add_parser("prepare", help="tokenize a corpus into a dataset directory")
    q.add_argument("paths", nargs="*", help="text files, folders or JSONL files ({\"text\": ...} per line)")
    q.add_argument("--corpus", choices=["shakespeare"], help="the bundled default corpus (used when no paths)")
    q.add_argument("--out", required=True, help="dataset directory to write")
    q.add_argument("--vocab-size", type=int, default=8192)
    q.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of documents (own data)")
    q.set_defaults(func=_data_prepare)

    p = sub.add_parser("train", help="train a model (flags override --config TOML)")
    p.add_argument("--config", help="TOML file with TrainConfig keys (top level or a [train] table)")
    p.add_argument("--resume", metavar="RUN", help="continue a run from its latest checkpoint")
    _train_flags(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="held-out loss, perplexity and bits-per-byte of a checkpoint or run")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="dataset directory (default: the one the checkpoint was trained on)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--max-tokens", type=int, default=None)
    p.set_defaults(func=_eval)

    p = sub.add_parser("plot", help="loss, expert-load and bias plots of a run")
    p.add_argument("run")
    p.add_argument("--out", help="folder for the PNGs (default RUN/plots)")
    p.set_defaults(func=_plot)

    p = sub.add_parser("simulate-routing", help="aux-loss-free balancing on a skewed synthetic router")
    p.add_argument("--out", default="routing_simulation.png")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--topk-groups", type=int, default=4)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--gamma", type=float, default=0.001, help="bias update speed")
    p.add_argument("--skew", type=float, default=1.5, help="strength of the affinity skew")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_simulate)

    p = sub.add_parser("convert", help="rewrite a checkpoint as fp8 (official block-scaled format), bf16 or fp32")
    p.add_argument("src", help="checkpoint directory or training run")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=["fp8", "bf16", "fp32"], required=True)
    p.set_defaults(func=_convert)

    p = sub.add_parser("generate", help="generate text from a prompt (the text alone on stdout)")
    p.add_argument("checkpoint", help="checkpoint directory or training run")
    p.add_argument("--prompt", required=True)
    p.add_argument("-v", "--verbose", action="store_true", help="cache size and speed on stderr")
    _sampling_flags(p, 200)
    p.set_defaults(func=_generate)

    p = sub.add_parser("chat", help="interactive streaming chat")
    p.add_argument("checkpoint")
    _sampling_flags(p, 256)
    p.set_defaults(func=_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-len", type=int, default=None, help="context per sequence (default: the model's)")
    p.add_argument("--speculative", choices=["mtp", "none"], default="none")
    p.add_argument("--model-name", help="the model id clients send (default: the run's name)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("cost", help="training FLOPs, GPU-hours and dollars; pipeline bubbles per schedule")
    p.add_argument("config", help="a preset or config.json")
    p.add_argument("--tokens", default="14.8T")
    p.add_argument("--gpus", type=int, default=2048)
    p.add_argument("--gpu", default="h800")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation, of the dense BF16 peak")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--price", type=float, default=2.0, help="dollars per GPU-hour")
    p.add_argument("--pp", type=int, default=16)
    p.add_argument("--micro-batches", type=int, default=32)
    p.set_defaults(func=_cost)

    p = sub.add_parser("demo", help="the main job: prepare data, train the small preset, evaluate, plot, sample")
    p.add_argument("--minutes", type=float, help="training time (default $DEMO_MINUTES or 10)")
    p.add_argument("--data", default="data/shakespeare")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .infer.engine import GenerationError
    from .train.data import DataError
    from .train.trainer import TrainError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, DataError, TrainError, GenerationError) as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsv3 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
