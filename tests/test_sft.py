"""Chat SFT (`dsv3 sft`, `train.sft`): the loss mask, the trainer's packed step against the conversations one by
one, resume, and bad data named by file, line and field."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import fit_until_killed
from dsv3.checkpoint import load_pretrained
from dsv3.cli import main
from dsv3.runs import resolve_checkpoint
from dsv3.tasks import write_task_data
from dsv3.tokenizer import EOT, ChatTemplate, load_tokenizer
from dsv3.train.losses import IGNORE
from dsv3.train.sft import ConversationData, SFTDataError, encode_conversation
from dsv3.train.trainer import TrainConfig, Trainer, resume_config


def test_loss_mask_covers_the_assistant_and_what_ends_its_turn(trained_run):
    ckpt = resolve_checkpoint(trained_run)
    tok, template = load_tokenizer(ckpt), ChatTemplate(ckpt)  # the plain "Role: text" template
    eot = tok.token_to_id(EOT)
    messages = [{"role": "system", "content": "speak well"}, {"role": "user", "content": "what say you"},
                {"role": "assistant", "content": "my good lord"}, {"role": "user", "content": "and now"},
                {"role": "assistant", "content": "sweet night"}]
    ids, labels = encode_conversation(template, tok, messages, eot)
    assert tok.decode(ids) == "System: speak well\nUser: what say you\nAssistant: my good lord\nUser: and now\n" \
                              "Assistant: sweet night"  # (EOT, the last id, decodes to nothing)
    assert ids[-1] == eot and len(labels) == len(ids)
    learned = [(j, y) for j, y in enumerate(labels) if y != IGNORE]
    assert all(y == ids[j + 1] for j, y in learned)  # a label is the next token
    # the targets are the assistant's words and the token that ends each turn ("\n" before the next turn, EOT)
    targets = [y for _, y in learned]
    first = tok.encode(" my good lord").ids
    second = tok.encode(" sweet night").ids
    newline = tok.encode("\n").ids
    assert targets == first + newline[:1] + second + [eot]


def test_prompt_completion_records_learn_the_completion_and_its_end_only():
    """Raw records: the prompt encoded as a prompt (with the BOS this tokenizer's post-processor adds), the completion
    without special tokens (no BOS mid-record), end-of-text after it; the targets are the completion and EOT."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from dsv3.train.sft import encode_completion

    vocab = {"<bos>": 0, EOT: 1, "a": 2, "b": 3, "1": 4, ".": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    ids, labels = encode_completion(tok, "a b", "1 .", eot_id=1)
    assert ids == [0, 2, 3, 4, 5, 1]
    assert labels == [IGNORE, IGNORE, 4, 5, 1, IGNORE]  # "b" predicts "1", "1" predicts ".", "." predicts EOT


def test_a_template_whose_prefixes_do_not_extend_is_refused(trained_run):
    ckpt = resolve_checkpoint(trained_run)
    tok = load_tokenizer(ckpt)
    backwards = ChatTemplate(None, template="{% for m in messages | reverse %}{{ m['content'] }};{% endfor %}")
    with pytest.raises(SFTDataError, match=r"messages\[1\]"):
        encode_conversation(backwards, tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                            0)


def _sft_config(data, base, out, **kw):
    return TrainConfig(objective="sft", init_from=str(base), data=str(data), out=str(out), batch_size=2, lr=1e-3,
                       peak_flops=1e12, warmup_steps=1, progress=False, **{"max_steps": 4, "seq_len": 256, **kw})


def _short_conversations(path, n=40, seed=0):
    """Conversations of a few corpus words each, so that several share a row."""
    import random

    words = "the king lord thou art my good sir what shall we do now love night day sweet gentle".split()
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            turns = [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 4)))},
                     {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 5)))}]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


@pytest.mark.parametrize("compiled,average", [(False, "token"), (True, "token"), (False, "record")],
                         ids=["eager", "compiled", "per-record"])
