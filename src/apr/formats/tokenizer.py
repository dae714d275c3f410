"""Exact tokenizers from a `TokenizerSpec`, built on the `tokenizers` package.

A GGUF byte-level BPE vocab (`tokenizer.ggml.model` = "gpt2") becomes one `tokenizers` JSON document
(vocab, merges, special tokens, pre-tokenizer) loaded with `Tokenizer.from_str`: ~0.2 s for 49k
tokens, where building `models.BPE` from Python objects takes seconds. `tokenizer.ggml.pre` picks
the pre-tokenizer from `PRE_TOKENIZERS`: the regexes llama.cpp's llama-vocab.cpp applies for that
name, each as an isolating `Split`, then the byte-level mapping. The target is llama.cpp's
tokenization exactly (`llama_tokenize(..., parse_special=true)`): no normalizer (llama.cpp applies
none to BPE vocabs, even where the HF tokenizer.json has NFC), and special tokens are matched in the
raw text.

An HF `tokenizer.json` (`spec.json_path`) is loaded as is. SentencePiece GGUF vocabs ("llama") are
not supported yet. `encode` prepends BOS only when the spec says `add_bos`; `decode` keeps special
tokens and does no clean-up, so `decode(encode(text)) == text`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import tokenizers

from apr.errors import AprIOError, FormatError
from apr.formats.base import TokenizerSpec

# llama-vocab.cpp regexes (llama_vocab pre-tokenizer types), verbatim
_GPT2: Final = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3: Final = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2: Final = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp matches _GPT2 with a hand-written splitter that also has onig's trailing `|\s+`
_GPT2_FULL: Final = _GPT2 + r"|\s+"


@dataclass(frozen=True, slots=True)
class PreTokenizer:
    regexes: tuple[str, ...]  # applied in turn; matches and the text between them become pieces
    ignore_merges: bool = False  # a whole piece found in the vocab is one token (llama3)


_SMOLLM: Final = PreTokenizer((r"\p{N}", _GPT2_FULL))
_LLAMA_BPE: Final = PreTokenizer((_LLAMA3,), ignore_merges=True)
_QWEN: Final = PreTokenizer((_QWEN2,))

# tokenizer.ggml.pre → pre-tokenizer, with llama.cpp's spellings of each name
PRE_TOKENIZERS: Final[dict[str, PreTokenizer]] = {
    "default": PreTokenizer(
        (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_FULL, r"\p{N}+", r"[0-9][0-9][0-9]"),
    ),
    "gpt-2": PreTokenizer((_GPT2_FULL,)),
    "smollm": _SMOLLM,
    "starcoder": _SMOLLM,
    "refact": _SMOLLM,
    "llama-bpe": _LLAMA_BPE,
    "llama3": _LLAMA_BPE,
    "llama-v3": _LLAMA_BPE,
    "qwen2": _QWEN,
    "deepseek-r1-qwen": _QWEN,
}

# GGUF token types (llama_token_type) that llama.cpp matches as whole special tokens with
# parse_special=true: UNKNOWN, CONTROL, USER_DEFINED
SPECIAL_TOKEN_TYPES: Final = frozenset({2, 3, 4})


class Tokenizer:
    """Text ↔ token ids for one model; `encode` adds BOS only if the model's spec asks for it."""

    def __init__(self, backend: Any, vocab_size: int, bos_id: int | None = None) -> None:
        self.backend = backend  # the tokenizers.Tokenizer
        self.vocab_size = vocab_size
        self.bos_id = bos_id  # prepended by encode when not None

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        return ids if self.bos_id is None else [self.bos_id, *ids]

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self.backend.decode(list(ids), skip_special_tokens=False)
        return text


def build_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    """The exact tokenizer of a checkpoint.

    >>> tok = build_tokenizer(open_checkpoint("smollm2.gguf").tokenizer_spec())  # doctest: +SKIP
    >>> tok.encode("What is 2+2?")  # doctest: +SKIP
    [1780, 314, 216, 34, 27, 34, 47]
    """
    if spec.model in _NOT_YET:
        raise FormatError(_NOT_YET[spec.model])
    builder = _BUILDERS.get(spec.model)
    if builder is None:
        supported = ", ".join(_BUILDERS)
        raise FormatError(f"tokenizer model '{spec.model}' is not supported (supported: {supported})")
    return builder(spec)


# ---- byte-level BPE from GGUF metadata ----------------------------------------------------------


def _byte_level_bpe(spec: TokenizerSpec) -> Tokenizer:
    pre = PRE_TOKENIZERS.get(spec.pre)
    if pre is None:
        supported = ", ".join(PRE_TOKENIZERS)
        raise FormatError(f"tokenizer.ggml.pre '{spec.pre}' is not supported (supported: {supported})")
    tokens = list(spec.tokens)
    vocab = {t: i for i, t in enumerate(tokens)}  # a repeated token keeps its last id, as llama.cpp
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _special_tokens(tokens, spec.token_types),
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer_json(pre, _missing_lead_bytes(vocab)),
        "post_processor": None,
        "decoder": _BYTE_LEVEL,
        "model": _bpe_json(vocab, _merge_pairs(spec.merges), pre.ignore_merges),
    }
    backend = _load(lambda: tokenizers.Tokenizer.from_str(json.dumps(document, ensure_ascii=False)))
    return Tokenizer(backend, len(tokens), _bos(spec, len(tokens)))


