"""Incremental detokenization (`dsv3.infer.detokenize.IncrementalText`) against decoding the whole token list."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv3.infer.detokenize import IncrementalText

TEXT = ("Whence comes this, my lord? Héllo wörld, naïve café; 日本語のテキスト and emoji 🙂🚀 — “quoted” text.\n"
        "KING HENRY. Once more unto the breach, dear friends, once more!\n") * 4


def byte_level() -> Tokenizer:  # as dsv3's and DeepSeek-V3's: multi-byte characters split across tokens
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=320,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def metaspace() -> Tokenizer:  # SentencePiece-style: "▁" for spaces, the leading one dropped when decoding
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    return tok


class Counting:
    """A tokenizer that records the length of every token list it decodes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids: list[int]) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids)


@pytest.mark.parametrize("make", [byte_level, metaspace])
def test_incremental_text_equals_decoding_everything(make):
    """Random token streams (byte tokens that leave UTF-8 sequences incomplete included), one to three tokens per
    update: after every update the text equals tokenizer.decode of all the tokens so far; and the windows it
    decodes stay short (it settles), unlike decoding everything."""
    tok = make()
    rng = random.Random(0)
    vocab = tok.get_vocab_size()
    for trial in range(20):
        tokens: list[int] = []
        counting = Counting(tok)
        text = IncrementalText(counting)
        for _ in range(150):
            tokens.extend(rng.randrange(vocab) for _ in range(rng.randint(1, 3)))
            assert text.update(tokens) == tok.decode(tokens), (trial, tokens)
        assert max(counting.lengths) < 60, max(counting.lengths)  # the streams are 150-450 tokens long
    encoded = tok.encode(TEXT).ids  # a natural stream too
    text = IncrementalText(tok)
    for i in range(1, len(encoded) + 1):
        assert text.update(encoded[:i]) == tok.decode(encoded[:i])


def test_a_decoder_that_rewrites_earlier_text_falls_back_to_decoding_everything():
    """A decoder whose text for more tokens does not extend its text for fewer (here: written backwards): the
    window's text does not start with its context's, and the text is the whole output decoded."""

    class Backwards:
        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)[::-1]

    tok, tokens, text = Backwards(), [], IncrementalText(Backwards())
    for i in range(40):
        tokens.append(i * 7)
        assert text.update(tokens) == tok.decode(tokens)
