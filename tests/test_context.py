"""Context extension (`dsv3 train --init-from CKPT --extend-context FACTOR`): the run starts from the checkpoint's
weights with a fresh optimizer; YaRN is written into its config as DeepSeek-V3's config writes it, over the length
the checkpoint was trained at; transformers reads the extended checkpoint with equal logits past the original
length."""

import json
import re

import pytest
import torch
import transformers

import dsv3
from dsv3.train.data import TokenData
from dsv3.train.losses import lm_loss
from dsv3.train.trainer import TrainConfig, Trainer, TrainError


def cfg(dataset, out, **kw):
    base = dict(model_config="tiny", data=str(dataset), out=str(out), max_steps=3, batch_size=4, seq_len=32,
                checkpoint_every=3, progress=False, bias_update_speed=0.01)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def source(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("ctx") / "source"
    Trainer(cfg(dataset, run)).fit()
    return run


@pytest.mark.parametrize("factor", [None, 1.0])
def test_init_from_starts_at_the_checkpoints_loss(dataset, source, tmp_path, factor):
    """The first step's loss (before its update) is the source checkpoint's on the same batch: with its weights
    and, at YaRN factor 1, the same positions."""
    trainer = Trainer(cfg(dataset, tmp_path / "run", max_steps=1, init_from=str(source), extend_context=factor))
    first = trainer.fit()
    model = dsv3.load_pretrained(dsv3.resolve_checkpoint(source)).eval()
    tokens = TokenData(dataset, "train").batch(4, 32, 0, 0, 0)
    with torch.no_grad():
        ref = float(lm_loss(model(tokens[:, :-1]).logits, tokens))
    assert first.loss == pytest.approx(ref, abs=1e-6)
    assert first.step == 1  # a fresh schedule


@pytest.mark.parametrize("rope", ["yarn", "linear", "none"])
def test_extended_checkpoint_writes_its_rope_and_transformers_agrees_past_the_trained_length(dataset, source,
                                                                                            tmp_path, rope):
    """--extend-rope yarn writes DeepSeek-V3's YaRN block over the trained length, linear {"type": "linear",
    "factor"} (every frequency / factor), none only raises the position limit; transformers reads each with equal
    logits at 4x the trained length."""
    Trainer(cfg(dataset, tmp_path / "ext", max_steps=1, seq_len=64, init_from=str(source), extend_context=4,
                extend_rope=rope)).fit()
    ckpt = dsv3.resolve_checkpoint(tmp_path / "ext")
    config = json.loads((ckpt / "config.json").read_text())
    assert config["max_position_embeddings"] == 128
    scaling = config.get("rope_scaling")
    if rope == "yarn":
        assert {k: scaling[k] for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                                        "mscale", "mscale_all_dim")} == {
            "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
            "mscale_all_dim": 1.0}
    else:
        assert scaling == ({"type": "linear", "factor": 4.0} if rope == "linear" else None)
    ours = dsv3.load_pretrained(ckpt).eval()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 128))
    plain = dsv3.DeepseekV3(ours.config.replace(rope_scaling=None)).eval()  # the same weights, plain RoPE
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=0)
        assert torch.allclose(plain(ids).logits, ours(ids).logits, atol=1e-3) == (rope == "none")  # scaling is on
    if rope == "linear":
        assert torch.equal(ours.model.rotary_emb.inv_freq * 4, plain.model.rotary_emb.inv_freq)


def test_retrieval_documents_share_no_wording_with_the_passkey_evaluation(tmp_path):
    """`prepare(..., retrieval_docs=N)` adds N documents to the training split only, reproducibly; each states
    its number twice, and none contains the evaluation's filler, key or question sentences."""
    import random

    from dsv3.train import passkey
    from dsv3.train.data import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        text = "\n".join(f"LORD {i}.\nline {j} of the play, my lord." for j in range(200))
        (corpus / f"play{i}.txt").write_text(text)
    meta = [prepare(tmp_path / f"d{k}", [corpus], vocab_size=300, retrieval_docs=5) for k in (1, 2)]
    assert (tmp_path / "d1" / "train.bin").read_bytes() == (tmp_path / "d2" / "train.bin").read_bytes()
    train, val = meta[0]["splits"]["train"]["documents"], meta[0]["splits"]["val"]["documents"]
    assert sum(n.startswith("retrieval-") for n in train) == 5 and not any(n.startswith("retrieval") for n in val)
    lines = [f"line {j}, my lord." for j in range(50)]
    banned = [passkey.INTRO.strip(), passkey.QUESTION.strip(), "pass key", "Remember it"]
    banned += [s.strip() + "." for s in passkey.FILLER.split(".") if s.strip()]
    rng = random.Random(0)
    for words in (5, 60, 400):
        doc = passkey.retrieval_document(lines, words, rng)
        key = [w.strip(".") for w in doc.split() if w.strip(".").isdigit() and len(w.strip(".")) == passkey.DIGITS]
        assert len(key) == 2 and key[0] == key[1] and doc.rstrip().endswith(key[0] + ".")
        assert not any(b in doc for b in banned)
        assert len(doc.split()) >= words
    # several keys: each name states its own number once in the text and again in the closing lines
    doc = passkey.retrieval_document(lines, 60, rng, keys=4)
    pairs = [re.search(r"([Tt]he [a-z ]+) is (\d+)\.", line) for line in doc.splitlines()]
    pairs = [(m.group(1).lower(), m.group(2)) for m in pairs if m]
    assert len(pairs) == 8 and len(set(pairs[:4])) == 4 and set(pairs[:4]) == set(pairs[4:])
    assert all(re.search(r"\d", line) for line in doc.splitlines()[-4:])
    with pytest.raises(ValueError, match="1 to 8 keys"):
        passkey.retrieval_document(lines, 60, rng, keys=9)