_BYTE_LEVEL: Final = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": False,
    "use_regex": False,
}


def _pre_tokenizer_json(pre: PreTokenizer, missing: str | None) -> dict[str, Any]:
    splits = [_split(r, "Isolated") for r in pre.regexes]
    if missing is not None:
        splits.append(_split(missing, "MergedWithNext"))
    return {"type": "Sequence", "pretokenizers": [*splits, _BYTE_LEVEL]}


def _split(regex: str, behavior: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": behavior, "invert": False}


def _bpe_json(vocab: dict[str, int], merges: list[list[str]], ignore_merges: bool) -> dict[str, Any]:
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": ignore_merges,
        "vocab": vocab,
        "merges": merges,
    }


# ---- bytes the vocab has no token for -----------------------------------------------------------
# Some vocabs lack a few byte tokens (SmolLM2: 0x04, 0x06, ..., 0xF1, 0xF2). llama.cpp keeps such
# a byte as a symbol that never merges and then drops it, so merges cannot cross it; `tokenizers`
# drops it first and would merge its neighbours. Cutting each piece just before a character that
# starts with such a byte (a `MergedWithNext` split) restores llama.cpp's result. A missing
# continuation byte (0x80-0xBF) would need a cut inside a character; no vocab seen lacks one.


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the character standing for each byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), 256)
    rest = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(rest)}
    return [chars[b] for b in range(256)]


BYTE_CHARS: Final = _byte_chars()
# UTF-8 lead bytes: (first, last, payload mask, continuation bytes, lowest code point so encoded)
_UTF8_LEADS: Final = (
    (0x00, 0x7F, 0x7F, 0, 0),
    (0xC2, 0xDF, 0x1F, 1, 0x80),
    (0xE0, 0xEF, 0x0F, 2, 0x800),
    (0xF0, 0xF4, 0x07, 3, 0x10000),
)


def _lead_byte_range(b: int) -> tuple[int, int] | None:
    """Code points whose UTF-8 encoding starts with byte `b` (None if `b` never starts one)."""
    for first, last, mask, n_cont, lowest in _UTF8_LEADS:
        if first <= b <= last:
            start = (b & mask) << (6 * n_cont)
            lo, hi = max(start, lowest), min(start + (1 << (6 * n_cont)) - 1, 0x10FFFF)
            return lo, 0xD7FF if lo <= 0xD800 <= hi else hi  # no surrogates in a regex class
    return None


def _missing_lead_bytes(vocab: dict[str, int]) -> str | None:
    """A regex class of the characters whose first byte has no token, or None."""
    ranges = [_lead_byte_range(b) for b, c in enumerate(BYTE_CHARS) if c not in vocab]
    parts = [rf"\x{{{lo:X}}}-\x{{{hi:X}}}" for lo, hi in filter(None, ranges)]
    return f"[{''.join(parts)}]" if parts else None


def _merge_pairs(merges: Sequence[str]) -> list[list[str]]:
    """ "Ġ t" → ["Ġ", "t"], split at the first space after position 0 as llama.cpp does."""
    pairs = []
    for i, m in enumerate(merges):
        cut = m.find(" ", 1)
        if cut < 0:
            raise FormatError(f"tokenizer.ggml.merges[{i}] {m!r} is not two tokens separated by a space")
        pairs.append([m[:cut], m[cut + 1 :]])
    return pairs


def _special_tokens(tokens: list[str], token_types: Sequence[int]) -> list[dict[str, Any]]:
    if token_types and len(token_types) != len(tokens):
        raise FormatError(
            f"tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens"
        )
    return [
        {
            "id": i,
            "content": tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(token_types)
        if t in SPECIAL_TOKEN_TYPES
    ]


def _bos(spec: TokenizerSpec, vocab_size: int) -> int | None:
    if not spec.add_bos:
        return None
    if spec.bos_id is None or not 0 <= spec.bos_id < vocab_size:
        raise FormatError(f"add_bos is set but the BOS id {spec.bos_id} is not a token id")
    return spec.bos_id


# ---- tokenizer.json -----------------------------------------------------------------------------


def _from_json(spec: TokenizerSpec) -> Tokenizer:
    path = spec.json_path
    if path is None:
        raise FormatError("a 'tokenizer.json' tokenizer spec needs json_path")
    if not path.is_file():
        raise AprIOError(f"tokenizer file not found: {path}")
    backend = _load(lambda: tokenizers.Tokenizer.from_file(str(path)), f"{path}: ")
    n = int(backend.get_vocab_size(with_added_tokens=True))
    return Tokenizer(backend, n, _bos(spec, n))


def _load(make: Callable[[], Any], where: str = "") -> Any:
    try:
        return make()
    except Exception as e:  # tokenizers raises plain Exception subclasses with a message
        raise FormatError(f"{where}cannot build the tokenizer: {e}") from None


_BUILDERS: Final[dict[str, Callable[[TokenizerSpec], Tokenizer]]] = {
    "gpt2": _byte_level_bpe,
    "tokenizer.json": _from_json,
}
_NOT_YET: Final[dict[str, str]] = {
    "llama": "SentencePiece GGUF tokenizers (tokenizer.ggml.model 'llama') are not supported yet",
}
