"""Group Relative Policy Optimization (GRPO): the RL objective of DeepSeek-V3's post-training (report section
5.2.2), introduced in DeepSeekMath (Shao et al. 2024, eq. 3 and section 4.1.2). No critic: for each question q,
G responses o_1..o_G are sampled from the old policy, scored by a rule-based reward r_i, and each response's
advantage is its reward standardised within its own group.

    A_i      = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)       (std: the sample std, ddof = 1, as TRL's
                                                                      GRPOTrainer; 0 for a group whose rewards are
                                                                      all equal: it teaches nothing)
    ratio_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    KL_it    = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1        (Schulman's unbiased, always >= 0 estimator)
    J        = 1/G sum_i 1/|o_i| sum_t [ min(ratio_it A_i, clip(ratio_it, 1 - e, 1 + e) A_i) - beta KL_it ]

The loss is -J, averaged over the questions of a batch: each response's tokens are averaged first, then the
responses of a group, as the formula writes it. pi_old is the policy that sampled (its log-probabilities are
recomputed by the training forward before the updates, not taken from the engine, whose absorbed / compiled /
speculative path rounds differently); pi_ref is a frozen copy of the starting policy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load_pretrained, save_pretrained
from ..errors import Dsv3Error
from ..infer import Engine, SamplingParams
from ..runs import RunError, load_trainer_state, resolve_checkpoint, trainer_state_files, write_atomic
from ..tasks import check, extract_answer, make_splits, read_task_records
from ..tokenizer import ChatTemplate, load_tokenizer, stop_token_ids
from ..train.optim import AdamW


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] (P questions, G responses each) -> advantages [P, G]: (r - mean) / (std + eps) per row, with
    the sample std (ddof 1); rows whose rewards are all equal get 0. G must be >= 2."""
    if rewards.shape[-1] < 2:
        raise ValueError(f"GRPO needs at least 2 responses per question, got {rewards.shape[-1]}")
    rewards = rewards.double()
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)  # unbiased
    same = (rewards == rewards[..., :1]).all(-1, keepdim=True)
    return torch.where(same, torch.zeros_like(rewards), (rewards - mean) / (std + eps)).float()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor,
              advantages: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04) -> tuple[torch.Tensor, dict]:
    """-J of the module docstring over a batch of groups.

    logp, old_logp, ref_logp: [P, G, T] log-probabilities of each sampled token under the current, the sampling
    and the reference policy (ref_logp may be None when beta is 0); mask [P, G, T] bool, True on response tokens
    (every response has at least one); advantages [P, G] (`group_advantages`).
    Returns (loss, stats): the scalar loss (gradient through logp only) and detached figures: "kl" (mean per-token
    KL estimate over response tokens), "clip_fraction" (share of response tokens whose ratio was clipped where
    that changed the objective), "ratio" (mean ratio).
    """
    mask = mask.to(logp.dtype)
    tokens = mask.sum(-1)  # [P, G]
    if bool((tokens == 0).any()):
        raise ValueError("every response needs at least one token in mask")
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages[..., None].to(logp.dtype)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    objective = torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference policy's log-probabilities")
        log_ratio = ref_logp.detach() - logp  # log(pi_ref / pi_theta)
        kl = torch.exp(log_ratio) - log_ratio - 1
    per_token = objective - beta * kl
    per_response = (per_token * mask).sum(-1) / tokens  # [P, G]
    loss = -per_response.mean(-1).mean()
    with torch.no_grad():
        n = mask.sum()
        clipped_tokens = (clipped < unclipped).to(mask.dtype) * mask
        stats = {"kl": float((kl * mask).sum() / n), "clip_fraction": float(clipped_tokens.sum() / n),
                 "ratio": float((ratio * mask).sum() / n)}
    return loss, stats


# ------------------------------------------------------------------------------------------------ the loop


class GRPOError(Dsv3Error, ValueError):
    """A bad GRPO setting; the message names it."""


