"""llama.cpp's BPE vocab types (LLAMA_VOCAB_TYPE_BPE): tokenizer.ggml.model "gpt2", "gemma4", "whitespace"
and "hybriddna", each a session over the same BPE (`llm_tokenizer_*_session` in llama-vocab.cpp of the
llama.cpp that llama-cpp-python 0.3.36 vendors).

The text is cut at the special tokens (formats/tokenizer_special.py); each fragment between them has its
spaces escaped as "▁" where the pre-tokenizer says so (formats/tokenizer_raw.py), then goes to the
model's session:
- "gpt2" and "gemma4" (which forces tokenizer.ggml.pre "gemma4"): the BPE of tokenizer.ggml.pre, byte-level
  (formats/tokenizer_bpe.py) or on raw UTF-8 (formats/tokenizer_raw.py);
- "whitespace": that BPE on each run of non-whitespace (whitespace dropped), lowercased first unless the
  pre-tokenizer is "whitespace" or tokenizer.ggml.normalizer.lowercase says otherwise;
- "hybriddna": that BPE, but the text between "<dna>" and "</dna>" (when the vocab has both and
  "<oov>") is cut into 6-byte k-mers (a-z uppercased, the last one padded with "A"), each the token of
  that k-mer with the marker U+E000 after it, or "<oov>". The tokens after "<oov>" lose that marker for
  decode (llama.cpp erases it from their text).
BOS / EOS as the flags say; the Gemma 4 pre-tokenizer type always adds BOS. decode is llama.cpp's
token_to_piece of each id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from apr.formats.base import TokenizerSpec
from apr.formats.tokenizer_bpe import ByteLevelMerges, LazyBackend, byte_level_bpe
from apr.formats.tokenizer_raw import (
    ALWAYS_BOS,
    GEMMA4_MODEL,
    RAW_PRE,
    RawBpe,
    bpe_pieces,
    whitespace_segments,
)
from apr.formats.tokenizer_special import encode_parts, special_tokens, token_attrs

BPE_MODELS: Final = ("gpt2", GEMMA4_MODEL, "whitespace", "hybriddna")
DNA_OPEN: Final = "<dna>"
DNA_CLOSE: Final = "</dna>"
DNA_OOV: Final = "<oov>"
DNA_MARKER: Final = "\ue000"  # after each k-mer token's text in the vocab
KMER: Final = 6


@dataclass(frozen=True, slots=True)
class LlamaBpe:
    encode_text: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    add_bos: bool  # the spec's, or forced (Gemma 4)
    backend: Any  # byte-level: the `tokenizers.Tokenizer`, built on first use; else None


def llama_bpe(spec: TokenizerSpec, tokens: list[str]) -> LlamaBpe:
    """The BPE session of `spec.model` over `tokens` (the vocab as llama.cpp holds it)."""
    pre_name = GEMMA4_MODEL if spec.model == GEMMA4_MODEL else spec.pre  # as llama.cpp for that model
    vocab = dict(zip(tokens, range(len(tokens)), strict=True))  # a repeated token keeps its last id
    attrs = token_attrs(tokens, spec.token_types, spec.fim_ids.keys(), vocab)
    specials = special_tokens(tokens, attrs, spec.model_name, pre_name, vocab)
    escape: Callable[[str], str] = str
    words: Callable[[str], list[int]]
    backend = None
    if pre_name in RAW_PRE:
        raw = RawBpe(RAW_PRE[pre_name], tokens, vocab, spec.merges, attrs, specials)
        words, escape, escaped = raw.encode_words, raw.escape, RAW_PRE[pre_name].escape_whitespaces
    else:
        words, escaped = ByteLevelMerges(pre_name, vocab, spec.merges).encode, False
        ids = sorted(s.id for s in specials)
        backend = LazyBackend(lambda: byte_level_bpe(pre_name, tokens, spec.merges, ids, vocab).backend)
    session: Callable[[str], list[int]] = words
    shown = tokens
    if spec.model == "whitespace":
        lowercase = pre_name != "whitespace" if spec.lowercase is None else spec.lowercase

        def session(text: str) -> list[int]:
            return [i for s in whitespace_segments(text, lowercase) for i in words(s)]

    elif spec.model == "hybriddna" and all(t in vocab for t in (DNA_OPEN, DNA_CLOSE, DNA_OOV)):
        session = _dna_session(vocab, words)
        after = vocab[DNA_OOV] + 1  # the id token_to_id has: its last
        shown = tokens[:after] + [_unmarked(t) for t in tokens[after:]]

    def encode_text(text: str) -> list[int]:
        return encode_parts(text, specials, lambda p: session(escape(p)))

    def decode(ids: Sequence[int]) -> str:
        return bpe_pieces(shown, attrs, ids, escaped)

    return LlamaBpe(encode_text, decode, spec.add_bos or pre_name in ALWAYS_BOS, backend)


def _unmarked(token: str) -> str:
    return token[: -len(DNA_MARKER)] if len(token) > len(DNA_MARKER) and token.endswith(DNA_MARKER) else token


def _dna_session(vocab: dict[str, int], words: Callable[[str], list[int]]) -> Callable[[str], list[int]]:
    open_id, close_id, oov = vocab[DNA_OPEN], vocab[DNA_CLOSE], vocab[DNA_OOV]

    def kmers(raw: str) -> list[int]:
        seq = bytes(b - 32 if 0x61 <= b <= 0x7A else b for b in raw.encode())
        out = []
        for i in range(0, len(seq), KMER):
            kmer = seq[i : i + KMER].ljust(KMER, b"A")
            try:
                out.append(vocab.get(kmer.decode() + DNA_MARKER, oov))
            except UnicodeDecodeError:  # a k-mer that cuts a character is no token
                out.append(oov)
        return out

    def session(text: str) -> list[int]:
        out: list[int] = []
        pos = 0
        while pos < len(text):
            start = text.find(DNA_OPEN, pos)
            if start < 0:
                out += words(text[pos:])
                break
            if start > pos:
                out += words(text[pos:start])
            out.append(open_id)
            begin = start + len(DNA_OPEN)
            end = text.find(DNA_CLOSE, begin)
            out += kmers(text[begin : len(text) if end < 0 else end])
            if end < 0:
                break
            out.append(close_id)
            pos = end + len(DNA_CLOSE)
        return out

    return session
