"""Exact tokenizers from a `TokenizerSpec`: the model's own runtime's ids, for any text.

The target for a GGUF (or an .apr imported from one) is llama.cpp's `llama_tokenize(..., add_special=true,
parse_special=true)`; for an HF folder, transformers' `AutoTokenizer(...).encode(text)`. One builder per
`TokenizerSpec.model`, registered in `BUILDERS`:

- "llama" (SentencePiece, SPM): formats/tokenizer_spm.py, written out (no `tokenizers` model does it).
- "gpt2" (byte-level BPE): formats/tokenizer_bpe.py, a `tokenizers` document.
- "tokenizer.json" (HF): formats/tokenizer_hf.py, the file with transformers' changes to it.

For both GGUF kinds the text is first cut at llama.cpp's special tokens (formats/tokenizer_special.py),
and BOS / EOS are added as the vocab's add_bos / add_eos flags say. Everything else llama.cpp has (WPM,
UGM, RWKV, PLaMo-2, the BPE pre-tokenizers not in PRE_TOKENIZERS) is a FormatError naming it.
`decode` renders special tokens and does no clean-up: decode(encode(text)) == text for a BPE vocab
without BOS; an SPM vocab adds a space after each special token, which decode keeps, as llama.cpp.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from apr.errors import FormatError
from apr.formats.base import TokenizerSpec
from apr.formats.tokenizer_bpe import BYTE_CHARS, ENCODE, PRE_TOKENIZERS, byte_level_bpe, load
from apr.formats.tokenizer_hf import MODEL as HF_MODEL
from apr.formats.tokenizer_hf import hf_backend
from apr.formats.tokenizer_special import partition, special_tokens, token_attrs
from apr.formats.tokenizer_spm import SpmModel

__all__ = ["BUILDERS", "BYTE_CHARS", "PRE_TOKENIZERS", "Tokenizer", "build_tokenizer"]


@dataclass(frozen=True, slots=True)
class Tokenizer:
    """Text ↔ token ids for one model."""

    vocab_size: int
    encode_text: Callable[[str], list[int]]  # the text's ids, without BOS / EOS
    decode: Callable[[Sequence[int]], str]
    bos_id: int | None = None  # encode prepends it when set
    eos_id: int | None = None  # encode appends it when set
    backend: Any = None  # the `tokenizers.Tokenizer` doing the work, if one does (export writes it out)
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
    tokens = _tokens(spec)
    attrs = token_attrs(tokens, spec.token_types, spec.fim_ids.keys())
    model = SpmModel(
        tokens, spec.scores, attrs, special_tokens(tokens, attrs, spec.model_name), spec.add_space_prefix
    )
    return Tokenizer(len(tokens), model.encode, model.decode, *_ends(spec, len(tokens)))


def _byte_level_bpe(spec: TokenizerSpec) -> Tokenizer:
    tokens = _tokens(spec)
    attrs = token_attrs(tokens, spec.token_types, spec.fim_ids.keys())
    specials = special_tokens(tokens, attrs, spec.model_name)
    bpe = byte_level_bpe(spec.pre, tokens, spec.merges, sorted(s.id for s in specials))

    def encode_text(text: str) -> list[int]:
        return [i for p in partition(text, specials) for i in ([p] if isinstance(p, int) else bpe.encode(p))]

    def decode(ids: Sequence[int]) -> str:
        text: str = load(lambda: bpe.backend.decode(list(ids), skip_special_tokens=False), "", DECODE)
        return text

    return Tokenizer(len(tokens), encode_text, decode, *_ends(spec, len(tokens)), backend=bpe.backend)


def _tokens(spec: TokenizerSpec) -> list[str]:
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
BUILDERS: Final[dict[str, Callable[[TokenizerSpec], Tokenizer]]] = {
    "llama": _spm,
    "gpt2": _byte_level_bpe,
    HF_MODEL: _from_json,
}
# the other tokenizer.ggml.model values llama.cpp knows, with its name for the algorithm
UNSUPPORTED: Final[dict[str, str]] = {
    "bert": "WordPiece (WPM)",
    "t5": "Unigram (UGM)",
    "rwkv": "RWKV",
    "plamo2": "PLaMo-2",
    "gemma4": "Gemma 4 BPE",
    "hybriddna": "HybridDNA BPE",
    "whitespace": "whitespace BPE",
    "no_vocab": "vocab-less",
    "none": "vocab-less",
    "test": "llama.cpp's test",
}
