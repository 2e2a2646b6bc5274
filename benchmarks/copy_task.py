"""How fast does a model learn to copy from its context? The repeated-random-tokens task that grows induction heads
(Olsson et al. 2022): every training row is L random tokens followed by the same L tokens again, so the second copy
is predictable only by looking back. The loss on the second copy stays at ~ln(tokens drawn) until the model finds
the copying circuit, then falls towards 0 within a few hundred steps; the step where it falls is what this measures.

Passkey retrieval (issue 15) needs exactly this skill, and measured here it decides the pre-training LR: `small`
learns it within 600 steps at LR 5e-4 and not at 1e-3 (the LR the earlier context-extension bases used, 1.5e-3, is
higher still). `--hf` adds transformers' own DeepseekV3ForCausalLM of the same config (the reference
implementation, its own initialisation), and `--llama` transformers' LlamaForCausalLM of the same width, depth and
heads (plain multi-head attention with full-width RoPE, dense MLPs), for scale; all trained identically.

    OMP_NUM_THREADS=1 python benchmarks/copy_task.py [--model-config small] [--lrs 5e-4,1e-3] [--steps 600]
        [--seeds 0] [--tokens 1000] [--stream] [--hf] [--llama]

Rows: --batch rows of 2 x --length tokens, ids drawn uniformly from [3, 3 + --tokens) (few enough distinct ids that
each one's embedding trains), AdamW (betas 0.9/0.95, weight decay 0.1, no warm-up, constant LR), gradients clipped
at 1, seeded data per step. Prints the mean loss on the second copy over each 100 steps, per model, LR and seed.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import dsv3


def copy_rows(step: int, batch: int, length: int, tokens: int) -> torch.Tensor:
    """[batch, 2 * length]: random ids in [3, 3 + tokens), each row's first half repeated; seeded by `step`."""
    g = torch.Generator().manual_seed(step)
    x = torch.randint(3, 3 + tokens, (batch, length), generator=g)
    return torch.cat([x, x], 1)  # [B, 2L]


def copy_stream(length: int, tokens: int, documents: int = 20000) -> torch.Tensor:
    """[documents * (2 * length + 1)]: documents of an end-of-text id (0) and `length` random ids in [3, 3 +
    tokens) twice, one after another (seed 12345)."""
    g = torch.Generator().manual_seed(12345)
    x = torch.randint(3, 3 + tokens, (documents, length), generator=g)
    return torch.cat([torch.zeros(documents, 1, dtype=torch.long), x, x], 1).flatten()


def stream_rows(stream: torch.Tensor, step: int, batch: int, length: int) -> torch.Tensor:
    """[batch, 2 * length]: windows of `stream` at random offsets seeded by `step`, as `dsv3 train` samples its
    batches from a dataset (`TokenData.batch`)."""
    starts = torch.randint(0, len(stream) - 2 * length, (batch,), generator=torch.Generator().manual_seed(step))
    return torch.stack([stream[s : s + 2 * length] for s in starts.tolist()])


def train_copy(model, forward, lr: float, steps: int, batch: int, length: int, tokens: int, every: int = 100,
               stream: torch.Tensor | None = None) -> list[float]:
    """Trains `model` on the copy task; returns the mean second-copy loss (nats/token) of each `every` steps (given
    a `copy_stream`, rows are its `stream_rows` and the figure is the mean loss over every position)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    curve, window = [], []
    for step in range(steps):
        rows = copy_rows(step, batch, length, tokens) if stream is None else stream_rows(stream, step, batch, length)
        logits = forward(model, rows[:, :-1])  # [B, 2L - 1, V]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="none")
        nll = nll.view(batch, -1)  # position t predicts token t + 1: the second copy is positions L .. 2L - 2
        opt.zero_grad(set_to_none=True)
        nll.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(float((nll if stream is not None else nll[:, length:]).detach().mean()))
        if len(window) == every:
            curve.append(sum(window) / every)
            window = []
    return curve


def _dsv3(cfg, seed: int):
    model = dsv3.DeepseekV3(cfg)
    model.init_weights(seed=seed)
    return model, lambda m, x: m(x, mtp=False).logits


def _transformers_deepseek(cfg, seed: int):
    import transformers

    from train_speed import hf_config

    return transformers.DeepseekV3ForCausalLM(hf_config(cfg)), lambda m, x: m(input_ids=x).logits


def _llama(cfg, seed: int):
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range)), lambda m, x: m(input_ids=x).logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-config", default="small", help="preset or config.json (its MTP module is dropped)")
    ap.add_argument("--lrs", default="5e-4,1e-3", help="comma-separated constant learning rates")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", default="0", help="comma-separated initial-weight seeds")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=32, help="tokens per copy")
    ap.add_argument("--tokens", type=int, default=1000, help="distinct token ids drawn")
    ap.add_argument("--stream", action="store_true", help="rows at random offsets into a stream of copy documents "
                    "(as `dsv3 train` samples); prints the mean loss over every position")
    ap.add_argument("--hf", action="store_true", help="also train transformers' DeepseekV3 of the same config")
    ap.add_argument("--llama", action="store_true", help="also train transformers' Llama of the same shape")
    args = ap.parse_args()
    cfg = dsv3.get_config(args.model_config).replace(num_nextn_predict_layers=0)
    tokens = min(args.tokens, cfg.vocab_size - 3)
    print(f"{args.model_config}: copy task, batch {args.batch} x 2 x {args.length}, ids from {tokens} tokens "
          f"(chance {math.log(tokens):.2f} nats); {'loss over every position' if args.stream else 'second-copy loss'} "
          f"per 100 steps, {torch.get_num_threads()} threads")
    builders = [(f"dsv3 {args.model_config}", _dsv3)]
    builders += [("transformers DeepseekV3", _transformers_deepseek)] if args.hf else []
    builders += [("llama of the same shape", _llama)] if args.llama else []
    stream = copy_stream(args.length, tokens) if args.stream else None
    for lr in (float(x) for x in args.lrs.split(",")):
        for seed in (int(x) for x in args.seeds.split(",")):
            for name, build in builders:
                torch.manual_seed(seed)
                model, forward = build(cfg, seed)
                curve = train_copy(model.train(), forward, lr, args.steps, args.batch, args.length, tokens,
                                   stream=stream)
                print(f"{name}, lr {lr:g}, seed {seed}: " + " ".join(f"{c:.2f}" for c in curve), flush=True)

if __name__ == "__main__":
    main()
