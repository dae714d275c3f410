"""Byte-level BPE GGUF vocabs (tokenizer.ggml.model "gpt2") as one `tokenizers` JSON document.

The document (vocab, merges, pre-tokenizer, decoder) is loaded with `Tokenizer.from_str`: ~0.2 s for 49k
tokens, where building `models.BPE` from Python objects takes seconds. `tokenizer.ggml.pre` picks the
pre-tokenizer from `PRE_TOKENIZERS`: the regexes llama.cpp's llama-vocab.cpp applies for that name, each
as an isolating `Split`, then the byte-level mapping. No normalizer: llama.cpp applies none to BPE vocabs,
even where the HF tokenizer.json has NFC. Special tokens are cut out of the text before this model sees
it (formats/tokenizer_special.py); they are listed as added tokens only so that decode renders them.

Where llama.cpp and `tokenizers` part ways, the document is bent to llama.cpp:
- A merge whose operand or result is not a token: `tokenizers` refuses the vocab, llama.cpp merges anyway
  and finally emits such a symbol as the tokens of its single ASCII bytes (others dropped). Each such
  string gets an id past the vocab (`Bpe.expand` maps it back), so the merges run as in llama.cpp.
- A repeated merge: llama.cpp keeps its first rank, `tokenizers` its last; repeats are dropped.
- Bytes the vocab has no token for: see `missing_lead_bytes`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import tokenizers

from apr.errors import FormatError

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
_BYTE_LEVEL: Final = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": False,
    "use_regex": False,
}


@dataclass(frozen=True, slots=True)
class Bpe:
    backend: Any  # the tokenizers.Tokenizer
    vocab_size: int
    extra: dict[int, list[int]]  # id past the vocab → the vocab ids llama.cpp emits for that symbol

    def encode(self, text: str) -> list[int]:
        ids: list[int] = load(lambda: self.backend.encode(text, add_special_tokens=False).ids, "", ENCODE)
        if not self.extra or max(ids, default=0) < self.vocab_size:
            return ids
        return [j for i in ids for j in self.extra.get(i, (i,))]


def byte_level_bpe(
    pre_name: str, tokens: Sequence[str], merges: Sequence[str], special_ids: Sequence[int]
) -> Bpe:
    """The byte-level BPE model of a GGUF vocab (`special_ids` become added tokens, for decode)."""
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        supported = ", ".join(PRE_TOKENIZERS)
        raise FormatError(f"tokenizer.ggml.pre '{pre_name}' is not supported (supported: {supported})")
    vocab = {t: i for i, t in enumerate(tokens)}  # a repeated token keeps its last id, as llama.cpp
    pairs = _merge_pairs(list(dict.fromkeys(merges)))
    extra = _extra_symbols(vocab, pairs, len(tokens))
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added(i, tokens[i]) for i in special_ids],
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer_json(pre, missing_lead_bytes(vocab.keys() | extra.keys())),
        "post_processor": None,
        "decoder": _BYTE_LEVEL,
        "model": _bpe_json(vocab | extra, pairs, pre.ignore_merges),
    }
    backend = load(lambda: tokenizers.Tokenizer.from_str(json.dumps(document, ensure_ascii=False)))
    single = {c: vocab[c] for c in map(chr, range(128)) if c in vocab}
    expand = {i: [single[c] for c in s if c in single] for s, i in extra.items()}
    return Bpe(backend, len(tokens), expand)


def _extra_symbols(vocab: dict[str, int], pairs: list[list[str]], n: int) -> dict[str, int]:
    """Merge operands and results that are not tokens → ids from `n` up."""
    strings = {a for a, _ in pairs} | {b for _, b in pairs} | {a + b for a, b in pairs}
    return {s: n + k for k, s in enumerate(sorted(strings - vocab.keys()))}


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


def _added(i: int, text: str) -> dict[str, Any]:
    return {
        "id": i,
        "content": text,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


ENCODE: Final = "cannot tokenize the prompt"


def _merge_pairs(merges: Sequence[str]) -> list[list[str]]:
    """ "Ġ t" → ["Ġ", "t"], split at the first space after position 0 as llama.cpp does."""
    pairs = [m.split(" ", 1) for m in merges]
    for i in [i for i, p in enumerate(pairs) if len(p) != 2 or not p[0]]:  # none, or a leading space
        m = merges[i]
        cut = m.find(" ", 1)
        if cut < 0:
            raise FormatError(f"tokenizer.ggml.merges[{i}] {m!r} is not two tokens separated by a space")
        pairs[i] = [m[:cut], m[cut + 1 :]]
    return pairs


def load(make: Any, where: str = "", doing: str = "cannot build the tokenizer") -> Any:
    """`make()` behind the `tokenizers` boundary: its errors, and its Rust panics (pyo3's PanicException
    derives from BaseException, so `except Exception` misses it), become one-line FormatErrors."""
    try:
        return make()
    except Exception as e:  # tokenizers raises plain Exception subclasses with a message
        raise FormatError(f"{where}{doing}: {_first_line(e)}") from None
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise FormatError(f"{where}{doing}: the tokenizers library panicked: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


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


def missing_lead_bytes(known: Any) -> str | None:
    """A regex class of the characters whose first byte has no symbol in `known`, or None."""
    ranges = [_lead_byte_range(b) for b, c in enumerate(BYTE_CHARS) if c not in known]
    parts = [rf"\x{{{lo:X}}}-\x{{{hi:X}}}" for lo, hi in filter(None, ranges)]
    return f"[{''.join(parts)}]" if parts else None
