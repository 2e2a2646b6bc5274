"""Runs and checkpoints from strangers never run code; commands never destroy what they did not create; a diverged
run never saves NaN/inf; bad CLI input gives `dsv3 CMD: error: ...` and exit 2, never a traceback."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dsv3
from dsv3 import runs
from dsv3.cli import main
from dsv3.train.trainer import TrainConfig, Trainer, TrainError, resume_config


def tiny(dataset, out, **kw):
    base = dict(model_config="tiny", data=str(dataset), out=str(out), max_steps=2, batch_size=2, seq_len=16,
                lr=3e-3, warmup_steps=1, checkpoint_every=2, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, dataset):
    """A finished 2-step tiny run (one checkpoint, step 2). Tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("safety") / "run"
    Trainer(tiny(dataset, out)).fit()
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: what "untouched" means."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


# ------------------------------------------------------------------------------------------------ trainer state
def test_trainer_state_format_round_trips_nested_optimizer_state():
    state = {"step": 7, "total_steps": 10, "train_config": {"data": "d", "dp": None, "lr": 1e-3},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)},
                                     5: {"step": 4, "exp_avg": torch.randn(4).to(torch.bfloat16)}},
                           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "fused": None, "params": [0, 5]}]},
             "rng": torch.get_rng_state(), "inf": math.inf}
    files = runs.trainer_state_files(state, rank=1, world=2)
    assert sorted(files) == ["trainer_state-rank00001-of-00002.json", "trainer_state-rank00001-of-00002.safetensors"]
    doc = json.loads(files["trainer_state-rank00001-of-00002.json"])
    assert doc["optimizer"]["state"]["__items__"][0][1]["exp_avg"] == {"__tensor__": "optimizer.state.0.exp_avg"}
    assert set(load_file_bytes(files["trainer_state-rank00001-of-00002.safetensors"])) == {
        "optimizer.state.0.step", "optimizer.state.0.exp_avg", "optimizer.state.5.exp_avg", "rng"}


def load_file_bytes(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


def test_trainer_state_loads_back_equal_and_checks_the_rank_count(tmp_path):
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0]}]}
    for rank in range(2):
        state = {"step": 7, "total_steps": 10, "train_config": {"data": "d"}, "optimizer": opt,
                 "rng": torch.get_rng_state()}
        for name, content in runs.trainer_state_files(state, rank, 2).items():
            (tmp_path / name).write_bytes(content)
    back = runs.load_trainer_state(tmp_path, rank=1, world=2)
    assert back["optimizer"]["param_groups"] == opt["param_groups"]  # int keys, tuples and all
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt["state"][0]["exp_avg"])
    assert torch.equal(back["rng"], torch.get_rng_state()) and back["step"] == 7
    assert runs.train_setting(tmp_path, "data") == "d"
    with pytest.raises(runs.RunError, match="on 2 rank"):
        runs.load_trainer_state(tmp_path, world=1)


class Evil:
    """Unpickling this creates `marker`: stands for any code a crafted pickle runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_pickle(ckpt: Path, payload) -> None:
    """Replace a checkpoint's trainer state by a `trainer_state.pt` pickle (the old format)."""
    for f in ckpt.glob("trainer_state*"):
        f.unlink()
    torch.save(payload, ckpt / "trainer_state.pt")


