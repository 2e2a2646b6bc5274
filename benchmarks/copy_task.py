"""How fast does a model learn to retrieve from its context, and what decides it? Small synthetic tasks trained
from scratch (or from a checkpoint), the loss on the predictable positions printed per 100 steps:

- `copy` (default, `copy_rows`): L random tokens, then the same L again (Olsson et al. 2022's repeated random
  tokens). Caution: the distance back to the source is always L and the second copy always starts at L, so a head
  that attends a fixed distance back solves it without matching content; `--shift S` (`shifted_rows`) moves the
  pair to a random offset, `--stream` cuts rows at random offsets from a stream of copy documents and `--data DIR`
  takes a dataset's training windows, both as `dsv3 train` samples.
- `needle` (`needle_rows`): a needle of --needle-size ids (from a set of --needles of their own) somewhere in L
  random filler ids, then a query id and the needle again: the plainest content retrieval. Passkey retrieval
  (issue 15) is of this kind, its prompt holding one number: a needle of a few tokens, copied in order.

`--answer-weight W` trains on mean(all positions) + W x mean(scored positions); 0 is the plain language-model loss
of `dsv3 train`. What it showed on `small` (README, "Context extension"): at LR 5e-4 the needle is found within ~250
steps when the answer weighs as much as the rest of its row (W = 1) and not in 500 steps under the plain loss,
where the answer is 1 position of 65; aligned copying is learned in 300-600 steps, at LR 1e-3 and above not at all.
`--hf` adds transformers' own DeepseekV3ForCausalLM of the same config (its own initialisation), `--llama`
transformers' LlamaForCausalLM of the same width, depth and heads (plain attention, full-width RoPE), for scale.

    OMP_NUM_THREADS=2 python benchmarks/copy_task.py [--task copy|needle] [--model-config small] [--lrs 5e-4,1e-3]
        [--steps 600] [--seeds 0] [--length 32] [--tokens 1000] [--shift S | --stream | --data DIR]
        [--needles 100] [--needle-size 1] [--answer-weight 0] [--init-from CKPT_OR_RUN] [--hf] [--llama]

Rows: --batch rows, ids drawn uniformly from [3, 3 + --tokens) (few enough distinct ids that each one's embedding
trains), AdamW (betas 0.9/0.95, weight decay 0.1, no warm-up, constant LR), gradients clipped at 1, seeded data per
step.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import dsv3

Rows = tuple[torch.Tensor, torch.Tensor]  # ids [B, T] and the scored predictions [B, T - 1] (t predicts t + 1)


def copy_rows(step: int, batch: int, length: int, tokens: int) -> Rows:
    """[batch, 2 * length]: random ids in [3, 3 + tokens), each row's first half repeated; scored: the second copy
    after its first token. Seeded by `step`. The offset back to the source is always `length` and so is the
    second copy's position: a head that attends a fixed distance back solves it, no content matching needed."""
    g = torch.Generator().manual_seed(step)
    x = torch.randint(3, 3 + tokens, (batch, length), generator=g)
    scored = torch.zeros(batch, 2 * length - 1, dtype=torch.bool)
    scored[:, length:] = True
    return torch.cat([x, x], 1), scored  # [B, 2L]


def shifted_rows(step: int, batch: int, length: int, tokens: int, shift: int) -> Rows:
    """[batch, 2 * length + shift] random ids in [3, 3 + tokens) with a copy pair (L tokens, then the same L) at a
    random offset p in [0, shift] per row; scored: the second copy after its first token. Where the second copy
    starts varies by row, so position alone does not tell a model when to copy (the distance back is still L).
    Seeded by `step`."""
    g = torch.Generator().manual_seed(step)
    rows = torch.randint(3, 3 + tokens, (batch, 2 * length + shift), generator=g)
    p = torch.randint(0, shift + 1, (batch,), generator=g)
    pos = torch.arange(2 * length + shift)
    src = (pos[None] - length).clamp(min=0)  # [1, T]: the position a second-copy token repeats
    second = (pos[None] >= p[:, None] + length) & (pos[None] < p[:, None] + 2 * length)  # [B, T]
    rows = torch.where(second, rows.gather(1, src.expand(batch, -1)), rows)
    return rows, second[:, 1:] & (pos[None, 1:] > p[:, None] + length)


QUERY = 2  # the id that asks for the needle


