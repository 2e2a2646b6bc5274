"""Distillation: the logit-KD loss (zero with zero gradient when teacher == student), the trainer's teacher
(tokenizer check), and sequence-level distillation's rejection sampling feeding SFT (`dsv3 distill`)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import dsv3.posttrain.distill as distill
from dsv3.cli import main
from dsv3.tasks import write_task_data
from dsv3.train.losses import IGNORE, distillation_kl


def test_kd_loss_is_zero_with_zero_gradient_for_the_same_logits():
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    student = logits.clone().requires_grad_(True)
    targets = torch.tensor([[1, IGNORE, 3, 4, IGNORE], [IGNORE, 2, 2, 2, 0]])
    loss = distillation_kl(student, logits, targets, temperature=2.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert abs(float(loss.detach())) < 1e-12 and float(grad.abs().max()) < 1e-12


def test_kd_loss_is_the_forward_kl_on_target_positions():
    torch.manual_seed(0)
    s, t = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    targets = torch.tensor([[5, IGNORE, 1, 2]])
    want = 0.0
    for i in (0, 2, 3):  # KL(p_t || p_s) at temperature 2, times 4
        p, q = F.softmax(t[0, i] / 2, -1), F.softmax(s[0, i] / 2, -1)
        want += float((p * (p.log() - q.log())).sum()) * 4
    assert float(distillation_kl(s, t, targets, 2.0)) == pytest.approx(want, rel=1e-5)
    weights = torch.tensor([[0.5, 9.0, 0.25, 0.25]])  # (9.0 sits on an ignored position)
    weighted = 0.0
    for i, w in ((0, 0.5), (2, 0.25), (3, 0.25)):
        p, q = F.softmax(t[0, i] / 2, -1), F.softmax(s[0, i] / 2, -1)
        weighted += w * float((p * (p.log() - q.log())).sum()) * 4
    assert float(distillation_kl(s, t, targets, 2.0, weights)) == pytest.approx(weighted, rel=1e-5)


def test_logit_distillation_from_itself_has_zero_main_loss(trained_run, tmp_path):
    write_task_data(tmp_path / "data", "count", 20, 2, seed=0)
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(trained_run), "--student", str(trained_run), "--mode", "logits",
                 "--data", str(tmp_path / "data"), "--out", str(out), "--max-steps", "1", "--batch-size", "2",
                 "--seq-len", "256", "--no-progress", "--peak-flops", "1e12"]) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"]) < 1e-6  # the KL between equal models (kd_alpha 1: no cross-entropy)


def test_a_teacher_with_another_tokenizer_is_refused(trained_run, tmp_path, capsys):
    import shutil

    from dsv3.runs import resolve_checkpoint

    other = tmp_path / "other"
    shutil.copytree(resolve_checkpoint(trained_run), other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzzz"] = 299  # a different vocabulary
    (other / "tokenizer.json").write_text(json.dumps(tok))
    write_task_data(tmp_path / "data", "count", 10, 2, seed=0)
    assert main(["distill", "--teacher", str(other), "--student", str(trained_run), "--mode", "logits", "--data",
                 str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--max-steps", "1", "--seq-len", "256",
                 "--no-progress"]) == 2
    assert "its tokenizer is not the student's" in capsys.readouterr().err
    # a student extended past the teacher's positions: refused at setup, not at the first long record
    cfg = json.loads((resolve_checkpoint(trained_run) / "config.json").read_text())
    assert main(["distill", "--teacher", str(trained_run), "--student", str(trained_run), "--mode", "logits",
                 "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run2"), "--max-steps", "1", "--seq-len",
                 str(2 * cfg["max_position_embeddings"]), "--extend-context", "4", "--no-progress"]) == 2
    assert "fewer than seq_len" in capsys.readouterr().err


def test_sequence_distillation_keeps_verified_replies_and_trains_on_them(trained_run, tmp_path, monkeypatch,
                                                                          capsys):
    # the tiny teacher never solves a task: a verifier that accepts replies of even length stands in for one
    monkeypatch.setattr(distill, "check", lambda answer, reply: len(reply.strip()) % 2 == 0)
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(trained_run), "--student", str(trained_run), "--mode", "sequence",
                 "--data", "reverse", "--questions", "6", "--samples", "3", "--sample-max-tokens", "8",
                 "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--seq-len", "256", "--no-progress",
                 "--peak-flops", "1e12"]) == 0
    stats = json.loads((tmp_path / "run.samples" / "stats.json").read_text())
    kept = [json.loads(x) for x in (tmp_path / "run.samples" / "train.jsonl").read_text().splitlines()]
    assert stats["sampled"] == 18 and stats["kept"] == len(kept) > 0
    assert stats["keep_rate"] == pytest.approx(len(kept) / 18)
    assert all(len(r["messages"][1]["content"].strip()) % 2 == 0 for r in kept)  # only verified replies
    assert "keep rate" in capsys.readouterr().out
    assert (out / "metrics.jsonl").exists()
