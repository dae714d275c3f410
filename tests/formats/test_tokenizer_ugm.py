"""Unigram GGUF vocabs ("t5"): apr's ids equal llama.cpp's (`Llama(vocab_only=True).tokenize(text,
add_bos=True, special=True)`), exactly, on generated text.

The vocabs are SentencePiece unigram models trained here on the generated multi-script corpus and written
as llama.cpp's converter writes a T5 vocab (conversion/t5.py: scores, unknown / control / user-defined
types, add_space_prefix, remove_extra_whitespaces, precompiled_charsmap): T5's settings (NFKC charsmap,
dummy prefix, extra spaces removed) and the opposite (identity: no charsmap, spaces kept, no prefix).
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf as gguf
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model

from apr.errors import FormatError
from apr.formats.base import TokenizerSpec
from apr.formats.tokenizer import build_tokenizer
from tests.formats.test_tokenizer_pre import TEXTS
from tests.formats.test_tokenizer_spm import USER_SYMBOLS, corpus
from tests.formats.vocab_oracle import assert_apr_round_trip, compare_with_llama, finish

ADDED = ["<extra_id_0>", "<extra_id_1>"]  # as if from added_tokens.json: USER_DEFINED, score -1000
MORE = [
    "  spaced   out  ",
    "ＡＢＣ ｶﾀｶﾅ ① ﬁ ™ ½",
    "<extra_id_0>x<extra_id_1>",
    " <tool> <extra_id_1> ",
    "\u3000\u00a0x",
]


def train(normalization: str, **options: Any) -> Any:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(3000, seed=3)), model_writer=buf, model_type="unigram",
        vocab_size=900, character_coverage=0.9995, normalization_rule_name=normalization,
        user_defined_symbols=[*USER_SYMBOLS, *ADDED], num_threads=1, minloglevel=2, unk_id=2, eos_id=1,
        bos_id=-1, pad_id=0, **options,
    )  # fmt: skip
    return buf.getvalue()


def write_ugm_vocab(path: Path, model: bytes, ids: bool) -> Path:
    """What conversion/t5.py writes for a tokenizer.model (and `ADDED` from added_tokens.json)."""
    proto = sp_model.ModelProto()
    proto.ParseFromString(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        kind = [(sp.IsUnknown, 2), (sp.IsControl, 3), (sp.IsUnused, 5), (sp.IsByte, 6)]
        t = next((k for test, k in kind if test(i)), 1)
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(t)
    for piece in ADDED:
        i = tokens.index(piece)
        scores[i], types[i] = -1000.0, 4
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny t5")
    w.add_uint32("llama.context_length", 64)
    w.add_tokenizer_model("t5")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    w.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
    if proto.normalizer_spec.precompiled_charsmap:
        w.add_precompiled_charsmap(proto.normalizer_spec.precompiled_charsmap)
    if ids:
        w.add_eos_token_id(1)
        w.add_unk_token_id(2)
        w.add_add_eos_token(True)
    finish(w)
    return path


VARIANTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "t5": ("nmt_nfkc", {}, True),
    "identity": ("identity", {"add_dummy_prefix": False, "remove_extra_whitespaces": False}, False),
}


@pytest.mark.oracle
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_equals_llama_cpp(variant: str, tmp_path: Path) -> None:
    """Exact ids (tolerance: none), EOS included (by default when the GGUF does not say)."""
    normalization, options, ids = VARIANTS[variant]
    path = write_ugm_vocab(tmp_path / f"{variant}.gguf", train(normalization, **options), ids)
    c = compare_with_llama(path, [*TEXTS, *MORE])
    assert bool(c.spec.precompiled_charsmap) == (normalization != "identity")
    assert_apr_round_trip(c.spec, c.want)  # the .apr keys carry everything this tokenizer needs
    assert c.tok.encode("")[-1:] == [1]
    # decode: llama_token_to_piece of each id, concatenated
    encoded = list(c.want.values())
    assert [c.tok.decode(i).encode() for i in encoded] == [c.llm.detokenize(i, special=True) for i in encoded]


def test_a_broken_charsmap_is_an_error() -> None:
    spec = TokenizerSpec(model="t5", tokens=("<pad>", "</s>", "<unk>", "a"), token_types=(3, 3, 2, 1))
    with pytest.raises(
        FormatError, match="^tokenizer.ggml.precompiled_charsmap is too small for its header$"
    ):
        build_tokenizer(replace(spec, precompiled_charsmap=b"\x01"))
    assert build_tokenizer(spec).encode("a") == [3]