def needle_rows(step: int, batch: int, length: int, tokens: int, needles: int = 100, size: int = 1) -> Rows:
    """[batch, length + 1 + size]: `length` random filler ids in [3, 3 + tokens), `size` consecutive ones replaced
    at a random position by a needle (`size` ids from [3 + tokens, 3 + tokens + needles), a set of their own), then
    the QUERY id and the needle again; scored: the answer's `size` positions. The plainest content retrieval (what
    passkey retrieval asks: one number in filler): with size 1, one attention head that looks for the needle set
    wherever it is suffices; a longer needle (a number written digit by digit) must also be copied in order.
    Seeded by `step`."""
    g = torch.Generator().manual_seed(step)
    rows = torch.randint(3, 3 + tokens, (batch, length + 1 + size), generator=g)
    needle = torch.randint(3 + tokens, 3 + tokens + needles, (batch, size), generator=g)  # [B, size]
    at = torch.randint(0, length - size + 1, (batch,), generator=g)[:, None] + torch.arange(size)  # [B, size]
    rows.scatter_(1, at, needle)
    rows[:, length], rows[:, length + 1 :] = QUERY, needle
    scored = torch.zeros(batch, length + size, dtype=torch.bool)
    scored[:, length:] = True  # position length + i predicts the answer's token i
    return rows, scored


def copy_stream(length: int, tokens: int, documents: int = 20000) -> torch.Tensor:
    """[documents * (2 * length + 1)]: documents of an end-of-text id (0) and `length` random ids in [3, 3 +
    tokens) twice, one after another (seed 12345)."""
    g = torch.Generator().manual_seed(12345)
    x = torch.randint(3, 3 + tokens, (documents, length), generator=g)
    return torch.cat([torch.zeros(documents, 1, dtype=torch.long), x, x], 1).flatten()


def stream_rows(stream: torch.Tensor, step: int, batch: int, length: int) -> Rows:
    """[batch, 2 * length]: windows of `stream` at random offsets seeded by `step`, as `dsv3 train` samples its
    batches from a dataset (`TokenData.batch`); every position scored."""
    starts = torch.randint(0, len(stream) - 2 * length, (batch,), generator=torch.Generator().manual_seed(step))
    rows = torch.stack([stream[s : s + 2 * length] for s in starts.tolist()])
    return rows, torch.ones(batch, 2 * length - 1, dtype=torch.bool)