def test_retrieval_examples_end_where_the_number_is_recalled():
    """`passkey.retrieval_example`: the prompt states one number once and ends with its recall cut just before the
    number; the completion is the number; reproducible from the rng; none of the evaluation's wording."""
    import random

    from dsv3.train import passkey

    lines = [f"line {j}, my lord." for j in range(50)]
    banned = [passkey.INTRO.strip(), passkey.QUESTION.strip(), "pass key", "Remember it"]
    examples = [passkey.retrieval_example(lines, words, random.Random(7)) for words in (5, 60, 400)]
    assert examples[1] == passkey.retrieval_example(lines, 60, random.Random(7))
    for ex in examples:
        key = ex["completion"].strip().rstrip(".")
        assert ex["completion"] == f" {key}.\n" and len(key) == passkey.DIGITS and key.isdigit()
        assert ex["prompt"].count(key) == 1 and not ex["prompt"].endswith(" ")
        stated = re.search(rf"([Tt]he [a-z ]+) is {key}\.", ex["prompt"]).group(1).lower()
        assert ex["prompt"].lower().endswith(f"{stated} is")  # asked by the name it was stated under
        assert not any(b in ex["prompt"] for b in banned)
    with pytest.raises(ValueError, match="at least one word"):
        passkey.retrieval_example(lines, 0, random.Random(0))
    from dsv3.train.data import text_example

    text = text_example(lines, 12, random.Random(7))  # plain text: a line, then the lines after it
    assert text["prompt"] in lines and text["completion"].startswith("\n") and len(text["completion"].split()) >= 8
    for bad in ([], ["  ", " "]):
        with pytest.raises(ValueError, match="lines with text"):
            text_example(bad, 5, random.Random(0))


def test_multi_key_retrieval_examples_recall_one_number_by_its_name():
    """keys > 1: the prompt states that many distinct numbers under distinct names and asks for one of them by its
    name (each position asked about equally often); keys = 1 draws what it always drew (the benchmark's records
    stay the same); a bad count is named."""
    import random

    from dsv3.train import passkey

    lines = [f"line {j}, my lord." for j in range(50)]
    asked = [0, 0, 0]
    for seed in range(300):
        ex = passkey.retrieval_example(lines, 40, random.Random(seed), keys=3)
        key = ex["completion"].strip().rstrip(".")
        stated = re.findall(r"([Tt]he [a-z]+ [a-z]+) is (\d+)\.", ex["prompt"])
        assert len(stated) == 3 and len({n.lower() for n, _ in stated}) == 3, ex["prompt"]
        names = [n.lower() for n, k in stated if k == key]
        assert len(names) == 1 and ex["prompt"].lower().endswith(f"{names[0]} is")
        asked[[k for _, k in stated].index(key)] += 1
    assert min(asked) > 70, asked  # 100 each expected
    for seed in range(20):  # keys = 1: the draws of the one-number record as first written, and no more
        rng, old = random.Random(seed), random.Random(seed)
        body, [(name, key)] = passkey._stated(lines, 60, old, 1)
        ask = passkey._ask(name, key, old)
        cut = ask.rindex(" " + key)
        assert passkey.retrieval_example(lines, 60, rng) == {"prompt": "\n".join(body + [ask[:cut]]),
                                                             "completion": ask[cut:] + "\n"}
        assert rng.getstate() == old.getstate()
    with pytest.raises(ValueError, match="1 to 8 keys"):
        passkey.retrieval_example(lines, 60, random.Random(7), keys=9)