def test_packed_step_loss_equals_the_conversations_one_by_one(trained_run, tmp_path, compiled, average):
    """The packed step's loss (each row several conversations, kept apart by the attention mask) is the mean over the
    conversations run one by one: over all their target tokens, or with --loss-average record the mean of each
    conversation's mean; also with --compile, whose layers then trace the packed mask."""
    _short_conversations(tmp_path / "data")
    trainer = Trainer(_sft_config(tmp_path / "data", trained_run, tmp_path / "run", grad_accum=2, seq_len=64,
                                  compile=compiled, loss_average=average))
    data, model = trainer.data, load_pretrained(resolve_checkpoint(trained_run)).eval()
    members = [c for m in range(2) for r in range(2) for c in data.row(0, m * 2 + r)]  # step 0's conversations
    assert len(members) > 4  # several conversations per row
    sums, counts = [], []
    with torch.no_grad():
        for c in members:
            ids, labels = (torch.tensor(x) for x in data.conversations[c])
            logits = model(ids[None], mtp=False).logits[0]
            sums.append(float(F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")))
            counts.append(int((labels != IGNORE).sum()))
    assert len(set(counts)) > 1  # the two averages differ
    want = (sum(sums) / sum(counts) if average == "token" else
            sum(s / n for s, n in zip(sums, counts)) / len(members))
    metrics = trainer.train_step()  # the loss is computed before the update
    assert abs(metrics.loss - want) < 1e-5


def test_resumed_sft_run_equals_the_uninterrupted_one(trained_run, tmp_path):
    write_task_data(tmp_path / "data", "add", 40, 4, seed=2)
    Trainer(_sft_config(tmp_path / "data", trained_run, tmp_path / "whole", checkpoint_every=2)).fit()

    # dies during step 4, after the step-2 checkpoint and step 3's metrics
    fit_until_killed(_sft_config(tmp_path / "data", trained_run, tmp_path / "cut", checkpoint_every=2), 3)
    resumed = Trainer(resume_config(tmp_path / "cut"), resume=True)
    assert resumed.step == 2
    resumed.fit()
    whole = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    again = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(r).items() if k not in ("tokens_per_s", "mfu", "step_time")} for r in whole]
    back = [{k: v for k, v in json.loads(r).items() if k not in ("tokens_per_s", "mfu", "step_time")} for r in again]
    assert back == strip  # losses, grad norms, loads and biases, bit for bit
    a = load_pretrained(resolve_checkpoint(tmp_path / "whole")).state_dict()
    b = load_pretrained(resolve_checkpoint(tmp_path / "cut")).state_dict()
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "x"}', r"a\.jsonl:2: field 'messages' is missing \(a conversation\), or 'prompt' and 'completion'"),
    ('{"prompt": 1, "completion": "y"}', r"a\.jsonl:2: field 'prompt' must be a string"),
    ('{"prompt": "x", "completion": ""}', r"a\.jsonl:2: completion: empty"),
    ('{"prompt": "", "completion": "y"}', r"a\.jsonl:2: prompt: empty"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"a\.jsonl:2: messages\[0\]\.role = 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"a\.jsonl:2: messages\[0\]\.content must be a string"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', r"a\.jsonl:2: messages: no assistant"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "' + "word " * 80 + '"}]}',
     r"a\.jsonl:2: the record has \d+ tokens, more than seq_len 64"),
    ("not json", r"a\.jsonl:2: not JSON"),
])
def test_malformed_conversations_name_file_line_and_field(trained_run, tmp_path, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    (tmp_path / "a.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(SFTDataError, match=message):
        ConversationData(tmp_path / "a.jsonl", resolve_checkpoint(trained_run), seq_len=64)


def test_cli_sft_trains_and_refuses_an_existing_out(trained_run, tmp_path, capsys):
    write_task_data(tmp_path / "data", "sort", 30, 4, seed=0)
    out = tmp_path / "run"
    argv = ["sft", str(trained_run), "--data", str(tmp_path / "data"), "--out", str(out), "--max-steps", "2",
            "--batch-size", "2", "--seq-len", "256", "--no-progress"]
    assert main(argv) == 0
    saved = resolve_checkpoint(out)
    assert (saved / "tokenizer.json").read_bytes() == (resolve_checkpoint(trained_run) / "tokenizer.json").read_bytes()
    before = sorted(p.name for p in out.rglob("*"))
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before
    assert main(["sft", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "x"), "--max-steps", "1"]) == 2
    assert "the checkpoint to fine-tune is required" in capsys.readouterr().err