def train_rows(model, forward, rows_of, lr: float, steps: int, answer_weight: float = 0.0,
               every: int = 100) -> list[float]:
    """Trains `model` on `rows_of(step)` (`Rows`) with the loss mean(every position) + answer_weight x
    mean(scored positions): 0 is the plain language-model loss `dsv3 train` uses. Returns the mean loss on the
    scored positions (nats/token) over each `every` steps, printing each as it comes."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    curve, window = [], []
    for step in range(steps):
        rows, scored = rows_of(step)
        logits = forward(model, rows[:, :-1])  # [B, T - 1, V]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="none")
        nll = nll.view(rows.shape[0], -1)  # [B, T - 1]
        opt.zero_grad(set_to_none=True)
        (nll.mean() + answer_weight * nll[scored].mean()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(float(nll[scored].detach().mean()))
        if len(window) == every:
            curve.append(sum(window) / every)
            print(f"  steps {step + 2 - every}-{step + 1}: {curve[-1]:.2f}", flush=True)
            window = []
    return curve


def _dsv3(cfg, seed: int, init_from=None):
    if init_from is not None:  # a trained checkpoint's weights, its MTP module not loaded (`seed` is then unused)
        model = dsv3.load_pretrained(init_from, load_mtp=False, progress=False)
    else:
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
    ap.add_argument("--task", choices=["copy", "needle"], default="copy", help="copy: L random tokens twice; "
                    "needle: a needle of --needle-size ids in L filler ids, recalled after a query id (`needle_rows`)")
    ap.add_argument("--needles", type=int, default=100, help="needle: distinct needle ids (how many a model must "
                    "learn to copy)")
    ap.add_argument("--needle-size", type=int, default=1, help="needle: ids per needle, recalled in order")
    ap.add_argument("--shift", type=int, default=0, help="copy: the pair at a random offset in [0, SHIFT] of a "
                    "row of random tokens (`shifted_rows`)")
    ap.add_argument("--stream", action="store_true", help="copy: rows at random offsets into a stream of copy "
                    "documents, as `dsv3 train` samples; every position scored")
    ap.add_argument("--data", help="rows of 2 x LENGTH tokens from this dataset's training split, as `dsv3 train` "
                    "draws them (seed 0); every position scored")
    ap.add_argument("--answer-weight", type=float, default=0.0, help="loss = mean over every position + this x "
                    "mean over the scored ones (0: the plain language-model loss)")
    ap.add_argument("--init-from", help="start dsv3 from this checkpoint's weights instead of a random init "
                    "(with its config)")
    ap.add_argument("--hf", action="store_true", help="also train transformers' DeepseekV3 of the same config")
    ap.add_argument("--llama", action="store_true", help="also train transformers' Llama of the same shape")
    args = ap.parse_args()
    if sum(map(bool, (args.shift, args.stream, args.data, args.task == "needle"))) > 1:
        ap.error("--shift, --stream, --data and --task needle are different row sources: choose one")
    if args.task != "needle" and (args.needles, args.needle_size) != (100, 1):
        ap.error("--needles and --needle-size shape --task needle's rows")
    if args.shift < 0 or not 1 <= args.needle_size <= args.length or min(args.needles, args.length, args.batch) < 1:
        ap.error("need --shift >= 0, 1 <= --needle-size <= --length, and --needles, --length, --batch >= 1")
    init = dsv3.resolve_checkpoint(args.init_from) if args.init_from else None
    cfg = dsv3.get_config(init or args.model_config).replace(num_nextn_predict_layers=0)
    tokens = min(args.tokens, cfg.vocab_size - 3 - (args.needles if args.task == "needle" else 0))
    if args.data:
        from dsv3.train.data import TokenData

        data = TokenData(args.data, "train")
        if data.meta["vocab_size"] > cfg.vocab_size:
            ap.error(f"--data {args.data}: its vocabulary ({data.meta['vocab_size']}) exceeds the model's "
                     f"({cfg.vocab_size}); give --init-from a checkpoint of that tokenizer or a --model-config")

        def rows_of(step):
            rows = data.batch(args.batch, 2 * args.length - 1, 0, step)
            return rows, torch.ones(args.batch, 2 * args.length - 1, dtype=torch.bool)
        scored, chance = "every position of the dataset's windows", float("nan")
    elif args.stream:
        stream = copy_stream(args.length, tokens)
        rows_of = lambda step: stream_rows(stream, step, args.batch, args.length)  # noqa: E731
        scored, chance = "every position", math.log(tokens)
    elif args.task == "needle":
        rows_of = lambda step: needle_rows(step, args.batch, args.length, tokens, args.needles,  # noqa: E731
                                             args.needle_size)
        scored, chance = "the answer", math.log(args.needles)
    elif args.shift:
        rows_of = lambda step: shifted_rows(step, args.batch, args.length, tokens, args.shift)  # noqa: E731
        scored, chance = "the second copy", math.log(tokens)
    else:
        rows_of = lambda step: copy_rows(step, args.batch, args.length, tokens)  # noqa: E731
        scored, chance = "the second copy", math.log(tokens)
    task = "dataset windows" if args.data else args.task
    print(f"{init or args.model_config}: {task}, batch {args.batch}, length {args.length}"
          + ("" if args.data else f", ids from {tokens} tokens") + f"; loss on {scored} per 100 steps"
          + ("" if args.data else f" (chance {chance:.2f} nats)")
          + f", answer weight {args.answer_weight:g}, {torch.get_num_threads()} threads", flush=True)
    name = f"dsv3 from {init}" if init else f"dsv3 {args.model_config}"
    builders = [(name, lambda cfg, seed: _dsv3(cfg, seed, init))]
    builders += [("transformers DeepseekV3", _transformers_deepseek)] if args.hf else []
    builders += [("llama of the same shape", _llama)] if args.llama else []
    for lr in (float(x) for x in args.lrs.split(",")):
        for seed in (int(x) for x in args.seeds.split(",")):
            for name, build in builders:
                torch.manual_seed(seed)
                model, forward = build(cfg, seed)
                curve = train_rows(model.train(), forward, rows_of, lr, args.steps, args.answer_weight)
                print(f"{name}, lr {lr:g}, seed {seed}: " + " ".join(f"{c:.2f}" for c in curve), flush=True)


if __name__ == "__main__":
    main()
