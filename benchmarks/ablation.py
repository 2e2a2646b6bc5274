"""Ablation: the same model, data and steps with aux_free / aux_loss / none balancing, and MTP on / off.

Reports held-out bits-per-byte (Shakespeare: The Tempest + Twelfth Night, never trained on) and MaxVio (mean over
the last 20% of steps, averaged over MoE layers), as the paper's Table 5 / Figure 9 do at a much larger scale.

    python benchmarks/ablation.py [--steps 200] [--data data/shakespeare] [--out runs/ablation]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsv3.checkpoint import load_pretrained
from dsv3.runs import read_metrics, resolve_checkpoint
from dsv3.train.data import prepare
from dsv3.train.evaluate import evaluate
from dsv3.train.trainer import TrainConfig, Trainer

RUNS = {
    "aux_free + MTP": {"balance": "aux_free"},
    "aux_loss + MTP": {"balance": "aux_loss"},
    "none + MTP": {"balance": "none"},
    "aux_free, no MTP": {"balance": "aux_free", "mtp_depth": 0},
    # gamma = 0.001 is the paper's for a 14.8T-token run; a 200-step run needs the bias to move faster
    "aux_free (gamma 0.01) + MTP": {"balance": "aux_free", "bias_update_speed": 0.01},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--data", default="data/shakespeare")
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--bias-update-speed", type=float, default=0.001, help="gamma, unless a run sets its own")
    ap.add_argument("--runs", nargs="*", help="run names to do (default: all)")
    args = ap.parse_args()
    if not (Path(args.data) / "meta.json").exists():
        prepare(args.data)
    results = {}
    for name, change in RUNS.items():
        if args.runs and name not in args.runs:
            continue
        out = Path(args.out) / "".join(c if c.isalnum() or c == "." else "_" for c in name)
        settings = {"bias_update_speed": args.bias_update_speed, **change}
        cfg = TrainConfig(model_config=args.preset, data=args.data, out=str(out), max_steps=args.steps,
                          checkpoint_every=args.steps, progress=False, **settings)
        trainer = Trainer(cfg, overwrite=True)  # a rerun moves the previous output aside
        trainer.fit()
        rows = read_metrics(out)
        tail = rows[-max(1, len(rows) // 5) :]
        main_layers = trainer.model.config.num_moe_layers  # MaxVio over the main model's MoE layers
        vio = sum(sum(r.max_vio[:main_layers]) / main_layers for r in tail) / len(tail)
        ev = evaluate(load_pretrained(resolve_checkpoint(out)), args.data, seq_len=cfg.seq_len)
        results[name] = {"bpb": ev["bpb"], "val_loss": ev["loss"], "max_vio": vio, "train_loss": rows[-1].loss}
        print(f"{name:>18}: held-out BPB {ev['bpb']:.4f}  val loss {ev['loss']:.4f}  MaxVio {vio:.3f}", flush=True)
    print("\n| run | held-out BPB | val loss | MaxVio (last 20% of steps) |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['bpb']:.4f} | {r['val_loss']:.4f} | {r['max_vio']:.3f} |")
    results_file = Path(args.out) / "results.json"
    previous = json.loads(results_file.read_text()) if results_file.exists() else {}
    results_file.write_text(json.dumps({**previous, **results}, indent=2))


if __name__ == "__main__":
    main()