def test_retrieval_names_are_drawn_from_the_corpus_and_never_the_evaluations():
    """Each number's name is "the WORD NOUN" with a corpus word: many names over many examples (a model trained
    on a few fixed names retrieved under those only), and never "pass", the evaluation's word."""
    import random

    from dsv3.train import passkey

    lines = [f"pass the {w} key, pass." for w in ("crown", "sword", "ring", "horse", "letter", "cup")] * 5
    rng = random.Random(3)
    names = set()
    for _ in range(200):
        ex = passkey.retrieval_example(lines, 10, rng)
        names.add(re.search(r"([Tt]he [a-z ]+) is$", ex["prompt"]).group(1).lower())
    assert len(names) >= 40 and not any("pass" in n for n in names), names
    assert {n.split()[2] for n in names} == set(passkey.RETRIEVAL_NOUNS)
    with pytest.raises(ValueError, match="too few distinct words"):
        passkey.retrieval_document(["pass it, go."] * 10, 20, rng)  # no word of 3+ letters but "pass"


def test_copy_documents_repeat_one_line_of_frequent_corpus_words():
    """A copy document is one line of words from the given vocabulary written 2-4 times, the same for the same
    seed; bad ranges are refused."""
    import random

    from dsv3.train import passkey

    vocabulary = [f"w{i}" for i in range(50)]
    docs = [passkey.copy_document(vocabulary, random.Random(7)) for _ in range(2)]
    assert docs[0] == docs[1]
    rng, repeats = random.Random(0), set()
    for _ in range(40):
        lines = passkey.copy_document(vocabulary, rng).splitlines()
        assert len(set(lines)) == 1 and 8 <= len(lines[0].split()) <= 40
        assert set(lines[0].split()) <= set(vocabulary)
        repeats.add(len(lines))
    assert repeats == {2, 3, 4}
    for bad in (dict(words=(0, 3)), dict(repeats=(3, 2))):
        with pytest.raises(ValueError, match="1 <= min <= max"):
            passkey.copy_document(vocabulary, rng, **bad)
    with pytest.raises(ValueError, match="vocabulary"):
        passkey.copy_document([], rng)


def test_prepare_adds_copy_documents_from_the_corpus_words(tmp_path):
    """`prepare(..., copy_docs=N)` adds N copy documents to the training split only, reproducibly, whose words come
    from the corpus (also a file whose name looks like a retrieval document's) and not from added documents."""
    from dsv3.tokenizer import load_tokenizer
    from dsv3.train.data import TokenData, prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"retrieval-notes{i}.txt").write_text("\n".join(f"alpha beta{i} gamma delta." for _ in range(50)))
    meta = [prepare(tmp_path / f"d{k}", [corpus], vocab_size=300, copy_docs=6, retrieval_docs=2) for k in (1, 2)]
    assert (tmp_path / "d1" / "train.bin").read_bytes() == (tmp_path / "d2" / "train.bin").read_bytes()
    train, val = meta[0]["splits"]["train"]["documents"], meta[0]["splits"]["val"]["documents"]
    assert sum(n.startswith("copy-") for n in train) == 6 and not any(n.startswith("copy-") for n in val)
    text = load_tokenizer(tmp_path / "d1").decode(TokenData(tmp_path / "d1", "train").ids[-400:].tolist())
    copied = text.strip().splitlines()[-1].split()  # the last copy document's line
    assert copied and set(copied) <= {"alpha", "beta0", "beta1", "beta2", "gamma", "delta."}


def test_sft_extends_the_context_over_records_longer_than_the_trained_length(source, tmp_path):
    """`dsv3 sft BASE --extend-context F --seq-len N`: a long-context phase on prompt-completion records (what
    benchmarks/context_extension.py runs, retrieval records of up to N tokens): YaRN over the base's trained length,
    and records past that length are trained on."""
    from dsv3.train.data import write_retrieval_data

    write_retrieval_data(tmp_path / "long", 6, 0, (10, 25), text=2, tokenizer=dsv3.resolve_checkpoint(source),
                         max_tokens=128)
    result = Trainer(TrainConfig(model_config="tiny", objective="sft", data=str(tmp_path / "long"),
                                 out=str(tmp_path / "ext"), init_from=str(source), extend_context=4, seq_len=128,
                                 batch_size=2, max_steps=1, checkpoint_every=1, progress=False)).fit()
    config = json.loads((dsv3.resolve_checkpoint(tmp_path / "ext") / "config.json").read_text())
    assert config["rope_scaling"]["original_max_position_embeddings"] == 32 and config["rope_scaling"]["factor"] == 4
    assert config["max_position_embeddings"] == 128 and result.loss == result.loss
    from dsv3.train.sft import ConversationData

    records = ConversationData(tmp_path / "long", dsv3.resolve_checkpoint(source), seq_len=128).conversations
    assert len(records) == 8 and max(len(ids) for ids, _ in records) > 64  # past 2x the trained 32