@dataclasses.dataclass
class GRPOConfig:
    """Settings of `dsv3 grpo` (flags of the same names)."""

    policy: str  # checkpoint or run to improve (also the frozen reference)
    task: str  # a task name (its training split for `seed`) or a task directory / train.jsonl
    out: str
    steps: int = 50  # rollout batches, each followed by `updates` policy updates
    prompts: int = 8  # questions per rollout batch (P)
    group: int = 8  # responses per question (G)
    temperature: float = 1.0
    max_new_tokens: int = 64
    updates: int = 1  # policy updates per rollout batch (mu); with 1, the ratio is 1 and clipping never acts
    lr: float = 1e-5
    warmup_steps: int = 0  # the lr rises linearly over the first N steps: lr * (step + 1) / N at 0-based step
    clip_eps: float = 0.2
    beta: float = 0.04  # KL penalty coefficient (0: no reference model)
    format_reward: float = 0.1  # reward for a reply with an "Answer:" line that is wrong (1 for a correct one)
    seed: int = 0
    train_examples: int = 5000  # with a task name: the size of the training split drawn
    checkpoint_every: int = 25  # save weights + optimizer state every this many steps (and at the end)

    def validate(self) -> GRPOConfig:
        """Itself, when every setting is in range.

        Raises:
            GRPOError: the first bad setting, named with its value.
        """
        for name in ("steps", "prompts", "max_new_tokens", "updates", "train_examples", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise GRPOError(f"{name} = {getattr(self, name)!r}: must be an integer >= 1")
        if self.group < 2:
            raise GRPOError(f"group = {self.group}: GRPO needs at least 2 responses per question")
        if not self.temperature > 0:
            raise GRPOError(f"temperature = {self.temperature}: sampling needs a temperature > 0")
        if self.lr <= 0 or self.clip_eps <= 0 or self.beta < 0:
            raise GRPOError("lr and clip_eps must be > 0, beta >= 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise GRPOError(f"warmup_steps = {self.warmup_steps!r}: must be an integer >= 0")
        return self


def _questions(cfg: GRPOConfig) -> list[dict]:
    from ..tasks import TASKS

    if cfg.task in TASKS:
        return [e.record() for e in make_splits(cfg.task, cfg.train_examples, 0, cfg.seed)[0]]
    path = Path(cfg.task)
    return read_task_records(path / "train.jsonl" if path.is_dir() else path)


def step_lr(cfg: GRPOConfig, step: int) -> float:
    """The learning rate of 0-based rollout step `step` (all its `updates`): `cfg.lr`, times (step + 1) /
    `cfg.warmup_steps` during the warm-up. A function of the step alone, so a resumed run gets the same rates.
    Why warm up: AdamW's first update is sign-like (m / sqrt(v) = g / |g| per weight at step 1), every weight
    moves by about lr whatever its gradient's size, which at an lr that suits later steps can undo SFT."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def reward(answer: str, reply: str, format_reward: float) -> float:
    """1 for a correct reply (`tasks.check`), `format_reward` for a wrong one that states an answer, else 0."""
    if check(answer, reply):
        return 1.0
    return format_reward if extract_answer(reply) is not None else 0.0


def _token_logps(model, prompts: list[list[int]], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [N, R] of each response token given its prompt and the response so far (R the longest
    response; zero-padded) and the response mask [N, R], from one training forward over right-padded rows."""
    n = len(prompts)
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    longest = max(len(r) for r in responses)
    ids = torch.zeros(n, width, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
    logits = model(ids, mtp=False).logits.float()  # [N, W, V]
    mask = torch.zeros(n, longest, dtype=torch.bool)
    rows = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if r:
            at = torch.arange(len(p) - 1, len(p) + len(r) - 1)
            rows.append(F.log_softmax(logits[i, at], -1).gather(-1, torch.tensor(r)[:, None])[:, 0])
        else:
            rows.append(logits.new_zeros(0))
        mask[i, : len(r)] = True
    logps = torch.stack([torch.cat([x, x.new_zeros(longest - len(x))]) for x in rows])
    return logps, mask


def _save(out: Path, step: int, policy, optimizer, cfg: GRPOConfig, extra: dict[str, bytes]) -> Path:
    """OUT/checkpoints/step-N: the policy (official format) with the tokenizer files and the GRPO state (step,
    settings, AdamW state) as JSON + safetensors, never a pickle."""
    state = trainer_state_files({"step": step, "total_steps": cfg.steps, "train_config": dataclasses.asdict(cfg),
                                 "optimizer": optimizer.state_dict()})
    return save_pretrained(policy, out / "checkpoints" / f"step-{step:08d}", extra_files={**extra, **state})


def run_grpo(cfg: GRPOConfig, log=print, resume: bool = False) -> list[dict]:
    """GRPO from `cfg.policy` on `cfg.task`: each step samples `group` replies to `prompts` questions with the
    engine (per-request seeds from (seed, step, question, sample): the same rollouts on any rerun), rewards them
    with the task's checker, recomputes the old and reference log-probabilities with the training forward, then
    takes `updates` AdamW steps on `grpo_loss` at `step_lr`. Writes OUT/metrics.jsonl (lr, reward, accuracy, KL,
    response length, clip fraction, loss per step) and checkpoints OUT/checkpoints/step-N every `checkpoint_every`
    steps and at the end. The routing bias stays as the policy had it and the MTP modules are not trained. Returns
    the per-step metrics of this call.

    resume: continue OUT from its latest checkpoint (its weights and AdamW state; the reference stays `policy`).
    Rollouts depend only on (seed, step), so a resumed run equals the uninterrupted one.

    Raises:
        GRPOError: a bad setting; OutputExistsError (from the caller's claim) for an existing out.
    """
    cfg.validate()
    source = resolve_checkpoint(cfg.policy)
    out = Path(cfg.out)
    policy = load_pretrained(source)
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.beta else None
    start, state = 0, None
    if resume:
        try:
            latest = resolve_checkpoint(out)
            state = load_trainer_state(latest)
        except RunError as e:
            raise GRPOError(f"cannot resume {out}: {e}") from None
        policy = load_pretrained(latest)
        start = int(state["step"])
    tok, template = load_tokenizer(source), ChatTemplate(source)
    stops = stop_token_ids(tok, source)
    questions = _questions(cfg)
    order = torch.randperm(len(questions), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    optimizer = AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.95),
                      weight_decay=0.0, state_dtype=torch.float32)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    extra = {f.name: f.read_bytes() for f in source.iterdir()
             if f.name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "grpo_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    metrics = out / "metrics.jsonl"
    if resume and metrics.exists():  # drop rows written after the checkpoint resumed from
        rows = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= start]
        write_atomic(metrics, "".join(r + "\n" for r in rows))
    history = []
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        batch = [questions[order[(step * cfg.prompts + i) % len(order)]] for i in range(cfg.prompts)]
        prompts = [template.encode(tok, [{"role": "user", "content": q["prompt"]}]) for q in batch]
        policy.eval()
        engine = Engine(policy, tok, max_batch=min(cfg.prompts * cfg.group, 64),
                        max_len=max(len(p) for p in prompts) + cfg.max_new_tokens)
        reqs = [[engine.submit(p, SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                                 seed=(cfg.seed * 1_000_003 + step) * 10_007 + i * cfg.group + g,
                                                 stop_ids=stops, stop_strings=template.default_stops))
                 for g in range(cfg.group)] for i, p in enumerate(prompts)]
        while not all(r.done for group in reqs for r in group):
            engine.step()
        rewards = torch.tensor([[reward(q["answer"], r.text, cfg.format_reward) for r in group]
                                for q, group in zip(batch, reqs)])
        correct = sum(check(q["answer"], r.text) for q, group in zip(batch, reqs) for r in group)
        flat_prompts = [p for p in prompts for _ in range(cfg.group)]
        responses = [r.output if r.output else [stops[0]] for group in reqs for r in group]
        advantages = group_advantages(rewards)
        shape = (cfg.prompts, cfg.group, -1)
        with torch.no_grad():
            old, mask = _token_logps(policy, flat_prompts, responses)
            ref = _token_logps(reference, flat_prompts, responses)[0] if reference is not None else None
        policy.train()
        lr = step_lr(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.updates):
            logp, _ = _token_logps(policy, flat_prompts, responses)
            loss, stats = grpo_loss(logp.view(shape), old.view(shape), None if ref is None else ref.view(shape),
                                    mask.view(shape), advantages, cfg.clip_eps, cfg.beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
        row = {"step": step + 1, "lr": lr, "reward": float(rewards.mean()), "accuracy": correct / rewards.numel(),
               "kl": stats["kl"], "clip_fraction": stats["clip_fraction"], "loss": float(loss.detach()),
               "response_tokens": float(mask.sum(-1).float().mean()),
               "groups_with_signal": int((advantages.abs().sum(-1) > 0).sum()), "seconds": time.perf_counter() - t0}
        history.append(row)
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"step {row['step']}: reward {row['reward']:.3f}, accuracy {row['accuracy']:.3f}, kl {row['kl']:.4f}, "
            f"{row['response_tokens']:.1f} tokens/response")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save(out, step + 1, policy, optimizer, cfg, extra)
    return history
