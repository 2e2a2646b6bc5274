"""The GRPO objective (`posttrain.grpo`) against the formula worked out by hand in plain Python: advantages with a
zero-variance group, the clipped ratio, the KL estimator, the token-then-response averaging, and the gradient."""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.posttrain.grpo import group_advantages, grpo_loss


def _reference(logp, old, ref, mask, rewards, eps_clip, beta):
    """-J for nested lists [P][G][T] written straight from DeepSeekMath's eq. 3."""
    total = 0.0
    for p in range(len(rewards)):
        r = rewards[p]
        g = len(r)
        mean = sum(r) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (g - 1))
        adv = [0.0 if all(x == r[0] for x in r) else (x - mean) / (std + 1e-4) for x in r]
        group = 0.0
        for i in range(g):
            terms = []
            for t in range(len(mask[p][i])):
                if not mask[p][i][t]:
                    continue
                ratio = math.exp(logp[p][i][t] - old[p][i][t])
                clipped = min(max(ratio, 1 - eps_clip), 1 + eps_clip)
                obj = min(ratio * adv[i], clipped * adv[i])
                q = math.exp(ref[p][i][t] - logp[p][i][t])
                terms.append(obj - beta * (q - math.log(q) - 1))
            group += sum(terms) / len(terms)
        total += group / g
    return -total / len(rewards)


def test_loss_equals_the_formula_by_hand():
    # question 0: rewards 1, 0, 1 (a real group); question 1: all 1 (zero variance, no signal from the ratio)
    logp = [[[-0.5, -1.0, -2.0], [-0.3, -0.2, -0.9], [-1.5, -0.1, -0.7]],
            [[-0.4, -0.6, -0.8], [-0.2, -0.3, -0.1], [-0.9, -1.1, -0.5]]]
    old = [[[-0.9, -1.0, -1.7], [-0.3, -0.5, -0.2], [-1.0, -0.1, -0.7]],  # ratios well above and below 1 +- 0.2
           [[-0.4, -0.6, -0.8], [-0.2, -0.3, -0.1], [-0.9, -1.1, -0.5]]]
    ref = [[[-0.6, -0.9, -2.2], [-0.4, -0.2, -1.0], [-1.2, -0.3, -0.6]],
           [[-0.5, -0.5, -0.9], [-0.1, -0.4, -0.2], [-1.0, -1.0, -0.4]]]
    mask = [[[1, 1, 0], [1, 1, 1], [1, 0, 0]], [[1, 1, 1], [1, 0, 0], [1, 1, 0]]]  # ragged responses
    rewards = [[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in dict(logp=logp, old=old, ref=ref).items()}
    logp_t = t["logp"].clone().requires_grad_(True)
    adv = group_advantages(torch.tensor(rewards))
    assert adv[1].abs().sum() == 0  # zero-variance group
    for beta in (0.0, 0.04, 0.5):
        loss, stats = grpo_loss(logp_t, t["old"], t["ref"], torch.tensor(mask, dtype=torch.bool), adv.double(),
                                clip_eps=0.2, beta=beta)
        assert float(loss.detach()) == pytest.approx(_reference(logp, old, ref, mask, rewards, 0.2, beta), abs=1e-6)
    assert 0 < stats["clip_fraction"] < 1 and stats["kl"] > 0
    # the gradient of a clipped token is zero; of an unclipped one, -A/(G |o_i| P) * ratio (beta 0)
    loss, _ = grpo_loss(logp_t, t["old"], None, torch.tensor(mask, dtype=torch.bool), adv.double(), 0.2, 0.0)
    (grad,) = torch.autograd.grad(loss, logp_t)
    ratio = math.exp(-0.5 + 0.9)  # question 0, response 0, token 0: ratio 1.49 > 1.2 with A > 0: clipped
    assert ratio > 1.2 and float(adv[0, 0]) > 0 and float(grad[0, 0, 0]) == 0.0
    ratio = math.exp(-0.2 + 0.5)  # response 1 (A < 0), token 1: ratio 1.35, min picks the unclipped term
    expected = -float(adv[0, 1]) / (3 * 3 * 2) * ratio
    assert float(grad[0, 1, 1]) == pytest.approx(expected, rel=1e-6)
    assert float(grad[1].abs().sum()) == 0.0  # the zero-variance group contributes nothing (beta 0)
    assert float(grad[0, 0, 2]) == 0.0  # masked token


def test_advantages_are_standardised_per_group():
    adv = group_advantages(torch.tensor([[0.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]]))
    assert torch.allclose(adv[0], torch.tensor([-1.0, 1.0, 1.0, -1.0]) * 0.5 / (math.sqrt(1 / 3) + 1e-4))
    assert adv[1].abs().sum() == 0
    assert adv[2].sum().abs() < 1e-5 and adv[2, 3] > 0
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.tensor([[1.0]]))