def test_a_malicious_trainer_state_pickle_is_never_unpickled(run_copy, dataset, tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = runs.resolve_checkpoint(run_copy)
    plant_pickle(ckpt, {"step": 2, "total_steps": 2, "optimizer": {}, "rng": Evil(marker), "train_config": {}})
    before = tree(run_copy)

    assert main(["eval", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3 eval: error: ") and "old pickle format" in err
    assert f"dsv3 runs upgrade {run_copy}" in err
    assert main(["train", "--resume", str(run_copy), "--max-steps", "3", "--no-progress"]) == 2
    assert "dsv3 train: error: " in capsys.readouterr().err
    assert main(["runs", "upgrade", str(run_copy)]) == 2  # weights_only=True refuses it, writes nothing
    err = capsys.readouterr().err
    assert "refused, not converted" in err and "Unsupported global" in err
    assert not marker.exists()
    assert tree(run_copy) == before


def test_runs_upgrade_converts_a_genuine_old_state_and_the_run_resumes(run_copy, dataset, capsys):
    trainer = Trainer(resume_config(run_copy), resume=True)
    ckpt = runs.resolve_checkpoint(run_copy)
    old = {"step": trainer.step, "total_steps": trainer.total_steps, "optimizer": trainer.optimizer.state_dict(),
           "rng": torch.get_rng_state(), "train_config": json.loads((run_copy / "train_config.json").read_text())}
    plant_pickle(ckpt, old)  # exactly what dsv3 wrote before (torch.save of this dict)
    with pytest.raises(runs.RunError, match="runs upgrade"):
        runs.load_trainer_state(ckpt)

    assert main(["runs", "upgrade", str(run_copy)]) == 0
    assert "wrote trainer_state.safetensors, trainer_state.json" in capsys.readouterr().out
    state = runs.load_trainer_state(ckpt, world=1)
    assert state["step"] == 2 and state["optimizer"]["param_groups"] == old["optimizer"]["param_groups"]
    for i, moments in old["optimizer"]["state"].items():
        for name, t in moments.items():
            assert torch.equal(state["optimizer"]["state"][i][name], t), (i, name)
    assert main(["runs", "upgrade", str(run_copy)]) == 0  # again: nothing to do
    assert "already converted" in capsys.readouterr().out
    assert main(["train", "--resume", str(run_copy), "--max-steps", "3", "--no-progress"]) == 0
    assert [r.step for r in runs.read_metrics(run_copy)] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------ clobbering
def test_train_refuses_an_existing_run_and_overwrite_moves_it_aside(run_copy, dataset, capsys):
    before = tree(run_copy)
    args = ["train", "--model-config", "tiny", "--data", str(dataset), "--out", str(run_copy), "--max-steps", "1",
            "--batch-size", "2", "--seq-len", "16", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{run_copy} already exists and is not empty" in err and f"--resume {run_copy}" in err
    assert tree(run_copy) == before
    assert main([*args, "--resume", str(run_copy), "--overwrite"]) == 2  # not both
    assert main([*args, "--overwrite"]) == 0
    aside = [p for p in run_copy.parent.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and tree(aside[0]) == before  # the old run, whole
    assert [r.step for r in runs.read_metrics(run_copy)] == [1]  # a new run, not appended to the old one


def test_convert_prepare_plot_and_demo_refuse_a_non_empty_out(run_dir, dataset, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "precious.txt").write_text("keep me")
    (tmp_path / "corpus.txt").write_text("to be or not to be " * 200)
    commands = {
        "convert": ["convert", str(run_dir), "--out", str(occupied), "--dtype", "bf16"],
        "data prepare": ["data", "prepare", str(tmp_path / "corpus.txt"), "--out", str(occupied),
                         "--vocab-size", "270"],
        "plot": ["plot", str(run_dir), "--out", str(occupied)],
        "demo": ["demo", "--out", str(occupied), "--data", str(dataset)],
    }
    for name, args in commands.items():
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"dsv3 {name}: error: {occupied} already exists and is not empty"), err
        assert "--overwrite" in err
        assert tree(occupied) == {"precious.txt": b"keep me"}, name
    for name in ("convert", "data prepare", "plot"):
        assert main([*commands[name], "--overwrite"]) == 0, name
        capsys.readouterr()
        aside = sorted(tmp_path.glob("occupied.old-*"))
        assert len(aside) == 1 and tree(aside[0]) == {"precious.txt": b"keep me"}, name
        shutil.rmtree(occupied)  # (the test's own cleanup) leave the next command the same situation
        aside[0].rename(occupied)
    assert main(commands["convert"][:3] + [str(tmp_path / "new"), "--dtype", "bf16"]) == 0  # a fresh out is fine
    dsv3.load_pretrained(tmp_path / "new")


def test_save_pretrained_refuses_a_non_empty_dir_and_replaces_only_on_request(run_dir, tmp_path):
    model = dsv3.load_pretrained(runs.resolve_checkpoint(run_dir))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(dsv3.CheckpointError, match="already exists and is not empty"):
        dsv3.save_pretrained(model, tmp_path / "c")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # nothing half-written beside it
    dsv3.save_pretrained(model, tmp_path / "d")
    dsv3.save_pretrained(model, tmp_path / "d", replace=True)  # a caller re-saving its own directory
    dsv3.load_pretrained(tmp_path / "d")


def test_rotation_deletes_only_this_runs_own_checkpoints(dataset, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny(dataset, run, checkpoint_every=1, keep_checkpoints=1)).fit()
    assert [p.name for p in runs.Run(run).checkpoints()] == ["step-00000002"]
    assert runs.Run(run).recorded_checkpoints() == ["step-00000002"]
    foreign = run / "checkpoints" / "step-00000000"  # e.g. a checkpoint someone copied in
    shutil.copytree(run / "checkpoints" / "step-00000002", foreign)
    (foreign / "notes.txt").write_text("not the trainer's")
    Trainer(resume_config(run, max_steps=4), resume=True).fit()
    assert [p.name for p in runs.Run(run).checkpoints()] == ["step-00000000", "step-00000004"]
    assert (foreign / "notes.txt").read_text() == "not the trainer's"
    assert runs.Run(run).recorded_checkpoints() == ["step-00000004"]


def test_atomic_writes_leave_the_previous_file_on_a_crash(tmp_path, monkeypatch):
    target = tmp_path / "train_config.json"
    runs.write_atomic(target, "good\n")

    def crash(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        runs.write_atomic(target, "half")
    monkeypatch.undo()
    assert target.read_text() == "good\n" and [p.name for p in tmp_path.iterdir()] == ["train_config.json"]


def test_metrics_cut_short_by_a_crash_resume_cleanly(tmp_path):
    rows = [runs.StepMetrics(step=s, loss=1.0, mtp_loss=[], balance_loss=0.0, lr=1e-3, grad_norm=1.0,
                             tokens_per_s=1.0, mfu=0.0, tokens=s, step_time=1.0) for s in (1, 2, 3)]
    text = "".join(r.to_json() + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + rows[0].to_json()[:17])  # killed mid-line
    assert [r.step for r in runs.read_metrics(tmp_path)] == [1, 2, 3]
    runs.MetricsWriter(tmp_path).truncate_after(2)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(r.to_json() + "\n" for r in rows[:2])
    (tmp_path / "metrics.jsonl").write_text("{broken\n" + text)  # damage in the middle is still an error
    with pytest.raises(runs.RunError, match=r"metrics.jsonl:1: not a metrics record"):
        runs.read_metrics(tmp_path)


# ------------------------------------------------------------------------------------------------ divergence
def checkpoint_is_finite(ckpt: Path) -> bool:
    return all(torch.isfinite(t).all() for f in ckpt.glob("*.safetensors") for t in load_file(f).values()
               if t.is_floating_point())


def test_a_non_finite_gradient_stops_the_run_before_the_step_and_saves_nothing(dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(tiny(dataset, run, max_steps=6, checkpoint_every=2, keep_checkpoints=1))
    real = trainer._sync_gradients

    def poisoned():  # the gradients as the step's norm and clipping see them
        real()
        if trainer.step == 3:  # during step 4
            next(p for p in trainer.model.parameters() if p.grad is not None).grad.fill_(float("inf"))

    monkeypatch.setattr(trainer, "_sync_gradients", poisoned)
    with pytest.raises(TrainError, match=r"diverged at step 4: the gradient norm is (inf|nan) at learning rate "):
        trainer.fit()
    ckpts = runs.Run(run).checkpoints()
    assert [p.name for p in ckpts] == ["step-00000002"]  # the last good one, not rotated out
    assert checkpoint_is_finite(ckpts[0])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the step was not taken
    assert [r.step for r in runs.read_metrics(run)] == [1, 2, 3]


def test_non_finite_parameters_are_never_saved(run_copy, dataset):
    trainer = Trainer(resume_config(run_copy), resume=True)
    ckpt = runs.resolve_checkpoint(run_copy)
    before = tree(ckpt)
    with torch.no_grad():
        trainer.model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(TrainError, match=r"parameter model\.layers\.0\.self_attn\.o_proj\.weight is NaN or inf at "
                                         r"step 2, before saving"):
        trainer.save_checkpoint()
    assert tree(ckpt) == before


def test_a_failed_checkpoint_write_is_a_clear_error_and_leaves_nothing_behind(run_copy, monkeypatch):
    """A rank whose shard cannot be written (disk full) stops the save with its reason on every rank (here one),
    the working directory is removed, and the step's existing checkpoint is untouched."""
    from dsv3.train import trainer as trainer_mod

    trainer = Trainer(resume_config(run_copy), resume=True)
    ckpt = runs.resolve_checkpoint(run_copy)
    before = tree(ckpt)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer_mod, "write_shards", full)
    with pytest.raises(TrainError, match=r"saving step 2 failed on rank 0: .*No space left on device"):
        trainer.save_checkpoint()
    assert tree(ckpt) == before
    assert not any(p.name.endswith(".partial") for p in ckpt.parent.iterdir())


def test_an_unexpected_error_in_a_checkpoint_write_still_cleans_up(run_copy, monkeypatch):
    """A bug inside the write (not a disk or file error) is re-raised as it is, traceback and all, after the
    working directory is removed (other ranks learn of it through the same collective and stop with a TrainError)."""
    from dsv3.train import trainer as trainer_mod

    trainer = Trainer(resume_config(run_copy), resume=True)
    ckpt = runs.resolve_checkpoint(run_copy)
    before = tree(ckpt)

    def bug(*args, **kwargs):
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(trainer_mod, "write_shards", bug)
    with pytest.raises(RuntimeError, match="a bug in the writer"):
        trainer.save_checkpoint()
    assert tree(ckpt) == before
    assert not any(p.name.endswith(".partial") for p in ckpt.parent.iterdir())


@pytest.mark.slow
def test_a_run_at_lr_3e3_stops_with_a_clear_error_and_finite_checkpoints(dataset, tmp_path, capsys):
    """The reported case: `--lr 3e3` used to save a checkpoint full of NaN."""
    run = tmp_path / "run"
    code = main(["train", "--model-config", "tiny", "--data", str(dataset), "--out", str(run), "--max-steps", "10",
                 "--batch-size", "2", "--seq-len", "16", "--lr", "3e3", "--warmup-steps", "0",
                 "--checkpoint-every", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "dsv3 train: error: the run diverged at step" in err and "3e+03" in err
    assert all(checkpoint_is_finite(c) for c in runs.Run(run).checkpoints())


# ------------------------------------------------------------------------------------------------ CLI errors
@pytest.mark.parametrize("args, message", [
    (["cost", "--gpu", "foo"], "dsv3 cost: error: argument --gpu: invalid choice: 'foo'"),
    (["cost", "--tokens", "abc"], "dsv3 cost: error: argument --tokens: not a count: 'abc'"),
])
def test_bad_cost_flags_print_usage_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: dsv3 cost") and message in err
    assert "Traceback" not in err


def test_plot_of_a_missing_run_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dsv3 plot: error: {tmp_path / 'nonexistent'}: no metrics.jsonl") and "Traceback" not in err
    assert not (tmp_path / "out").exists()
