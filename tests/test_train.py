"""Training: balancing, losses, MTP targets, data preparation, exact resume, HF-loadable checkpoints."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dsv3
from conftest import fit_until_killed
from dsv3.model.moe import RoutingInfo
from dsv3.runs import read_metrics
from dsv3.tokenizer import EOT
from dsv3.train import balance
from dsv3.train.data import DataError, TokenData, prepare, read_documents
from dsv3.train.losses import IGNORE, mtp_targets
from dsv3.train.schedule import lr_at
from dsv3.train.trainer import TrainConfig, Trainer, TrainError, resume_config


def tiny_cfg(dataset, out, **kw):
    base = dict(model_config="tiny", data=str(dataset), out=str(out), max_steps=6, batch_size=4, seq_len=32,
                lr=3e-3, warmup_steps=2, checkpoint_every=3, progress=False, bias_update_speed=0.01)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------------ balance
def test_bias_moves_toward_balance():
    bias = torch.zeros(4)
    balance.update_expert_bias(bias, torch.tensor([10.0, 0.0, 5.0, 6.0]), gamma=0.001)
    # mean load 5.25: overloaded experts 0 and 3 lose gamma, underloaded 1 and 2 gain it
    assert bias.tolist() == pytest.approx([-0.001, 0.001, 0.001, -0.001])
    balance.update_expert_bias(bias, torch.tensor([10.0, 0.0, 5.0, 6.0]), gamma=0.0)
    assert bias.tolist() == pytest.approx([-0.001, 0.001, 0.001, -0.001])  # gamma 0 freezes


def test_sequence_balance_loss_equals_hand_computation():
    # one sequence, T = 2 tokens, E = 4 experts, K = 1
    scores = torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]])
    info = RoutingInfo(topk_idx=torch.tensor([[0], [1]]), topk_weight=torch.ones(2, 1), scores=scores,
                       load=torch.tensor([1.0, 1, 0, 0]))
    # f_i = E/(K T) * count_i = 4/2 * [1, 1, 0, 0] = [2, 2, 0, 0]
    # s' rows already sum to 1, P = mean over tokens = [0.45, 0.25, 0.15, 0.15]
    # L = 2*0.45 + 2*0.25 = 1.4
    assert balance.sequence_balance_loss(info, batch_size=1).item() == pytest.approx(1.4)
    # two sequences: computed per sequence, then averaged
    info2 = RoutingInfo(torch.tensor([[0], [1], [2], [2]]), torch.ones(4, 1),
                        torch.cat([scores, torch.full((2, 4), 0.25)]), torch.zeros(4))
    second = 4 / 2 * 2 * 0.25  # f = [0, 0, 4, 0], P = 0.25 each
    assert balance.sequence_balance_loss(info2, batch_size=2).item() == pytest.approx((1.4 + second) / 2)


def test_max_violation():
    assert balance.max_violation(torch.tensor([2.0, 2, 2, 2])) == 0
    assert balance.max_violation(torch.tensor([4.0, 0, 2, 2])) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ MTP targets
def test_mtp_targets_shift_and_stop_at_document_ends():
    eot = 0
    tokens = torch.tensor([[5, 6, 7, 0, 8, 9, 10, 11]])  # T + 1 = 8
    # depth 1: position i predicts token i+2
    assert mtp_targets(tokens, 1, None).tolist() == [[7, 0, 8, 9, 10, 11]]
    # masked where an end-of-text lies among tokens i+1..i+1: position 2 (token i+1 = 0) would predict 8
    assert mtp_targets(tokens, 1, eot).tolist() == [[7, 0, IGNORE, 9, 10, 11]]
    # depth 2: targets tokens[i+3]; crossing when tokens i+1 or i+2 is the end-of-text (positions 1, 2)
    assert mtp_targets(tokens, 2, eot).tolist() == [[0, IGNORE, IGNORE, 10, 11]]


def test_model_mtp_logits_align_with_targets():
    """The depth-1 logits the model returns have exactly one target per position."""
    model = dsv3.DeepseekV3(dsv3.get_config("tiny"))
    tokens = torch.randint(1, 256, (2, 17))
    out = model(tokens[:, :-1])
    assert out.mtp_logits[0].shape[1] == mtp_targets(tokens, 1, 0).shape[1]


# ------------------------------------------------------------------------------------------------ schedule
def test_lr_schedule_shape():
    lrs = [lr_at(s, 1000, 1.0, 100) for s in range(1000)]
    assert lrs[0] == pytest.approx(0.01) and lrs[99] == pytest.approx(1.0)
    assert lrs[500] == 1.0  # constant phase
    assert lrs[800] < 1.0 and lrs[999] == pytest.approx(0.1)  # cosine down to 10%, then flat
    assert all(a >= b for a, b in zip(lrs[676:], lrs[677:]))


# ------------------------------------------------------------------------------------------------ data
def test_prepare_holds_out_whole_documents_and_warns(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha beta gamma\n" * 50)
    (src / "b.txt").write_text("delta epsilon\n" * 50)
    (src / "empty.txt").write_text("   \n")
    (src / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (src / "c.jsonl").write_text(json.dumps({"text": "zeta eta theta"}) + "\n" + json.dumps({"text": "iota"}))
    with pytest.warns(UserWarning) as record:
        meta = prepare(tmp_path / "data", [src], vocab_size=280, val_fraction=0.5)
    messages = " ".join(str(w.message) for w in record)
    assert "empty.txt" in messages and "latin1.txt" in messages and "not UTF-8" in messages
    docs = meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
    assert len(docs) == 4 and not set(meta["splits"]["train"]["documents"]) & set(meta["splits"]["val"]["documents"])
    data = TokenData(tmp_path / "data", "train")
    assert data.ids[0] == data.eot_id == meta["eot_id"]
    tok = dsv3.tokenizer.load_tokenizer(tmp_path / "data")
    assert tok.token_to_id(EOT) == meta["eot_id"]


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(DataError, match="nope.txt does not exist"):
        read_documents([tmp_path / "nope.txt"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected .* \"text\""):
        read_documents([bad])


# ------------------------------------------------------------------------------------------------ trainer
def _metric_rows(run):
    rows = read_metrics(run)
    for r in rows:  # wall-clock fields differ between runs
        r.tokens_per_s = r.mfu = r.step_time = 0.0
    return rows


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_cross_entropy_equals_torchs(reduction, dtype, weighted):
    """The training losses' cross-entropy equals `F.cross_entropy(ignore_index=IGNORE)`: the loss and the logits'
    gradient, with ignored rows (zero gradient), through a bf16 cast and an upstream scale, and again through a
    retained graph (the zero-bubble pipeline schedules differentiate the last stage's loss twice); with per-row
    weights, torch's per-row losses times the weights (the mean still divided by the count)."""
    from dsv3.train.losses import cross_entropy

    torch.manual_seed(0)
    logits = (torch.randn(37, 300) * 3).to(dtype)  # [N, V]
    targets = torch.randint(0, 300, (37,))
    targets[[0, 5, 6, 30]] = IGNORE
    weights = torch.rand(37) + 0.5 if weighted else None
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = cross_entropy(ours, targets, reduction, weights)
    expect = torch.nn.functional.cross_entropy(ref.float(), targets, ignore_index=IGNORE, reduction="none")
    expect = expect * (weights if weighted else 1)
    expect = expect.sum() / (33 if reduction == "mean" else 1)
    upstream = torch.tensor(1.7)  # a scale from above (a loss weight), through the backward
    for _ in range(2):  # the second pass through the retained graph accumulates the same gradient again
        (loss * upstream).backward(retain_graph=True)
        (expect * upstream).backward(retain_graph=True)
    torch.testing.assert_close(loss, expect, rtol=1e-6, atol=0)
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=1e-7)  # ~1 ulp
    assert ours.grad[[0, 5, 6, 30]].abs().max() == 0 and ours.grad[1].abs().max() > 0


