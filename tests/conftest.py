import random

import pytest
import torch

from dsv3.train.data import prepare


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


WORDS = ("the king lord thou art my good sir what shall we do now love death night day sweet gentle "
         "speak come go hence away noble friend").split()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for d in range(12):
        lines = []
        for _ in range(60):
            speaker = rng.choice(["KING", "LORD", "FOOL"])
            lines.append(f"{speaker}.\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + ".\n")
        (root / f"play{d:02d}.txt").write_text("\n".join(lines))
    out = tmp_path_factory.mktemp("data")
    prepare(out, [root], vocab_size=300, val_fraction=0.2)
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, dataset):
    """A tiny model trained for 60 steps on the synthetic corpus (main model and MTP module learn something)."""
    from dsv3.train.trainer import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(model_config="tiny", data=str(dataset), out=str(out), max_steps=60, batch_size=8, seq_len=64,
                      lr=5e-3, warmup_steps=5, checkpoint_every=60, progress=False)
    Trainer(cfg).fit()
    return out


def live_server(server):
    """A `dsv3.infer.server.Server` served by uvicorn on a free loopback port for the duration: yields the port."""
    from dsv3.infer.server import serve_in_thread

    return serve_in_thread(server)


def fit_until_killed(cfg, step: int, trainer=None) -> None:
    """Run a trainer on `cfg` that dies (KeyboardInterrupt) at the start of step `step` + 1, as a killed process
    would: after the checkpoints and metrics rows of the steps before. trainer: the class (default `Trainer`)."""
    from dsv3.train.trainer import Trainer

    class Killed(trainer or Trainer):
        def train_step(self):
            if self.step == step:
                raise KeyboardInterrupt
            return super().train_step()

    with pytest.raises(KeyboardInterrupt):
        Killed(cfg).fit()


@pytest.fixture(scope="module")
def tiny_random():
    """(model, tokenizer): a `tiny` model with random weights and a BPE trained in milliseconds, for server and
    page tests; torch on one thread while the module runs (the engine thread, the event loop and a browser share
    the CPU)."""
    from dsv3 import DeepseekV3, get_config
    from dsv3.tokenizer import train_tokenizer

    words = "the king lord thou art my good sir what shall we do now love death night day sweet gentle".split()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = random.Random(0)
    tok = train_tokenizer([" ".join(rng.choice(words) for _ in range(40)) for _ in range(40)], 300)
    torch.manual_seed(0)
    model = DeepseekV3(get_config("tiny").replace(vocab_size=tok.get_vocab_size())).eval()
    yield model, tok
    torch.set_num_threads(threads)

