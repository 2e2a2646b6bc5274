"""Pipeline schedules on gloo: 1F1B and DualPipe give the loss and gradients of a sequential run."""

import sys
from pathlib import Path

import pytest
import torch

from dsv3.parallel.pipeline import schedule_1f1b, schedule_dualpipe, schedule_dualpipev, schedule_zb1p
from dsv3.parallel.plan import Layout, plan

WORKER = Path(__file__).parent / "workers" / "pp_worker.py"
sys.path.insert(0, str(WORKER.parent))
import pp_worker  # noqa: E402
from launch import run_ranks, train  # noqa: E402


def sequential(n_stages: int, chunks: int):
    stages = [pp_worker.stage(s) for s in range(n_stages)]
    xs, ys = pp_worker.micro_batches(chunks)
    total = 0.0
    for x, y in zip(xs, ys):
        h = x
        for st in stages:
            h = st(h)
        loss = pp_worker.loss(h, y)
        loss.backward()
        total += float(loss.detach())
    return total, {s: [p.grad for p in st.parameters()] for s, st in enumerate(stages)}


def cosine_difference(a, b):
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return 1 - float(a @ b / (a.norm() * b.norm()))


@pytest.mark.slow
@pytest.mark.parametrize("schedule, world, chunks", [("1f1b", 2, 4), ("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 2, 4),
                                                     ("dualpipe", 4, 8), ("dualpipe", 4, 12),
                                                     ("dualpipev", 2, 4), ("dualpipev", 2, 6),
                                                     ("dualpipev", 4, 8)])
def test_schedule_equals_sequential_run(tmp_path, schedule, world, chunks):
    results = run_ranks(WORKER, world, tmp_path, "--schedule", schedule, "--chunks", str(chunks))
    ref_loss, ref_grads = sequential(2 * world if schedule == "dualpipev" else world, chunks)
    assert abs(sum(r["loss"] for r in results) - ref_loss) < 1e-12 * max(1.0, abs(ref_loss))
    for res in results:  # every rank, and for DualPipe both copies of each stage
        for s, grads in res["grads"].items():
            assert cosine_difference(grads, ref_grads[s]) < 1e-10  # fp64, as DualPipe's own check
            for g, ref in zip(grads, ref_grads[s]):
                torch.testing.assert_close(g, ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("world, chunks", [(2, 4), (4, 8), (8, 20)])
def test_schedules_run_every_micro_batch_once(world, chunks):
    for r in range(world):
        ops = schedule_dualpipe(r, world, chunks)
        for d in (0, 1):
            assert sum(1 for op in ops if op[:2] == ("F", d)) == chunks // 2
            assert sum(1 for op in ops if op[:2] == ("B", d)) == chunks // 2
        assert sum(1 for op in ops if op[0] == "W") == sum(1 for op in ops if op[0] == "B" and len(op) > 2)
        ops = schedule_1f1b(r, world, chunks)
        assert ops.count(("F", 0)) == ops.count(("B", 0)) == chunks
        ops = schedule_dualpipev(r, world, chunks)
        for d in (0, 1):
            assert sum(1 for op in ops if op[:2] == ("F", d)) == sum(1 for op in ops if op[:2] == ("B", d)) == chunks
        ops = schedule_zb1p(r, world, chunks)
        assert ops.count(("F", 0)) == ops.count(("B", 0, "zb")) == ops.count(("W",)) == chunks
    with pytest.raises(ValueError, match="even"):
        schedule_dualpipe(0, 3, 6)


def _timeline(schedule, world: int, chunks: int, f: int, b: int, w: int) -> tuple[int, list[int]]:
    """Event simulation of a one-direction schedule with integer op costs (b: the input-gradient part of a split
    backward; an unsplit one costs b + w): the step's makespan and each rank's peak of micro-batches whose
    activations are held (forwarded, weight gradient not yet done)."""
    orders = [schedule(r, world, chunks) for r in range(world)]
    f_end = [[None] * chunks for _ in range(world)]
    b_end = [[None] * chunks for _ in range(world)]
    pos, busy_until, nf, nb, nw, peak = ([0] * world for _ in range(6))
    t = 0
    while any(pos[r] < len(orders[r]) for r in range(world)):
        for r in range(world):
            if busy_until[r] > t or pos[r] == len(orders[r]):
                continue
            op = orders[r][pos[r]]
            if op[0] == "F":
                ready = 0 if r == 0 else f_end[r - 1][nf[r]]
                if ready is None or ready > t:
                    continue
                f_end[r][nf[r]] = busy_until[r] = t + f
                nf[r] += 1
            elif op[0] == "B":
                ready = f_end[r][nb[r]] if r == world - 1 else b_end[r + 1][nb[r]]
                if ready is None or ready > t:
                    continue
                b_end[r][nb[r]] = busy_until[r] = t + b + (0 if len(op) > 2 else w)
                nb[r] += 1
                nw[r] += len(op) == 2  # an unsplit backward also frees the activations
            else:
                busy_until[r] = t + w
                nw[r] += 1
            peak[r] = max(peak[r], nf[r] - nw[r])
            pos[r] += 1
        t += 1
        assert t < 10_000, "the schedule deadlocks"
    return max(busy_until), peak


@pytest.mark.parametrize("world, chunks", [(2, 8), (4, 8), (4, 16), (8, 32)])
def test_zero_bubble_schedule_reaches_the_formula_within_1f1b_memory(world, chunks):
    """With F = B = W = 1 time unit (B: input gradient), 1F1B's bubble is (P-1)(F + B + W) and ZB-H1's
    (P-1)(F + B - W), a third, while no rank holds more than P micro-batches' activations (1F1B's peak)."""
    busy = chunks * 3
    span, peak = _timeline(schedule_1f1b, world, chunks, 1, 1, 1)
    assert span - busy == 3 * (world - 1) and max(peak) == world
    span, peak = _timeline(schedule_zb1p, world, chunks, 1, 1, 1)
    assert span - busy == world - 1 and max(peak) <= world


MODEL_WORKER = WORKER.parent / "pp_model_worker.py"
import pp_model_worker  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("schedule, world, chunks", [("1f1b", 2, 4), ("dualpipe", 2, 4), ("dualpipe", 4, 8),
                                                     ("dualpipev", 2, 4)])
def test_deepseek_v3_through_the_pipeline_equals_the_model(tmp_path, schedule, world, chunks):
    """The tiny DeepSeek-V3 (MLA + MoE layers) split into stages: loss and every parameter's gradient equal the
    unsplit model run on the same micro-batches (fp64)."""
    results = run_ranks(MODEL_WORKER, world, tmp_path, "--schedule", schedule, "--chunks", str(chunks))
    from dsv3.train.losses import lm_loss

    model = pp_model_worker.build()
    ref = 0.0
    for t in pp_model_worker.batches(chunks):
        loss = lm_loss(model(t[:, :-1], mtp=False).logits, t)
        loss.backward()
        ref += float(loss.detach())
    assert abs(sum(r["loss"] for r in results) - ref) < 1e-10
    seen = set()
    for res in results:
        for name, g in res["grads"].items():
            torch.testing.assert_close(g, dict(model.named_parameters())[name].grad, atol=1e-10, rtol=1e-8,
                                       msg=name)
            seen.add(name)
    assert seen == {n for n, _ in model.named_parameters()}  # every parameter lives on some stage


def _same_run(a: list[dict], b: list[dict]) -> None:
    """Two training runs' metrics agree up to floating-point reordering; loads and biases exactly."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.step == y.step
        assert abs(x.loss - y.loss) < 1e-4 and abs(x.balance_loss - y.balance_loss) < 1e-8
        assert len(x.mtp_loss) == len(y.mtp_loss)
        assert all(abs(u - v) < 1e-4 for u, v in zip(x.mtp_loss, y.mtp_loss))
        assert abs(x.grad_norm - y.grad_norm) / x.grad_norm < 1e-3
        assert x.load == y.load and x.bias == y.bias


def _same_checkpoint(a, b) -> None:
    import dsv3

    m1, m2 = (dsv3.load_pretrained(dsv3.resolve_checkpoint(run), progress=False) for run in (a, b))
    for (name, t1), t2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(t2, t1, atol=1e-5, rtol=1e-4, msg=name)


def _held(run, world: int) -> list[dict]:
    import dsv3

    ckpt = dsv3.resolve_checkpoint(run)
    return [dsv3.runs.load_trainer_state(ckpt, rank=r, world=world)["held"] for r in range(world)]


def _count(model, lo: int, hi: int, embed: int = 0) -> int:
    """Parameters of main layers [lo, hi) by name (the reference for a stage), plus the model's non-layer tensors
    a stage holds: the embedding when it is the first stage (`embed` extra copies), the final norm, the head and
    the MTP layers when it is the last."""
    n = model.config.num_hidden_layers
    total = 0
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[1] == "layers":
            layer = int(parts[2])
            total += p.numel() if lo <= layer < hi or (hi == n and layer >= n) else 0
        elif name.startswith("model.embed_tokens"):
            total += p.numel() * ((lo == 0) + embed)
        else:  # the final norm and the head
            total += p.numel() if hi == n else 0
    return total


PIPELINE_RUN = ["--model-config", "tiny", "--max-steps", "3", "--batch-size", "8", "--seq-len", "32", "--no-progress",
                "--bias-update-speed", "0.01", "--checkpoint-every", "3"]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["dualpipe", "1f1b"])
def test_torchrun_pipeline_training_follows_the_single_process_curve(dataset, tmp_path, schedule):
    """`torchrun --nproc-per-node 2 -m dsv3 train --pp 2 --pp-schedule S`, MTP on (the last stage runs it with its
    own embedding copy): same curve, MTP loss, loads, biases and balance loss as one process on the same global
    batch; the gathered checkpoint equals the single-process one."""
    common = ["--data", str(dataset), *PIPELINE_RUN]
    a = train(tmp_path / "one", common)
    assert a[0].mtp_loss  # the tiny preset trains one MTP depth
    _same_run(a, train(tmp_path / "pp", [*common, "--pp", "2", "--pp-schedule", schedule], nproc=2))
    _same_checkpoint(tmp_path / "one", tmp_path / "pp")
    # each rank allocated only its stages (the rest of its model copies stayed on meta), counted by name here
    import dsv3

    model = dsv3.load_pretrained(dsv3.resolve_checkpoint(tmp_path / "one"), progress=False)
    first, last = _count(model, 0, 2), _count(model, 2, 3, embed=1)  # tiny: 3 layers, split 2 + 1
    # DualPipe: rank r holds stage r of one copy and stage 1 - r of the other; 1F1B one stage each
    want = [first + last] * 2 if schedule == "dualpipe" else [first, last]
    held = _held(tmp_path / "pp", 2)
    assert [h["parameters"] for h in held] == want
    assert all(h["parameter_bytes"] == 4 * h["parameters"] == h["gradient_bytes"] for h in held)
    assert [m.held() for m in plan(model.config, Layout(pp=2, schedule=schedule))] == held  # the planner: exact


@pytest.mark.slow
def test_torchrun_3d_mesh_follows_the_single_process_curve(dataset, tmp_path):
    """Pipeline x data x expert parallel on 4 ranks: `--pp 2 --ep 2 --zero 1` under DualPipe and `--pp 2 --dp 2`
    under ZB-H1 (where the embedding copies sit on different ranks) follow one process; the 3-D run's
    checkpoint gathers stages and expert shards into the single-process model, and it resumes on 4 ranks."""
    common = ["--data", str(dataset), *PIPELINE_RUN]
    one = train(tmp_path / "one", common)
    _same_run(one, train(tmp_path / "pe", [*common, "--pp", "2", "--ep", "2", "--zero", "1"], nproc=4))
    _same_checkpoint(tmp_path / "one", tmp_path / "pe")
    _same_run(one, train(tmp_path / "pd", [*common, "--pp", "2", "--dp", "2", "--pp-schedule", "zb1p"], nproc=4))
    # every rank's measured parameters, gradients and (ZeRO-1-sharded) optimizer state equal the planner's
    import dsv3

    cfg = dsv3.ModelConfig.from_json(dsv3.resolve_checkpoint(tmp_path / "one") / "config.json")
    for run, layout in (("pe", Layout(pp=2, ep=2, zero=True)), ("pd", Layout(pp=2, dp=2, schedule="zb1p"))):
        assert [m.held() for m in plan(cfg, layout)] == _held(tmp_path / run, 4), run
    # the 3-D run's checkpoint was written sharded by the ranks that hold each tensor (rank = pp x 2 + ep): stage 0
    # (layers 0-1, the embedding) by ranks 0-1, stage 1 (layer 2, the MTP block, norm, head) by ranks 2-3, each
    # expert by its EP rank (experts 0-3: ep 0), every replicated tensor by its stage's ep-0 rank
    import json

    index = json.loads((dsv3.resolve_checkpoint(tmp_path / "pe") / "model.safetensors.index.json").read_text())
    for name, file in index["weight_map"].items():
        parts = name.split(".")
        stage = int(parts[2]) >= 2 if parts[1] == "layers" else not name.startswith("model.embed_tokens")
        ep = int(name.split(".mlp.experts.")[1].split(".")[0]) // 4 if ".mlp.experts." in name else 0
        assert file == f"model-0000{1 + 2 * stage + ep}-of-00004.safetensors", (name, file)
    more = ["--max-steps", "4", "--no-progress"]
    _same_run(train(tmp_path / "one", ["--resume", str(tmp_path / "one"), *more]),
              train(tmp_path / "pe", ["--resume", str(tmp_path / "pe"), *more], nproc=4))


@pytest.mark.slow
@pytest.mark.parametrize(("schedule", "layout"), [("1f1b", ["--dp", "2"]), ("dualpipe", ["--ep", "2"])],
                         ids=["1f1b-dp2", "dualpipe-ep2"])
def test_torchrun_pipeline_with_fsdp2_follows_the_single_process_curve(dataset, tmp_path, schedule, layout):
    """`--pp 2 --zero 3` on 4 ranks: FSDP2 shards each stage over its data group (1F1B: the embedding copies on
    the pipeline's two ends add their sharded gradients; DualPipe: the two copies of each stage add theirs, its
    zero-bubble backwards run whole, and the expert-parallel shards stay out of FSDP). Same curve as one process;
    the checkpoint gathered one parameter at a time equals it; every rank holds exactly the planner's bytes; a
    resume continues the curve."""
    common = ["--data", str(dataset), *PIPELINE_RUN]
    one = train(tmp_path / "one", common)
    par = train(tmp_path / "par", [*common, "--pp", "2", "--pp-schedule", schedule, *layout, "--zero", "3"], nproc=4)
    _same_run(one, par)
    for x, y in zip(one, par):  # (tighter than `_same_run`: only the reduction order differs)
        assert abs(x.loss - y.loss) < 1e-5 and abs(x.grad_norm - y.grad_norm) / x.grad_norm < 1e-5
    _same_checkpoint(tmp_path / "one", tmp_path / "par")
    import dsv3

    cfg = dsv3.ModelConfig.from_json(dsv3.resolve_checkpoint(tmp_path / "one") / "config.json")
    ep = 2 if "--ep" in layout else 1
    held = _held(tmp_path / "par", 4)
    assert [m.held() for m in plan(cfg, Layout(pp=2, dp=2 // ep, ep=ep, zero=3, schedule=schedule))] == held
    # each stage's elements once over its data group: half of the unsharded stage's on each rank (tiny's dims are
    # even), the expert shards apart
    unsharded = [m.held() for m in plan(cfg, Layout(pp=2, schedule=schedule))]
    assert held[0]["parameters"] < unsharded[0]["parameters"]
    more = ["--max-steps", "4", "--no-progress"]
    _same_run(train(tmp_path / "one", ["--resume", str(tmp_path / "one"), *more]),
              train(tmp_path / "par", ["--resume", str(tmp_path / "par"), *more], nproc=4))


def test_pipeline_settings_are_checked(dataset, tmp_path):
    from dsv3.train.trainer import TrainConfig, Trainer, TrainError

    cfg = TrainConfig(model_config="tiny", data=str(dataset), out=str(tmp_path), max_steps=1, pp=2, ep=2)
    with pytest.raises(TrainError, match="needs 4 processes: launch with torchrun --nproc-per-node 4"):
        Trainer(cfg)
    with pytest.raises(TrainError, match="pp_schedule"):
        TrainConfig(model_config="tiny", data=str(dataset), out=str(tmp_path), max_steps=1,
                    pp_schedule="gpipe").validate()