def test_record_weights_make_each_records_mean():
    """Two packed rows: records of 2, 3 and 1 targets (and a padded tail): each target weighs 1 / its record's
    targets, ignored ones 0, and there are 3 records. At MTP depth 1 (position i predicts labels[i + 1] of its own
    record) the second record keeps 2 targets, and the third, whose one target is its first label, none: 2
    records."""
    from dsv3.model.mla import packed_positions
    from dsv3.train.losses import packed_groups, packed_targets, record_weights

    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, -1, -1, -1]])
    labels = torch.tensor([[IGNORE, 4, 5, 6, 7, 8, IGNORE], [9, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]])
    positions = packed_positions(segments)
    weights, records = record_weights(labels, packed_groups(segments, positions))
    assert records == 3
    half, third = 1 / 2, 1 / 3
    torch.testing.assert_close(weights, torch.tensor([[0, half, half, third, third, third, 0], [1, 0, 0, 0, 0, 0, 0]]))
    targets = packed_targets(labels, positions, 1)  # [2, 6]
    weights, records = record_weights(targets, packed_groups(segments, positions, 1))
    assert records == 2
    torch.testing.assert_close(weights, torch.tensor([[half, half, 0, half, half, 0], [0, 0, 0, 0, 0, 0]]))


def test_cross_entropy_edge_cases_match_torchs():
    """Every target ignored: a nan mean with a zero gradient, as torch's; a target out of range raises; a target
    whose probability underflows fp32 (exp(-300)) still gets its finite loss and gradient, as torch's; logits near
    2000 keep each row's loss to 1e-5."""
    from dsv3.train.losses import cross_entropy

    far = torch.tensor([[0.0, 0.0, -300.0, 1.0], [50.0, -250.0, 0.0, 0.0]], requires_grad=True)
    ref = far.detach().clone().requires_grad_()
    targets = torch.tensor([2, 1])
    loss, expect = cross_entropy(far, targets), torch.nn.functional.cross_entropy(ref, targets)
    (loss + expect).backward()
    assert loss.isfinite() and loss > 150
    torch.testing.assert_close(loss, expect, rtol=1e-6, atol=0)
    torch.testing.assert_close(far.grad, ref.grad, rtol=1e-6, atol=1e-7)
    big = torch.randn(8, 500, generator=torch.Generator().manual_seed(0)) * 3 + 2000  # large logits cancel first
    targets = torch.arange(8) * 7
    for row in range(8):  # each row's loss within 1e-5 of fp64 (2000 + log-sum-exp in fp32 is ~1e-4 coarse)
        expect = torch.nn.functional.cross_entropy(big[row : row + 1].double(), targets[row : row + 1])
        assert abs(float(cross_entropy(big[row : row + 1], targets[row : row + 1])) - float(expect)) < 1e-5

    logits = torch.randn(4, 10, requires_grad=True)
    loss = cross_entropy(logits, torch.full((4,), IGNORE))
    loss.backward()
    assert loss.isnan() and torch.equal(logits.grad, torch.zeros(4, 10))
    assert cross_entropy(logits, torch.full((4,), IGNORE), "sum") == 0
    for bad in (-1, 10):
        with pytest.raises(RuntimeError):
            cross_entropy(logits, torch.tensor([1, 2, bad, 3]))
    with pytest.raises(ValueError, match="weights"):
        cross_entropy(logits, torch.tensor([1, 2, 3, 4]), "sum", torch.ones(3))


