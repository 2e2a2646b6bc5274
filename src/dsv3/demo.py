"""`make demo` / `dsv3 demo`: the whole story on one CPU in about ten minutes.

Prepare the Shakespeare corpus, train the `small` preset (MLA + DeepSeekMoE + aux-loss-free balancing + MTP)
for a bounded time, evaluate held-out bits-per-byte on two unseen plays, write the plots, print a sample.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from rich.console import Console

from .checkpoint import load_pretrained
from .infer.engine import sample_text
from .runs import claim_output, resolve_checkpoint
from .tokenizer import load_tokenizer
from .train.data import prepare
from .train.evaluate import evaluate
from .train.plots import plot_run
from .train.trainer import TrainConfig, Trainer

PROMPT = "HAMLET.\n"


def run_demo(minutes: float = 10.0, data_dir: str = "data/shakespeare", run_dir: str = "runs/demo",
             overwrite: bool = False) -> int:
    """The five steps above; the exit status (0).

    run_dir must be absent or empty; `overwrite` moves an existing one aside (RUN.old-<timestamp>), never deletes
    it. data_dir is used when it holds a dataset, else prepared there (it must then be absent or empty).

    Raises:
        OutputExistsError: run_dir (without `overwrite`) or a data_dir without a dataset is not empty.
    """
    console = Console()
    t0 = time.time()
    data = Path(data_dir)
    run = Path(run_dir)
    aside = claim_output(run, overwrite, hint="choose another --out")  # before any work
    if aside is not None:
        console.print(f"moved the existing {run} to {aside}")
    if not (data / "meta.json").exists():
        claim_output(data, hint="choose another --data (a dataset directory or a new one)")
        console.print(f"[bold]1/5 data[/]: preparing the Shakespeare corpus into {data} ...")
        meta = prepare(data)
        s = meta["splits"]
        console.print(f"    train {s['train']['tokens']:,} tokens ({len(s['train']['documents'])} works), "
                      f"held out {s['val']['tokens']:,} tokens (The Tempest, Twelfth Night)")
    else:
        console.print(f"[bold]1/5 data[/]: using {data}")
    console.print(f"[bold]2/5 train[/]: preset small for {minutes:g} min -> {run}")
    cfg = TrainConfig(model_config="small", data=str(data), out=str(run), minutes=minutes, checkpoint_every=1000)
    trainer = Trainer(cfg)
    last = trainer.fit()
    train_s = time.time() - t0
    console.print(f"    {last.step} steps, {last.tokens:,} tokens, final loss {last.loss:.3f}, "
                  f"{last.tokens_per_s:,.0f} tokens/s, MFU {last.mfu:.1%}")

    console.print("[bold]3/5 eval[/]: held-out plays")
    ckpt = resolve_checkpoint(run)
    model = load_pretrained(ckpt)
    result = evaluate(model, data, seq_len=cfg.seq_len)
    console.print(f"    loss {result['loss']:.3f}, perplexity {result['perplexity']:.1f}, "
                  f"[bold]bits-per-byte {result['bpb']:.3f}[/] over {result['tokens']:,} tokens")

    console.print("[bold]4/5 plots[/]:")
    for p in plot_run(run):
        console.print(f"    {p}")

    console.print(f"[bold]5/5 sample[/] (temperature 0.8, top-k 50) from {PROMPT!r}:")
    text = sample_text(model, load_tokenizer(ckpt), PROMPT, max_new_tokens=200, temperature=0.8, top_k=50)
    console.print(PROMPT + text, markup=False, highlight=False)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    console.print(f"\ndone in {(time.time() - t0) / 60:.1f} min (training {train_s / 60:.1f}); "
                  f"held-out BPB {result['bpb']:.3f}; peak RAM {peak_gib:.2f} GiB; checkpoint {ckpt}")
    return 0