def test_kl_is_zero_when_the_policy_is_the_reference():
    logp = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    loss, stats = grpo_loss(logp, logp, logp, mask, torch.zeros(2, 4, dtype=torch.float64), beta=1.0)
    assert float(loss) == 0.0 and stats["kl"] == 0.0 and stats["ratio"] == pytest.approx(1.0)


def test_warmup_scales_the_first_steps_lr():
    """`--warmup-steps N`: lr * (step + 1) / N for the first N steps, then lr; 0 (the default) leaves the lr."""
    from dsv3.posttrain.grpo import GRPOConfig, GRPOError, step_lr

    cfg = GRPOConfig(policy="p", task="reverse", out="o", lr=4e-4, warmup_steps=4)
    assert [step_lr(cfg, s) for s in range(6)] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4, 4e-4, 4e-4])
    assert step_lr(GRPOConfig(policy="p", task="reverse", out="o", lr=4e-4), 0) == 4e-4
    with pytest.raises(GRPOError, match="warmup_steps"):
        GRPOConfig(policy="p", task="reverse", out="o", warmup_steps=-1).validate()


def test_reward_is_correctness_then_format():
    from dsv3.posttrain.grpo import reward

    assert reward("12", "3+9=12\nAnswer: 12", 0.1) == 1.0
    assert reward("12", "Answer: 13", 0.1) == 0.1
    assert reward("12", "twelve", 0.1) == 0.0


def test_grpo_runs_are_deterministic_and_move_the_policy(trained_run, tmp_path, capsys, monkeypatch):
    """The tiny model never writes "Answer:", so every group would be all zeros: a reward that varies with the
    reply's length gives the updates a signal (the checker-based reward is tested above)."""
    import json

    import dsv3.posttrain.grpo as grpo
    from dsv3.checkpoint import load_pretrained
    from dsv3.cli import main
    from dsv3.runs import resolve_checkpoint

    def run(out, seed="0"):
        argv = ["grpo", str(trained_run), "--task", "reverse", "--out", str(tmp_path / out), "--steps", "2",
                "--prompts", "2", "--group", "3", "--max-new-tokens", "6", "--updates", "2", "--lr", "1e-3",
                "--seed", seed, "--no-progress"]
        assert main(argv) == 0
        return [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    monkeypatch.setattr(grpo, "reward", lambda answer, reply, format_reward: float(len(reply) % 3 == 0))
    a, b = run("a"), run("b")
    assert sum(r["groups_with_signal"] for r in a) > 0
    keys = ("reward", "accuracy", "kl", "clip_fraction", "loss", "response_tokens")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]  # same seeds, same run
    assert len(a) == 2 and a[1]["kl"] >= 0
    before = load_pretrained(resolve_checkpoint(trained_run)).state_dict()
    after = load_pretrained(resolve_checkpoint(tmp_path / "a")).state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the updates changed the weights
    assert main(["grpo", str(trained_run), "--task", "reverse", "--out", str(tmp_path / "a")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["grpo", str(trained_run), "--task", "reverse", "--out", str(tmp_path / "c"), "--group", "1"]) == 2
    assert "group = 1" in capsys.readouterr().err


def test_resumed_grpo_equals_the_uninterrupted_run(trained_run, tmp_path, monkeypatch, capsys):
    import json

    import dsv3.posttrain.grpo as grpo
    from dsv3.checkpoint import load_pretrained
    from dsv3.cli import main
    from dsv3.runs import resolve_checkpoint

    monkeypatch.setattr(grpo, "reward", lambda answer, reply, format_reward: float(len(reply) % 3 == 0))
    common = ["--task", "sort", "--prompts", "2", "--group", "3", "--max-new-tokens", "5", "--updates", "2",
              "--lr", "1e-3", "--warmup-steps", "3", "--checkpoint-every", "2", "--no-progress"]
    assert main(["grpo", str(trained_run), "--out", str(tmp_path / "whole"), "--steps", "4", *common]) == 0
    assert main(["grpo", str(trained_run), "--out", str(tmp_path / "cut"), "--steps", "2", *common]) == 0
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # a row written after the checkpoint, then "killed"
        f.write(json.dumps({"step": 3, "reward": -1}) + "\n")
    assert main(["grpo", "--resume", str(tmp_path / "cut"), "--steps", "4", "--no-progress"]) == 0

    def rows(run):
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert rows("cut") == rows("whole") and len(rows("whole")) == 4
    assert [r["lr"] for r in rows("whole")] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])  # warm-up resumed
    a = load_pretrained(resolve_checkpoint(tmp_path / "whole")).state_dict()
    b = load_pretrained(resolve_checkpoint(tmp_path / "cut")).state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    capsys.readouterr()
    assert main(["grpo", "--resume", str(tmp_path / "cut"), "--task", "add"]) == 2
    assert "--resume RUN continues" in capsys.readouterr().err
