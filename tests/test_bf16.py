"""BF16 paths against fp32 references, by value: AdamW with bf16 moments against torch.optim.AdamW, and the
bf16-autocast training step's loss and gradients against an fp32 step on the same weights and batch.

`train_beside_fp32` is shared with the FP8 training test (tests/test_fp8_training.py).
"""

import torch

from dsv3.train.optim import AdamW
from dsv3.train.trainer import TrainConfig, Trainer

BF16_HALF_ULP = 2.0**-8  # bf16 keeps 7 explicit mantissa bits: rounding error <= 2^-8 of the value


def capture_gradients(trainer: Trainer, step: bool = True) -> dict:
    """Wrap `trainer.optimizer.step` so each call first records the gradients it is about to apply (after the
    trainer's clipping); with step=False the update itself is skipped. Returns the dict it fills, name -> grad."""
    grads = {}
    real_step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.clear()
        grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs) if step else None

    trainer.optimizer.step = recording_step
    return grads


def gradient_error(grads: dict, ref: dict) -> float:
    """|g - g_ref| / |g_ref| over all parameters together (float64)."""
    assert grads.keys() == ref.keys(), sorted(set(grads) ^ set(ref))
    diff = sum(float((grads[n].double() - ref[n].double()).pow(2).sum()) for n in ref)
    norm = sum(float(ref[n].double().pow(2).sum()) for n in ref)
    return (diff / norm) ** 0.5


def train_beside_fp32(dataset, out, steps: int, **settings) -> tuple[Trainer, list[dict]]:
    """Train `steps` steps of the tiny model with `settings` (TrainConfig fields, e.g. precision). Before each,
    an fp32 trainer loaded with that run's current weights and routing biases runs the same step (same batch,
    same MTP weight) without updating. Returns the trainer and, per step, the run's loss and gradients with the
    fp32 ones: the deviation a step's arithmetic causes, free of the drift two free-running curves accumulate.
    Gradient clipping is off so that the recorded gradients are the raw ones."""
    common = dict(model_config="tiny", data=str(dataset), max_steps=steps, batch_size=4, seq_len=64, lr=3e-3,
                  warmup_steps=2, checkpoint_every=steps, progress=False, grad_clip=1e9)
    trainer = Trainer(TrainConfig(out=str(out / "run"), **{**common, **settings}))
    ref = Trainer(TrainConfig(out=str(out / "fp32"), **common))
    grads, ref_grads = capture_gradients(trainer), capture_gradients(ref, step=False)
    rows = []
    for _ in range(steps):
        ref.model.load_state_dict(trainer.model.state_dict())
        ref.step = trainer.step
        ref_loss = ref.train_step().loss
        loss = trainer.train_step().loss
        rows.append({"loss": loss, "ref_loss": ref_loss, "loss_error": abs(loss - ref_loss) / ref_loss,
                     "grad_error": gradient_error(grads, ref_grads)})
    return trainer, rows


def check_bf16_autocast_step_tracks_fp32(dataset, out) -> list[dict]:
    """Three bf16-autocast training steps, each against an fp32 step on the same weights and batch: the loss
    within 1e-3 relative and the gradients within 6e-2 (relative norm, all parameters together), yet not equal
    (bf16 really ran). Measured on this tiny run over 6 steps: loss 3e-5 to 2.4e-4, gradients 0.6e-2 to 2.8e-2
    (bf16 rounds each GEMM's output to 2^-8, compounded over the layers and the backward).
    Raises AssertionError otherwise; returns the per-step rows."""
    _, rows = train_beside_fp32(dataset, out, 3, precision="bf16")
    for i, r in enumerate(rows, start=1):
        assert r["loss_error"] < 1e-3, f"step {i}: loss {r['loss']} vs fp32 {r['ref_loss']}"
        assert r["grad_error"] < 6e-2, f"step {i}: gradients differ from fp32 by {r['grad_error']:.3g}"
        assert r["grad_error"] > 1e-4, f"step {i}: gradients equal fp32's: autocast did not run in bf16"
    return rows


def test_bf16_autocast_step_tracks_fp32(dataset, tmp_path):
    check_bf16_autocast_step_tracks_fp32(dataset, tmp_path)


def check_bf16_moment_adamw_tracks_torch_adamw(state_dtype: torch.dtype = torch.bfloat16) -> None:
    """dsv3's AdamW against torch.optim.AdamW on the same gradients (20 steps, two parameter groups, weight decay
    on one, gradients spanning four decades). fp32 moments: equal to 1e-6. bf16 moments: each stored moment is
    rounded to 2^-8 relative, so the moments stay within 2e-2 (relative norm; measured <= 6e-3) and the
    parameters' movement within 1e-2 (measured <= 2.6e-3). Raises AssertionError otherwise."""
    w0, b0 = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)), torch.linspace(-1, 1, 48)

    def build(make):
        w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
        return (w, b), make([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95))

    ours, opt = build(lambda groups, **kw: AdamW(groups, state_dtype=state_dtype, **kw))
    ref, ref_opt = build(torch.optim.AdamW)
    gen = torch.Generator().manual_seed(1)
    scale = torch.logspace(-3, 1, 48)  # columns whose gradients differ by 10^4
    for _ in range(20):
        grads = (torch.randn(64, 48, generator=gen) * scale + 0.1 * scale, torch.randn(48, generator=gen) * scale)
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    exact = state_dtype == torch.float32
    for name, p, q, start in zip(("matrix", "vector"), ours, ref, (w0, b0)):
        state, ref_state = opt.state[p], ref_opt.state[q]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == state_dtype
        for key in ("exp_avg", "exp_avg_sq"):
            err = float((state[key].double() - ref_state[key].double()).norm() / ref_state[key].double().norm())
            assert err < (1e-6 if exact else 2e-2), f"{name} {key} is {err:.2e} from torch's"
        moved, ref_moved = (p - start).detach().double(), (q - start).detach().double()
        err = float((moved - ref_moved).norm() / ref_moved.norm())
        assert err < (1e-6 if exact else 1e-2), f"{name}: the update is {err:.2e} from torch's"


def test_adamw_matches_torch_adamw_with_fp32_and_bf16_moments():
    check_bf16_moment_adamw_tracks_torch_adamw(torch.float32)
    check_bf16_moment_adamw_tracks_torch_adamw(torch.bfloat16)