def test_mtp_loss_shares_add_up_to_the_global_mean():
    """Ranks (or micro-batches) with unevenly masked MTP targets: each divides its sum by its share of the global
    count, so their mean is the one-process loss; per-part means would not be."""
    from dsv3.train.losses import mtp_losses, mtp_valid_counts

    torch.manual_seed(0)
    tokens = torch.randint(2, 50, (4, 17))
    tokens[0, 3] = tokens[0, 9] = tokens[1, 5] = 1  # end-of-text tokens in the first half's rows only
    logits = [torch.randn(4, 16 - k, 50) for k in (1, 2)]
    whole = mtp_losses(logits, tokens, eot_id=1)
    share = [c / 2 for c in mtp_valid_counts(tokens, 2, eot_id=1)]
    halves = [mtp_losses([x[r] for x in logits], tokens[r], 1, over=share) for r in (slice(0, 2), slice(2, 4))]
    for k in range(2):
        assert (halves[0][k] + halves[1][k]) / 2 == pytest.approx(float(whole[k]), rel=1e-6)
        means = [mtp_losses([x[r] for x in logits], tokens[r], 1)[k] for r in (slice(0, 2), slice(2, 4))]
        assert abs((means[0] + means[1]) / 2 - whole[k]) > 1e-3  # what the trainers did before


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_resume_equals_uninterrupted_run(dataset, tmp_path, moments):
    """Also with bf16 AdamW moments: they come back as bf16 (torch's load_state_dict casts them to fp32), so the
    resumed steps round them as the uninterrupted ones do."""
    Trainer(tiny_cfg(dataset, tmp_path / "straight", optimizer_state_dtype=moments)).fit()

    # dies during step 5, after the step-3 checkpoint and step 4's metrics
    fit_until_killed(tiny_cfg(dataset, tmp_path / "killed", optimizer_state_dtype=moments), 4)
    assert len(_metric_rows(tmp_path / "killed")) == 4
    resumed = Trainer(resume_config(tmp_path / "killed"), resume=True)
    assert resumed.step == 3
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[moments]
    assert all(s["exp_avg"].dtype == dtype for s in resumed.optimizer.state.values())
    resumed.fit()
    straight, again = _metric_rows(tmp_path / "straight"), _metric_rows(tmp_path / "killed")
    assert [r.step for r in again] == [1, 2, 3, 4, 5, 6]
    assert again == straight  # losses, grad norms, loads and biases, bit for bit


