"""The planner's activation model (`parallel.plan.saved_activations`) against what autograd really keeps: every
block's bytes equal the storages saved-tensor hooks see during a forward of dsv3's own modules, on tiny and small,
at two sequence lengths (the T x T attention term and the per-position RoPE term scale differently)."""

import pytest
import torch

from dsv3.config import get_config
from dsv3.model import DeepseekV3
from dsv3.parallel.pipeline import schedule_1f1b, schedule_dualpipe, schedule_zb1p
from dsv3.parallel.plan import in_flight, saved_activations, stage_activation_bytes
from dsv3.train.balance import sequence_balance_loss
from dsv3.train.losses import lm_loss


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves while fn() runs, less those of `exclude` (parameters,
    inputs that exist anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    alive = []  # every saved tensor stays referenced, so that no freed storage's address is reused and missed

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
            alive.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def planned(cfg, block, rows, t):
    return sum(b for _, b in saved_activations(cfg, block, rows, t))


@pytest.fixture(scope="module", params=["tiny", "small"])
def model(request):
    torch.manual_seed(0)
    m = DeepseekV3(get_config(request.param))
    m.init_weights(seed=0)
    return m


@pytest.mark.parametrize("attention", ["blocks", "sdpa"])
@pytest.mark.parametrize("t", [12, 16, 70])
def test_decoder_layers_save_what_the_planner_counts(model, t, attention, monkeypatch):
    """Both of the attention's CPU paths: query blocks (70 tokens: a partial second block) and, beyond
    BLOCK_CAUSAL_MAX_LEN (here set to 0), SDPA's flash kernel."""
    from dsv3.model import mla

    if attention == "sdpa":
        monkeypatch.setattr(mla, "BLOCK_CAUSAL_MAX_LEN", 0)
    cfg, rows = model.config, 2
    params = list(model.parameters())
    rope = model.model.rotary_emb(torch.arange(t), torch.float32)
    kinds = {}
    for layer in model.main_layers:
        kinds.setdefault("moe" if layer.is_moe else "dense", layer)
    assert set(kinds) == {"dense", "moe"}
    for kind, layer in kinds.items():
        h = torch.randn(rows, t, cfg.hidden_size, requires_grad=True)

        def run(layer=layer, h=h):
            out, info = layer(h, rope)
            if info is not None:  # the trainer computes the sequence-wise balance loss of every MoE layer
                sequence_balance_loss(info, rows)

        assert saved_bytes(run, params) == planned(cfg, kind, rows, t), kind


@pytest.mark.parametrize("t", [12, 16])
def test_head_and_mtp_projection_save_what_the_planner_counts(model, t):
    cfg, rows = model.config, 2
    params = list(model.parameters())
    tokens = torch.randint(0, cfg.vocab_size, (rows, t + 1))
    h = torch.randn(rows, t, cfg.hidden_size, requires_grad=True)
    assert saved_bytes(lambda: lm_loss(model.lm_head(model.model.norm(h)), tokens), params + [tokens]) == \
        planned(cfg, "head", rows, t)
    module = model.mtp_modules[0]
    emb = torch.randn(rows, t, cfg.hidden_size, requires_grad=True)
    proj = lambda: module.eh_proj(torch.cat([module.enorm(emb), module.hnorm(h)], dim=-1))  # noqa: E731
    assert saved_bytes(proj, params + [emb, h]) == planned(cfg, "mtp", rows, t)


def test_in_flight_micro_batches_follow_the_schedules():
    """Peak micro-batches held (DeepSeek-V3 report Table 2): 1F1B P - r on rank r; ZB-H1 P on every rank (a
    deferred weight gradient keeps its micro-batch); DualPipe P + 1 over its two stages."""
    p, chunks = 4, 16
    assert [in_flight(schedule_1f1b(r, p, chunks), {0: 1}) for r in range(p)] == [4, 3, 2, 1]
    assert [in_flight(schedule_zb1p(r, p, chunks), {0: 1}) for r in range(p)] == [p] * p
    assert max(in_flight(schedule_dualpipe(r, p, chunks), {0: 1, 1: 1}) for r in range(p)) == p + 1


def test_stage_bytes_add_the_blocks():
    cfg = get_config("small")
    n = cfg.num_hidden_layers
    whole = stage_activation_bytes(cfg, 0, n, 2, 64)
    assert whole == stage_activation_bytes(cfg, 0, 1, 2, 64) + stage_activation_bytes(cfg, 1, n, 2, 64) - \
        4 * 2 * 64 * cfg.hidden_size * (cfg.num_nextn_predict_layers > 0)  # the MTP embedding copy of a late stage


def test_a_whole_training_forward_saves_what_the_planner_counts(model):
    """The trainer's forward and losses over the whole model (main layers, head, MTP) equal the stage sum."""
    from dsv3.train.losses import mtp_losses

    cfg, rows, t = model.config, 2, 16
    tokens = torch.randint(0, cfg.vocab_size, (rows, t + 1))

    def run():
        out = model(tokens[:, :-1])
        lm_loss(out.logits, tokens)
        mtp_losses(out.mtp_logits, tokens, None)
        for info in out.routing:
            sequence_balance_loss(info, rows)

    measured = saved_bytes(run, list(model.parameters()) + [tokens])
    assert measured == stage_activation_bytes(cfg, 0, cfg.num_hidden_layers, rows, t)
