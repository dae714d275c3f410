"""Exact tokenizers from a `TokenizerSpec`: the model's own runtime's ids, for any text.

The target for a GGUF (or an .apr imported from one) is llama.cpp's `llama_tokenize(..., add_special=true,
parse_special=true)`; for an HF folder, transformers' `AutoTokenizer(...).encode(text)`. One builder per
`TokenizerSpec.model`, registered in `BUILDERS`:

- "llama" (SentencePiece, SPM): formats/tokenizer_spm.py, written out (no `tokenizers` model does it).
- "gpt2", "gemma4", "whitespace", "hybriddna" (llama.cpp's BPE types): formats/tokenizer_llama_bpe.py,
  each a session over the BPE of tokenizer.ggml.pre: byte-level (formats/tokenizer_bpe.py: the splits of
  every pre-tokenizer of llama.cpp, formats/tokenizer_pre.py, by a `tokenizers` pre-tokenizer, then
  llama.cpp's merge loop written out, formats/tokenizer_merge.py; the `tokenizers` BPE model of the vocab
  is built only for export, `Tokenizer.backend`) or on raw UTF-8 (gemma4, granite-embed-multi-311m,
  sarvam-moe, whitespace: formats/tokenizer_raw.py, the same merge loop).
- "rwkv" (RWKV world, greedy longest match): formats/tokenizer_rwkv.py, written out.
- "plamo2" (PLaMo-2, best-score segmentation): formats/tokenizer_plamo2.py, written out.
- "test" (llama.cpp's test vocab: a hash of each 5 bytes): here.
- "bert" (WordPiece, WPM): formats/tokenizer_wpm.py, written out.
- "t5" (Unigram, UGM): formats/tokenizer_ugm.py, written out (with the precompiled charsmap).
- "tokenizer.json" (HF): formats/tokenizer_hf.py, the file with transformers' changes to it.

For the GGUF kinds the text is first cut at llama.cpp's special tokens (formats/tokenizer_special.py),
and BOS / EOS are added as the vocab's add_bos / add_eos flags say ([CLS] / [SEP] always, for WPM).
Everything else llama.cpp has (`UNSUPPORTED`) is a FormatError naming it.
`decode` renders special tokens and does no clean-up: decode(encode(text)) == text for a BPE vocab
without BOS; an SPM vocab adds a space after each special token, which decode keeps, as llama.cpp.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import reduce
from typing import Any, Final

from apr.errors import FormatError
from apr.formats.base import TokenizerSpec
from apr.formats.tokenizer_bpe import BYTE_CHARS, ENCODE, load
from apr.formats.tokenizer_hf import MODEL as HF_MODEL
from apr.formats.tokenizer_hf import hf_backend
from apr.formats.tokenizer_llama_bpe import BPE_MODELS, llama_bpe
from apr.formats.tokenizer_plamo2 import Plamo2Model
from apr.formats.tokenizer_pre import PRE_TOKENIZERS
from apr.formats.tokenizer_rwkv import RwkvModel
from apr.formats.tokenizer_special import (
    BYTE,
    NORMAL,
    SPECIAL,
    USER_DEFINED,
    SpecialToken,
    encode_parts,
    partition,
    special_tokens,
    token_attrs,
)
from apr.formats.tokenizer_spm import SpmModel
from apr.formats.tokenizer_ugm import DEFAULT_EOS as UGM_EOS
from apr.formats.tokenizer_ugm import DEFAULT_UNK as UGM_UNK
from apr.formats.tokenizer_ugm import UgmModel
from apr.formats.tokenizer_wpm import (
    DEFAULT_BOS,
    DEFAULT_SEP,
    DEFAULT_UNK,
    PHANTOM_SPACE,
    WpmModel,
    token_or_default,
)

__all__ = ["BUILDERS", "BYTE_CHARS", "PRE_TOKENIZERS", "Tokenizer", "build_tokenizer"]


@dataclass(frozen=True, slots=True)
class Tokenizer:
    """Text ↔ token ids for one model."""

    vocab_size: int
    encode_text: Callable[[str], list[int]]  # the text's ids, without BOS / EOS
    decode: Callable[[Sequence[int]], str]
    bos_id: int | None = None  # encode prepends it when set
    eos_id: int | None = None  # encode appends it when set
    backend: Any = None  # a `tokenizers.Tokenizer` of the vocab, if there is one (export writes it out)
    bare_text: Callable[[str], list[int]] | None = None  # HF: encode_text without the post-processor's tokens

    def encode(self, text: str) -> list[int]:
        ids = self.encode_text(text)
        bos = [] if self.bos_id is None else [self.bos_id]
        return bos + ids if self.eos_id is None else [*bos, *ids, self.eos_id]

    def encode_bare(self, text: str) -> list[int]:
        """The text's ids with nothing added around them (special tokens in it still parsed): how a
        rendered chat template is tokenized (transformers' `add_special_tokens=False`)."""
        return (self.bare_text or self.encode_text)(text)


def build_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    """The exact tokenizer of a checkpoint.

    >>> tok = build_tokenizer(open_checkpoint("smollm2.gguf").tokenizer_spec())  # doctest: +SKIP
    >>> tok.encode("What is 2+2?")  # doctest: +SKIP
    [1780, 314, 216, 34, 27, 34, 47]
    """
    if spec.model in UNSUPPORTED:
        raise FormatError(
            f"{UNSUPPORTED[spec.model]} tokenizers (tokenizer.ggml.model '{spec.model}') are not supported"
        )
    builder = BUILDERS.get(spec.model)
    if builder is None:
        supported = ", ".join(BUILDERS)
        raise FormatError(f"tokenizer model '{spec.model}' is not supported (supported: {supported})")
    return builder(spec)


def _spm(spec: TokenizerSpec) -> Tokenizer:
    tokens = vocab_tokens(spec)
    attrs = token_attrs(tokens, spec.token_types, spec.fim_ids.keys())
    specials = special_tokens(tokens, attrs, spec.model_name, spec.pre)
    model = SpmModel(tokens, spec.scores, attrs, specials, spec.add_space_prefix)
    return Tokenizer(len(tokens), model.encode, model.decode, *_ends(spec, len(tokens)))


def _bpe(spec: TokenizerSpec) -> Tokenizer:
    tokens = vocab_tokens(spec)
    bpe = llama_bpe(spec, tokens)
    bos, eos = _ends(replace(spec, add_bos=bpe.add_bos), len(tokens))
    return Tokenizer(len(tokens), bpe.encode_text, bpe.decode, bos, eos, backend=bpe.backend)


@dataclass(frozen=True, slots=True)
class _Vocab:
    """What every hand-written model starts from: llama.cpp's token list, its attributes, its specials."""

    tokens: list[str]
    attrs: list[int]
    specials: list[SpecialToken]

    @property
    def n(self) -> int:
        return len(self.tokens)

    @classmethod
    def of(cls, spec: TokenizerSpec) -> _Vocab:
        tokens = vocab_tokens(spec)
        vocab = dict(zip(tokens, range(len(tokens)), strict=True))
        attrs = token_attrs(tokens, spec.token_types, spec.fim_ids.keys(), vocab)
        return cls(tokens, attrs, special_tokens(tokens, attrs, spec.model_name, spec.pre, vocab))

    def around_specials(self, encode: Callable[[str], list[int]]) -> Callable[[str], list[int]]:
        """`encode` on the text between special tokens, which are their own ids."""

        def encode_text(text: str) -> list[int]:
            pieces = partition(text, self.specials)
            return [i for p in pieces for i in ([p] if isinstance(p, int) else encode(p))]

        return encode_text

    def pieces(self, ids: Sequence[int]) -> str:
        return _pieces(self.tokens, self.attrs, ids)


def _rwkv(spec: TokenizerSpec) -> Tokenizer:  # no BOS / EOS, whatever the flags say (as llama.cpp)
    v = _Vocab.of(spec)
    unk = spec.unk_id if spec.unk_id is not None and 0 <= spec.unk_id < v.n else None
    model = RwkvModel(v.tokens, v.specials, unk)
    return Tokenizer(v.n, model.encode, model.decode)


def _plamo2(spec: TokenizerSpec) -> Tokenizer:  # no BOS / EOS, whatever the flags say (as llama.cpp)
    v = _Vocab.of(spec)
    model = Plamo2Model(v.tokens, spec.scores, v.attrs, v.specials)
    return Tokenizer(v.n, model.encode, model.decode)


def _test(spec: TokenizerSpec) -> Tokenizer:
    """llama.cpp's "test" vocab type: each 5 bytes of text → their hash (×31 + byte) modulo the vocab size;
    decode writes each id in hex. No BOS / EOS."""
    tokens = vocab_tokens(spec)
    n = len(tokens)
    specials = special_tokens(
        tokens, token_attrs(tokens, spec.token_types, spec.fim_ids.keys()), spec.model_name
    )

    def chunks(text: str) -> list[int]:
        data = text.encode()
        return [
            reduce(lambda h, b: (h * 31 + b) & _U64, data[i : i + 5], 0) % n for i in range(0, len(data), 5)
        ]

    def encode_text(text: str) -> list[int]:
        return encode_parts(text, specials, chunks)

    def decode(ids: Sequence[int]) -> str:
        return "".join(f"{i:x}" for i in ids if 0 <= i < n)

    if n == 0:
        raise FormatError("a test vocab needs tokens")
    return Tokenizer(n, encode_text, decode)


def _wpm(spec: TokenizerSpec) -> Tokenizer:
    v = _Vocab.of(spec)
    lower = spec.lowercase is not False  # llama.cpp's normalizer_options default to true
    strip = lower if spec.strip_accents is None else spec.strip_accents
    model = WpmModel.of(v.tokens, token_or_default(spec.unk_id, DEFAULT_UNK, v.n), lower, strip)
    cls, sep = (
        token_or_default(spec.bos_id, DEFAULT_BOS, v.n),
        token_or_default(spec.sep_id, DEFAULT_SEP, v.n),
    )
    if cls is None or sep is None:  # llama.cpp asserts they exist
        raise FormatError(f"a WPM vocab needs its [CLS] (BOS) and [SEP] tokens: ids {cls} and {sep}")
    # decode: llama_token_to_piece of each, no clean-up
    return Tokenizer(v.n, v.around_specials(model.encode), v.pieces, cls, sep)


def _ugm(spec: TokenizerSpec) -> Tokenizer:
    v = _Vocab.of(spec)
    unk = token_or_default(spec.unk_id, UGM_UNK, v.n)
    model = UgmModel.of(
        v.tokens, spec.scores, v.attrs, unk, spec.add_space_prefix, spec.remove_extra_whitespaces,
        spec.precompiled_charsmap,
    )  # fmt: skip
    bos, eos = _ends(replace(spec, eos_id=token_or_default(spec.eos_id, UGM_EOS, v.n)), v.n)
    return Tokenizer(v.n, v.around_specials(model.encode), v.pieces, bos, eos)


def _pieces(tokens: Sequence[str], attrs: Sequence[int], ids: Sequence[int]) -> str:
    """WPM / UGM token_to_piece: special and user-defined tokens as they are, normal ones with "▁" as
    spaces, byte tokens as their byte, others nothing."""
    out = bytearray()
    for i in ids:
        if not 0 <= i < len(tokens):  # llama.cpp: no piece
            continue
        if attrs[i] & (SPECIAL | USER_DEFINED):
            out += tokens[i].encode()
        elif attrs[i] & NORMAL:
            out += tokens[i].replace(PHANTOM_SPACE, " ").encode()
        elif attrs[i] & BYTE:  # "<0xAB>": strtol of "AB", as llama.cpp's token_to_byte
            hex_digits = re.match(r"[0-9A-Fa-f]*", tokens[i][3:5])
            out.append(int(hex_digits[0] or "0", 16) if hex_digits else 0)
    return out.decode(errors="replace")


def vocab_tokens(spec: TokenizerSpec) -> list[str]:
    """The vocab as llama.cpp holds it: an empty token is renamed "[EMPTY_<id>]"."""
    tokens = list(spec.tokens)
    if "" in tokens:
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    return tokens


def _ends(spec: TokenizerSpec, vocab_size: int) -> tuple[int | None, int | None]:
    """The BOS / EOS ids encode adds, checked against the vocab."""
    out = []
    for name, wanted, tid in (("BOS", spec.add_bos, spec.bos_id), ("EOS", spec.add_eos, spec.eos_id)):
        if wanted and (tid is None or not 0 <= tid < vocab_size):
            raise FormatError(f"add_{name.lower()} is set but the {name} id {tid} is not a token id")
        out.append(tid if wanted else None)
    return out[0], out[1]


def _from_json(spec: TokenizerSpec) -> Tokenizer:
    if spec.json_path is None:
        raise FormatError("a 'tokenizer.json' tokenizer spec needs json_path")
    backend = hf_backend(spec.json_path)

    def encode_text(text: str) -> list[int]:  # the post-processor adds what transformers adds
        ids: list[int] = load(lambda: backend.encode(text, add_special_tokens=True).ids, "", ENCODE)
        return ids

    def bare_text(text: str) -> list[int]:
        ids: list[int] = load(lambda: backend.encode(text, add_special_tokens=False).ids, "", ENCODE)
        return ids

    def decode(ids: Sequence[int]) -> str:
        text: str = load(lambda: backend.decode(list(ids), skip_special_tokens=False), "", DECODE)
        return text

    size = int(backend.get_vocab_size(with_added_tokens=True))
    return Tokenizer(size, encode_text, decode, backend=backend, bare_text=bare_text)


DECODE: Final = "cannot decode token ids"
_U64: Final = (1 << 64) - 1
BUILDERS: Final[dict[str, Callable[[TokenizerSpec], Tokenizer]]] = {
    "llama": _spm,
    **dict.fromkeys(BPE_MODELS, _bpe),
    "rwkv": _rwkv,
    "plamo2": _plamo2,
    "test": _test,
    "bert": _wpm,
    "t5": _ugm,
    HF_MODEL: _from_json,
}
# the other tokenizer.ggml.model values llama.cpp knows, with its name for the algorithm
UNSUPPORTED: Final[dict[str, str]] = {
    "no_vocab": "vocab-less",
    "none": "vocab-less",
}