def test_aux_free_training_moves_biases_and_checkpoints_carry_them(dataset, tmp_path):
    trainer = Trainer(tiny_cfg(dataset, tmp_path / "run", max_steps=3, checkpoint_every=3))
    trainer.fit()
    rows = _metric_rows(tmp_path / "run")
    first_load = torch.tensor(rows[0].load[0], dtype=torch.float)
    bias_after_1 = torch.tensor(rows[0].bias[0])
    expected = 0.01 * torch.sign(first_load.mean() - first_load)
    assert torch.allclose(bias_after_1, expected)
    assert rows[0].balance_loss > 0 and len(rows[0].mtp_loss) == 1
    back = dsv3.load_pretrained(dsv3.resolve_checkpoint(tmp_path / "run"))
    assert torch.equal(back.model.layers[1].mlp.gate.e_score_correction_bias,
                       trainer.model.model.layers[1].mlp.gate.e_score_correction_bias)
    ckpt = dsv3.resolve_checkpoint(tmp_path / "run")
    assert (ckpt / "tokenizer.json").exists()
    assert (ckpt / "trainer_state.json").exists() and (ckpt / "trainer_state.safetensors").exists()
    assert not list((tmp_path / "run").rglob("*.pt"))  # no pickle anywhere
    state = dsv3.runs.load_trainer_state(ckpt)
    assert state["step"] == 3 and state["train_config"]["seed"] == 0 and state["rng"].dtype == torch.uint8
    optimizer = trainer.optimizer.state_dict()
    assert state["optimizer"]["param_groups"] == optimizer["param_groups"]  # betas come back as a tuple
    for i, moments in optimizer["state"].items():
        for name, t in moments.items():
            assert torch.equal(state["optimizer"]["state"][i][name], t), (i, name)


@pytest.mark.parametrize("mode", ["aux_loss", "none"])
def test_other_balance_modes_keep_bias_fixed(dataset, tmp_path, mode):
    trainer = Trainer(tiny_cfg(dataset, tmp_path / mode, max_steps=2, balance=mode, mtp_depth=0))
    last = trainer.fit()
    assert all(b == 0 for layer in last.bias for b in layer)
    assert (last.balance_loss > 0) == (mode == "aux_loss")
    assert last.mtp_loss == [] and trainer.model.config.num_nextn_predict_layers == 0


def test_training_checkpoint_loads_in_transformers(dataset, tmp_path):
    import transformers

    Trainer(tiny_cfg(dataset, tmp_path / "run", max_steps=3)).fit()
    ckpt = dsv3.resolve_checkpoint(tmp_path / "run")
    ours = dsv3.load_pretrained(ckpt).eval()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids).logits, atol=1e-4, rtol=0)


def test_eval_reports_consistent_bpb(dataset, tmp_path):
    from dsv3.train.evaluate import evaluate

    Trainer(tiny_cfg(dataset, tmp_path / "run", max_steps=2)).fit()
    model = dsv3.load_pretrained(dsv3.resolve_checkpoint(tmp_path / "run"))
    r = evaluate(model, dataset, seq_len=32)
    # reference: the split read straight from val.bin, cut into windows of 32 predicted tokens (the next window
    # starts at the last window's final token, so every token but the first is predicted exactly once)
    meta = json.loads((Path(dataset) / "meta.json").read_text())
    ids = torch.from_numpy(np.fromfile(Path(dataset) / "val.bin", dtype=meta["dtype"]).astype(np.int64))
    nats, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 32):
            window = ids[s : s + 33]
            logits = model(window[None, :-1]).logits[0]
            nats += float(torch.nn.functional.cross_entropy(logits.double(), window[1:], reduction="sum"))
            count += len(window) - 1
    assert r["tokens"] == count == len(ids) - 1
    assert r["loss"] == pytest.approx(nats / count, rel=1e-6)
    data = TokenData(dataset, "val")
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bpb"] == pytest.approx(r["loss"] * len(data) / data.bytes / math.log(2))