def test_bad_extensions_are_refused(dataset, source, tmp_path):
    with pytest.raises(TrainError, match="give init_from too"):
        cfg(dataset, tmp_path / "a", extend_context=4).validate()
    with pytest.raises(TrainError, match="extend_rope.*give extend_context too"):
        cfg(dataset, tmp_path / "a", init_from=str(source), extend_rope="linear").validate()
    with pytest.raises(TrainError, match="mtp_depth 0"):
        Trainer(cfg(dataset, tmp_path / "b", init_from=str(source), mtp_depth=0))
    ext = tmp_path / "ext"
    Trainer(cfg(dataset, ext, max_steps=1, seq_len=64, init_from=str(source), extend_context=2)).fit()
    with pytest.raises(TrainError, match="already extended"):
        Trainer(cfg(dataset, tmp_path / "c", init_from=str(ext), extend_context=2))
    with pytest.raises(TrainError, match="init_from .*nowhere"):
        Trainer(cfg(dataset, tmp_path / "d", init_from=str(tmp_path / "nowhere")))


def test_eval_by_context_length_and_position(dataset, source, tmp_path, capsys):
    """`dsv3 eval RUN --context-lengths`: per length the mean of its per-position losses, over the same tokens;
    the per-position buckets average to the length's loss; a length past the model's positions is refused."""
    from dsv3.cli import main
    from dsv3.train.evaluate import evaluate

    out = tmp_path / "by_position.png"
    assert main(["eval", str(source), "--context-lengths", "16,32", "--max-tokens", "256", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)["context_lengths"]
    assert out.stat().st_size > 0
    model = dsv3.load_pretrained(dsv3.resolve_checkpoint(source))
    for length in (16, 32):
        r = result[str(length)]
        assert r["tokens"] == 256
        weights = [b["stop"] - b["start"] for b in r["by_position"]]
        assert sum(weights) == length
        mean = sum(w * b["loss"] for w, b in zip(weights, r["by_position"])) / length
        assert mean == pytest.approx(r["loss"], rel=1e-6)
        # the plain evaluator over the same windows gives the same loss
        assert evaluate(model, dataset, seq_len=length, max_tokens=256)["loss"] == pytest.approx(r["loss"], rel=1e-5)
    assert main(["eval", str(source), "--context-lengths", "16,4096"]) == 2
    assert "exceeds the model's max_position_embeddings" in capsys.readouterr().err


def test_passkey_trials_are_reproducible_and_the_checker_is_exact(dataset):
    from dsv3.tokenizer import load_tokenizer
    from dsv3.train.passkey import check_answer, passkey_prompt

    tok = load_tokenizer(dataset)
    a, key = passkey_prompt(tok, 240, 0.5, seed=3)
    assert (a, key) == passkey_prompt(tok, 240, 0.5, seed=3) and len(key) == 5
    assert passkey_prompt(tok, 240, 0.5, seed=4)[1] != key
    assert 200 <= len(a) <= 240  # about the asked length (the test tokenizer spends ~175 on the fixed text)
    text = tok.decode(a)
    assert text.count(key) == 2  # stated twice in the key sentence, never elsewhere
    early, late = (tok.decode(passkey_prompt(tok, 240, d, seed=3)[0]).index(key) for d in (0.0, 1.0))
    assert early < late  # the depth moves the key
    assert check_answer(f" {key}.", key) and check_answer(f"{key} is", key)
    for near in (key[:-1], key + "1", str(int(key) + 1), f"the {key}", ""):
        assert not check_answer(near, key), near
    with pytest.raises(ValueError, match="no room"):
        passkey_prompt(tok, 100, 0.5, seed=0)


def test_passkey_grid_and_heatmap(source, tmp_path, capsys):
    from dsv3.cli import main

    out = tmp_path / "passkey.png"
    assert main(["eval", str(source), "--passkey", "--context-lengths", "220,240", "--depths", "0,1", "--trials", "2",
                 "--seed", "1", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passkey"]["seed"] == 1  # the benchmark's trials
    grid = result["passkey"]["accuracy"]
    assert len(grid) == 2 and all(len(row) == 2 and all(0 <= a <= 1 for a in row) for row in grid)
    assert out.stat().st_size > 0
    assert main(["eval", str(source), "--passkey", "--context-lengths", "4096"]) == 2  # past the model's positions
