"""WordPiece GGUF vocabs ("bert"): apr's ids equal llama.cpp's (`Llama(vocab_only=True).tokenize(text,
add_bos=True, special=True)`), exactly, on generated text.

The vocab is a BERT-style WordPiece trained here with `tokenizers` on the generated multi-script corpus,
written as llama.cpp's converter writes one (conversion/bert.py: "phantom space" tokens, control special
tokens), with and without its normalizer flags and special-token ids.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import gguf as gguf
import pytest
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, trainers

from apr.errors import FormatError
from apr.formats.base import TokenizerSpec
from apr.formats.tokenizer import build_tokenizer
from tests.formats.test_tokenizer_pre import TEXTS
from tests.formats.test_tokenizer_spm import corpus
from tests.formats.vocab_oracle import assert_apr_round_trip, compare_with_llama, finish

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MORE = [
    "[CLS] [SEP]",
    "x[MASK]y",
    "  [UNK]  ",
    "Ünïcödé ÀÉÎÕÜ ǅ İstanbul ﬁ Å Ω",
    "a\u0301\u0302b",
    "\x00\ufffd\x01",
]


@pytest.fixture(scope="module")
def wordpiece() -> list[str]:
    """The tokens (in id order) of a cased BERT WordPiece, in phantom-space form."""
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=1500, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(corpus(2000, seed=2), trainer)
    vocab: dict[str, int] = json.loads(tok.to_str())["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    return [t if t in SPECIALS else t[2:] if t.startswith("##") else "\u2581" + t for t in tokens]


def write_wpm_vocab(path: Path, tokens: list[str], ids: bool, **flags: bool) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny bert")
    w.add_uint32("llama.context_length", 64)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    if ids:
        w.add_bos_token_id(tokens.index("[CLS]"))
        w.add_sep_token_id(tokens.index("[SEP]"))
        w.add_unk_token_id(tokens.index("[UNK]"))
    for key, value in flags.items():
        w.add_bool(f"tokenizer.ggml.normalizer.{key}", value)
    finish(w)
    return path


def _at_bert_ids(tokens: list[str]) -> list[str]:
    """The vocab with [UNK], [CLS], [SEP] moved to BERT's ids 100, 101, 102 (llama.cpp's defaults)."""
    out = list(tokens)
    for name, at in (("[UNK]", 100), ("[CLS]", 101), ("[SEP]", 102)):
        i = out.index(name)
        out[i], out[at] = out[at], out[i]
    return out


VARIANTS = {
    "uncased": (True, {"lowercase": True}),  # strip_accents follows lowercase
    "unstated": (True, {}),  # llama.cpp lowercases and strips accents
    "cased": (True, {"lowercase": False}),
    "lower-keep-accents": (True, {"lowercase": True, "strip_accents": False}),
    "default-ids": (False, {"lowercase": False, "strip_accents": True}),
}


@pytest.mark.oracle
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_equals_llama_cpp(variant: str, wordpiece: list[str], tmp_path: Path) -> None:
    """Exact ids (tolerance: none), [CLS] and [SEP] included."""
    ids, flags = VARIANTS[variant]
    tokens = wordpiece if ids else _at_bert_ids(wordpiece)
    path = write_wpm_vocab(tmp_path / f"{variant}.gguf", tokens, ids, **flags)
    c = compare_with_llama(path, [*TEXTS, *MORE])
    assert_apr_round_trip(c.spec, c.want)  # the .apr keys carry everything this tokenizer needs
    # decode: llama_token_to_piece of each id, concatenated
    encoded = list(c.want.values())
    assert [c.tok.decode(i).encode() for i in encoded] == [c.llm.detokenize(i, special=True) for i in encoded]


def test_missing_cls_or_sep_is_an_error() -> None:
    spec = TokenizerSpec(model="bert", tokens=("[UNK]", "\u2581a"), token_types=(3, 1), unk_id=0)
    with pytest.raises(FormatError, match=r"^a WPM vocab needs its \[CLS\] \(BOS\) and \[SEP\] tokens"):
        build_tokenizer(spec)
    tok = build_tokenizer(replace(spec, bos_id=0, sep_id=0))
    assert tok.encode("a b") == [0, 1, 0, 0]