def test_bad_settings_are_named(dataset, tmp_path):
    with pytest.raises(TrainError, match="balance"):
        Trainer(tiny_cfg(dataset, tmp_path, balance="magic"))
    with pytest.raises(TrainError, match="max_steps"):
        Trainer(tiny_cfg(dataset, tmp_path, max_steps=None))
    for average, rule in (("record", "an sft setting"), ("sample", "must be one of")):
        with pytest.raises(TrainError, match=f"loss_average = '{average}': .*{rule}"):
            Trainer(tiny_cfg(dataset, tmp_path, loss_average=average))
    toml = tmp_path / "t.toml"
    toml.write_text("[train]\nbatch_size = 2\nlearning_rate = 3\n")
    with pytest.raises(TrainError, match="learning_rate"):
        TrainConfig.from_toml(toml)
    with pytest.raises(DataError, match="no meta.json"):
        Trainer(tiny_cfg(tmp_path, tmp_path / "r"))


def test_toml_config_and_flags(dataset, tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text(f'model_config = "tiny"\ndata = "{dataset}"\nmax_steps = 2\nseq_len = 16\nbatch_size = 2\n')
    cfg = TrainConfig.from_toml(toml, out=str(tmp_path / "run"), max_steps=1, progress=False)
    assert cfg.max_steps == 1 and cfg.seq_len == 16
    assert Trainer(cfg).fit().step == 1


def test_routing_simulator_balances():
    from dsv3.train.simulate import simulate

    hist = simulate(n_experts=16, n_group=4, topk_group=2, top_k=4, dim=32, tokens_per_step=512, steps=150,
                    gamma=0.002)
    frozen, free = hist["frozen"]["max_vio"], hist["aux_free"]["max_vio"]
    assert frozen[0] == free[0] > 1.0
    assert sum(frozen[-20:]) / 20 > 1.0 and sum(free[-20:]) / 20 < 0.4


# ------------------------------------------------------------------------------------------------ accumulation, bf16
def _step_with_grads(trainer):
    """One train_step; (its metrics, every parameter's gradient as the optimizer is about to use it)."""
    grads, step = {}, trainer.optimizer.step

    def record(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = record
    return trainer.train_step(), grads


def test_grad_accum_equals_one_batch_of_the_same_rows(dataset, tmp_path):
    """2 micro-batches of B/2 make the same step as one batch of B holding the same rows. The trainer draws
    micro-batch m of step s from (seed, s, m), so the one-batch trainer is fed micro-batches 0 and 1 concatenated."""
    # no clipping (the gradients compared are the accumulated ones); seed 1 draws no document end (see below)
    kw = dict(grad_clip=1e9, seq_aux_alpha=0.01, seed=1)
    accum = Trainer(tiny_cfg(dataset, tmp_path / "accum", batch_size=2, grad_accum=2, **kw))
    whole = Trainer(tiny_cfg(dataset, tmp_path / "whole", batch_size=4, grad_accum=1, **kw))
    draw = whole.data.batch
    rows = torch.cat([draw(2, 32, 1, 0, m) for m in (0, 1)])
    whole.data.batch = lambda batch_size, seq_len, seed, step, micro=0: torch.cat(
        [draw(batch_size // 2, seq_len, seed, step, m) for m in (0, 1)])
    # MTP and balance losses are per-micro-batch means: equal to the whole batch's only when the halves have as
    # many unmasked MTP targets, i.e. no document boundary inside these windows
    assert not (rows == whole.data.eot_id).any(), "the drawn windows cross a document end; pick another seed"

    (a, grads_a), (b, grads_b) = _step_with_grads(accum), _step_with_grads(whole)
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.mtp_loss == pytest.approx(b.mtp_loss, rel=1e-6)
    assert a.balance_loss == pytest.approx(b.balance_loss, rel=1e-5) and a.balance_loss > 0
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    assert a.load == b.load and a.bias == b.bias and a.tokens == b.tokens == 4 * 32
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_b.items():
        torch.testing.assert_close(grads_a[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name)
    wa, wb = accum.model.state_dict(), whole.model.state_dict()
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-5, msg=name)


def test_compiled_layers_train_as_eager(dataset, tmp_path):
    """--compile (every decoder layer and the MTP module through torch.compile, the routed experts' grouped GEMMs
    eager) makes eager's steps: the first step's loss and every gradient (fp32 rounding: measured 6e-7 of each
    tensor's largest), then the second step's loss and the weights (AdamW's first steps move a parameter by ~lr
    whatever its gradient's size, so rounding-sized gradient differences become 1e-5-sized weight differences);
    and it is refused where it is untested."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    kw = dict(seq_aux_alpha=0.01, max_steps=2)
    eager = Trainer(tiny_cfg(dataset, tmp_path / "eager", **kw))
    compiled = Trainer(tiny_cfg(dataset, tmp_path / "compiled", compile=True, **kw))
    (a, grads_a), (b, grads_b) = _step_with_grads(compiled), _step_with_grads(eager)
    assert counters["stats"]["unique_graphs"] > graphs  # inductor really compiled the layers
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.mtp_loss == pytest.approx(b.mtp_loss, rel=1e-6)
    assert a.balance_loss == pytest.approx(b.balance_loss, rel=1e-6) and a.load == b.load
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_b.items():
        torch.testing.assert_close(grads_a[name], g, rtol=0, atol=2e-6 * g.abs().max().item(), msg=name)
    a, b = compiled.train_step(), eager.train_step()
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.load == b.load
    wa, wb = compiled.model.state_dict(), eager.model.state_dict()
    assert wa.keys() == wb.keys()  # compiling in place keeps the checkpoint names
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-4, msg=name)
    for field, value in (("precision", "fp8"), ("zero", 3)):
        with pytest.raises(TrainError, match=f"{field} = .*not supported with compile"):
            Trainer(tiny_cfg(dataset, tmp_path / field, compile=True, **{field: value}))


def test_bf16_autocast_trains_a_step(dataset, tmp_path):
    fp32 = Trainer(tiny_cfg(dataset, tmp_path / "fp32", max_steps=1)).fit()
    bf16 = Trainer(tiny_cfg(dataset, tmp_path / "bf16", max_steps=1, precision="bf16")).fit()
    assert math.isfinite(bf16.loss) and bf16.loss != fp32.loss  # bf16 GEMMs really ran ...
    assert bf16.loss == pytest.approx(fp32.loss, abs=0.05)  # ... on the same model and batch


# ------------------------------------------------------------------------------------------------ checkpoints, plots
def test_rotation_keeps_the_two_newest_checkpoints(dataset, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_cfg(dataset, run, max_steps=3, checkpoint_every=1, keep_checkpoints=2, batch_size=2,
                     seq_len=16)).fit()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]


def test_plot_writes_three_pngs_with_layer_names(trained_run, tmp_path, monkeypatch, capsys):
    import matplotlib.figure
    import matplotlib.text

    from dsv3.cli import main

    figures = []  # the text of every figure saved
    savefig = matplotlib.figure.Figure.savefig

    def recording_savefig(fig, *args, **kwargs):
        figures.append([t.get_text() for t in fig.findobj(matplotlib.text.Text)])
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    assert main(["plot", str(trained_run), "--out", str(tmp_path / "plots")]) == 0
    names = ["expert_bias.png", "expert_load.png", "loss.png"]
    assert sorted(Path(p).name for p in capsys.readouterr().out.split()) == names
    for png in names:
        data = (tmp_path / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    layers = dsv3.ModelConfig.from_json(dsv3.resolve_checkpoint(trained_run) / "config.json").moe_layer_names()
    assert layers == ["layer 1", "layer 2", "MTP 1"]  # the tiny preset: two main MoE layers and the MTP module's
    assert len(figures) == 3
    for texts in figures:  # the legend of loss.png, the rows of expert_load.png, the panels of expert_bias.png
        for layer in layers:
            assert any(layer in t for t in texts), (layer, texts)


def test_plots_of_a_run_with_one_logged_step_raise_no_warning(trained_run, tmp_path):
    """A run stopped after its first logged step (a short `--minutes` demo) still plots: the expert-load map of a
    single step gets a one-step-wide axis rather than matplotlib's warning about equal limits."""
    import shutil
    import warnings

    from dsv3.train.plots import plot_run

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = plot_run(run, tmp_path / "plots")
    assert sorted(Path(p).name for p in paths) == ["expert_bias.png", "expert_load.png", "loss.png"]


# ------------------------------------------------------------------------------------------------ time budget
def _timed_trainer(step_s, checkpoint_s=0.5, kill_at=None):
    """A Trainer on a fake clock: step n (1-based) takes step_s(n) seconds, a checkpoint checkpoint_s; it dies at
    the start of step kill_at + 1. `saved_at[step]`: the clock when that step's checkpoint began."""

    class Timed(Trainer):
        def clock(self):
            return self.now

        def train_step(self):
            if self.step == kill_at:
                raise KeyboardInterrupt
            metrics = super().train_step()
            self.now += step_s(self.step)
            return metrics

        def save_checkpoint(self):
            self.saved_at[self.step] = self.now
            self.now += checkpoint_s
            return super().save_checkpoint()

    Timed.now, Timed.saved_at = 0.0, {}
    return Timed


def _small(dataset, out, **kw):
    return tiny_cfg(dataset, out, checkpoint_every=10, batch_size=1, seq_len=8, **kw)


def test_frozen_total_keeps_the_steps_run_before_the_decay():
    from dsv3.train.schedule import decay_start_step, frozen_total, mtp_weight_at

    assert frozen_total(40, 50) == 58  # 50 would have put steps 34..39 in the decay; 57 would put step 39 there
    for step in range(1, 150):
        for estimate in (1, step // 2, step, step + 1, 2 * step):
            total = frozen_total(step, estimate)
            assert total >= estimate and decay_start_step(total) >= step
            assert all(lr_at(s, total, 1.0, 0) == 1.0 and mtp_weight_at(s, total) == 0.3 for s in range(step))
            assert total == estimate or decay_start_step(total - 1) < step  # the least such length


@pytest.mark.parametrize("step_s", [
    lambda n: 0.3 if n <= 25 else 0.5,  # slowed mid-run: timing steps 4-13 alone planned 84 steps, cut at 65
    lambda n: 0.5 if n <= 25 else 0.3,  # busy at the start: ... planned 53 steps, ended after 23.9 s of 30
], ids=["slowed", "busy-start"])
def test_time_budget_re_estimates_until_the_decay(dataset, tmp_path, step_s):
    trainer = _timed_trainer(step_s)(_small(dataset, tmp_path, max_steps=None, minutes=0.5))
    last = trainer.fit()
    assert abs(trainer.now - 30.0) <= 0.05 * 30.0, trainer.now  # within 5% of --minutes 0.5 (now: 29.5 s)
    total = trainer.total_steps  # now 62 (slowed), 70 (busy-start)
    assert not trainer.estimating and trainer.step == total  # the schedule ran to its end
    assert last.lr == pytest.approx(3e-3 * 0.1)  # ... down to min_lr_ratio x the peak
    # the steps run while estimating were all before the decay: the run followed the frozen length's schedule
    assert [r.lr for r in read_metrics(tmp_path)] == [lr_at(s, total, 3e-3, 2) for s in range(total)]


@pytest.mark.parametrize("kill_at", [15, 45], ids=["while-estimating", "after-freezing"])
def test_time_budget_run_resumes_exactly(dataset, tmp_path, kill_at):
    """A resumed --minutes run has what its earlier sessions left of the budget (saved with each checkpoint); one
    killed while estimating goes on estimating against it, one killed later keeps the frozen step count."""
    killed = _timed_trainer(lambda n: 0.5, kill_at=kill_at)(_small(dataset, tmp_path, max_steps=None, minutes=0.5))
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    before = _metric_rows(tmp_path)
    assert len(before) == kill_at
    resumed = _timed_trainer(lambda n: 0.5)(resume_config(tmp_path), resume=True)
    checkpoint = resumed.step
    assert checkpoint == kill_at // 10 * 10 and resumed.estimating == (kill_at == 15)
    assert resumed.budget_spent_s == killed.saved_at[checkpoint]
    if not resumed.estimating:
        assert resumed.total_steps == killed.total_steps  # the frozen step count, kept
    resumed.fit()
    used = killed.saved_at[checkpoint] + resumed.now  # the steps lost after the checkpoint do not count
    assert abs(used - 30.0) <= 0.05 * 30.0, used
    total = resumed.total_steps
    assert resumed.step == total
    again = _metric_rows(tmp_path)
    assert [r.step for r in again] == list(range(1, total + 1))
    assert again[:kill_at] == before  # the steps run again after the checkpoint: losses, loads, biases bit for bit
    assert [r.lr for r in again] == [lr_at(s, total, 3e-3, 2) for s in range(total)]  # one schedule throughout
