"""Packed sequences (`DeepseekV3.forward(segments=...)`, `train.losses.packed_targets` / `packed_groups`): several
conversations in one row compute exactly what they compute one by one — logits, MTP logits, the losses (main, MTP,
sequence-wise balance) and every gradient — with the prompt tokens masked out of the targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.model.mla import packed_attention
from dsv3.train.balance import sequence_balance_loss
from dsv3.train.losses import IGNORE, packed_groups, packed_targets

LAMBDA, ALPHA = 0.3, 0.1  # MTP and balance-loss weights (large, so that their gradients matter in the comparison)


def _conversations(vocab: int, lengths=(9, 5, 12, 7), seed=0):
    """(ids [L], labels [L]) per conversation: labels[i] = ids[i+1] on "assistant" positions, IGNORE elsewhere
    (and at the last token, which has no next one inside its conversation)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = torch.full((n,), IGNORE)
        trained = torch.rand(n - 1, generator=g) < 0.6
        labels[:-1][trained] = ids[1:][trained]
        out.append((ids, labels))
    return out


def _pack(convs, rows: list[list[int]], width: int):
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE)
    segments = torch.full((len(rows), width), -1)  # padding: its own run, in no group
    for r, members in enumerate(rows):
        at = 0
        for c in members:
            x, y = convs[c]
            ids[r, at:at + len(x)], labels[r, at:at + len(x)], segments[r, at:at + len(x)] = x, y, c
            at += len(x)
    return ids, labels, segments


def _ce_sum(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def _packed_loss(model, ids, labels, segments):
    out = model(ids, segments=segments)
    positions, _ = packed_attention(segments)
    terms = []
    for k, logits in enumerate([out.logits] + out.mtp_logits):
        targets = packed_targets(labels, positions, k)
        terms.append(_ce_sum(logits, targets) / (targets != IGNORE).sum())
    n_main = sum(layer.is_moe for layer in model.main_layers)  # then one routing per MoE MTP module, by depth
    balance = []
    for i, info in enumerate(out.routing):
        depth = 0 if i < n_main else i - n_main + 1
        balance.append(sequence_balance_loss(info, ids.shape[0], packed_groups(segments, positions, depth)))
    return terms[0] + LAMBDA * sum(terms[1:]) + ALPHA * sum(balance), out


def _one_by_one_loss(model, convs):
    """The reference: each conversation alone; every CE summed over all conversations and divided by the total
    count of its targets, the balance loss averaged over the conversations (per MoE layer)."""
    sums, counts, balance = None, None, None
    for ids, labels in convs:
        out = model(ids[None])
        logits = [out.logits] + out.mtp_logits
        these = [_ce_sum(lg, labels[None, k:k + lg.shape[1]]) for k, lg in enumerate(logits)]
        n = [int((labels[k:k + lg.shape[1]] != IGNORE).sum()) for k, lg in enumerate(logits)]
        b = [sequence_balance_loss(info, 1) for info in out.routing]
        sums = these if sums is None else [a + c for a, c in zip(sums, these)]
        counts = n if counts is None else [a + c for a, c in zip(counts, n)]
        balance = b if balance is None else [a + c for a, c in zip(balance, b)]
    terms = [s / c for s, c in zip(sums, counts)]
    return terms[0] + LAMBDA * sum(terms[1:]) + ALPHA * sum(x / len(convs) for x in balance)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = dsv3.DeepseekV3(dsv3.get_config("tiny"))
    for layer in m.model.layers:  # a non-zero selection bias, so that routing differences would show
        if layer.is_moe:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


def test_packed_logits_equal_one_by_one(model):
    convs = _conversations(model.config.vocab_size)
    ids, _, segments = _pack(convs, [[0, 1], [2, 3]], 20)
    with torch.no_grad():
        out = model(ids, segments=segments)
        at = {0: (0, 0), 1: (0, 9), 2: (1, 0), 3: (1, 12)}
        for c, (x, _) in enumerate(convs):
            alone = model(x[None])
            r, s = at[c]
            torch.testing.assert_close(out.logits[r, s:s + len(x)], alone.logits[0], rtol=0, atol=1e-5)
            mtp = alone.mtp_logits[0][0]
            torch.testing.assert_close(out.mtp_logits[0][r, s:s + len(mtp)], mtp, rtol=0, atol=1e-5)


def test_packed_loss_and_gradients_equal_one_by_one(model):
    convs = _conversations(model.config.vocab_size)
    ids, labels, segments = _pack(convs, [[0, 1], [2, 3]], 20)
    loss, _ = _packed_loss(model, ids, labels, segments)
    loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = _one_by_one_loss(model, convs)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    for name, p in model.named_parameters():
        if p.grad is None:
            assert name not in packed
            continue
        torch.testing.assert_close(packed[name], p.grad, rtol=0, atol=1e-5, msg=name)
    assert any(p.abs().sum() > 0 for n, p in packed.items() if "gate.weight" in n)  # the balance loss reached routers

    # the comparison can fail: the same rows without their segments (one causal sequence each) differ
    with torch.no_grad():
        plain = model(ids)
        positions, _ = packed_attention(segments)
        wrong = _ce_sum(plain.logits, packed_targets(labels, positions, 0)) / (labels != IGNORE).sum()
        right = _ce_sum(model(ids, segments=segments).logits, packed_targets(labels, positions, 0)) / (
            labels != IGNORE).sum()
    assert abs(float(wrong - right)) > 1e-3


def test_targets_never_cross_a_document():
    # two documents of 3 and 2 tokens, then one padding token
    segments = torch.tensor([[4, 4, 4, 7, 7, -1]])
    labels = torch.tensor([[10, 11, IGNORE, 20, IGNORE, IGNORE]])
    positions, _ = packed_attention(segments)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert packed_targets(labels, positions, 0).tolist() == labels.tolist()
    # depth 1 at position i predicts labels[i+1] when i+1 is in i's document
    assert packed_targets(labels, positions, 1).tolist() == [[11, IGNORE, IGNORE, IGNORE, IGNORE]]
    groups = packed_groups(segments, positions, 1)
    assert groups.tolist() == [[0, 0, -1, 3, -1]]  # document start index as the id; -1 across ends and padding


def test_segments_are_checked(model):
    ids = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="segments must be"):
        model(ids, segments=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="segments must be"):
        model(ids, cache=model.new_cache(1, 8), segments=torch.zeros(1, 6, dtype=torch.long))
