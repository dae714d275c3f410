r"""BPE vocabs on raw UTF-8 (llama.cpp's `byte_encode = false`): Gemma 4, granite-embed-multi-311m,
Sarvam-MoE and the "whitespace" pre-tokenizer (jina-embeddings-v2-base-zh).

Mirrors llama-vocab.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors:
- each text fragment between special tokens has its spaces replaced by "▁" (U+2581) where the name sets
  `escape_whitespaces` (gemma4, granite-embed-multi-311m, sarvam-moe; not whitespace);
- the fragment is split by the type's regex, `[^\n]+|[\n]+` (GEMMA4, SARVAM_MOE) or `\S+` (WHITESPACE,
  std::wregex: its \s is C's isspace plus llama.cpp's non-ASCII whitespace, which it maps to \v), the
  text between matches kept as words too;
- each word goes through llama.cpp's merge loop (formats/tokenizer_merge.py) over its characters; for
  GEMMA4 a word of newlines only that is a token is that token; a final symbol that is not a token
  becomes the `<0xXX>` tokens of its bytes (those the vocab has);
- the GEMMA4 type always adds BOS, whatever tokenizer.ggml.add_bos_token says;
- token_to_piece: special and user-defined tokens as they are, normal ones with "▁" as a space (escaping
  names) or through GPT-2's byte decoder (whitespace: `llama_decode_text`), byte tokens as their byte.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from apr.formats.tokenizer_bpe import BYTE_CHARS
from apr.formats.tokenizer_merge import MergeBpe, byte_token_fallback
from apr.formats.tokenizer_special import BYTE, NORMAL, SPECIAL, USER_DEFINED, SpecialToken, encode_parts

ESCAPED_SPACE: Final = "\u2581"


@dataclass(frozen=True, slots=True)
class RawPre:
    kind: str  # LLAMA_VOCAB_PRE_TYPE_<kind>
    escape_whitespaces: bool


# tokenizer.ggml.pre → its type (llama_vocab::impl::load); tokenizer.ggml.model "gemma4" forces "gemma4"
RAW_PRE: Final[dict[str, RawPre]] = {
    "gemma4": RawPre("GEMMA4", True),
    "granite-embed-multi-311m": RawPre("GEMMA4", True),
    "sarvam-moe": RawPre("SARVAM_MOE", True),
    "whitespace": RawPre("WHITESPACE", False),
}
ALWAYS_BOS: Final = frozenset(n for n, p in RAW_PRE.items() if p.kind == "GEMMA4")
GEMMA4_MODEL: Final = "gemma4"

_LINES: Final = re.compile(r"[^\n]+|\n+")
# C isspace() and unicode_set_whitespace (llama.cpp turns those into \v before std::wregex)
_SPACES: Final = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_WORDS_AND_GAPS: Final = re.compile(f"[^{_SPACES}]+|[{_SPACES}]+")
_BYTE_OF: Final = {c: b for b, c in enumerate(BYTE_CHARS)}
_WHITESPACE_RUNS: Final = re.compile(f"[{_SPACES}]+")  # unicode_set_whitespace (it has C's isspace)


def whitespace_segments(text: str, lowercase: bool) -> list[str]:
    """llm_tokenizer_whitespace_session (tokenizer.ggml.model "whitespace"): the text cut at whitespace,
    which is dropped, each character simply lowercased if `lowercase` (İ → i, as unicode_tolower)."""
    if lowercase:
        text = "".join(c.lower()[:1] or c for c in text)
    return [s for s in _WHITESPACE_RUNS.split(text) if s]


def _only_newlines(word: str) -> bool:
    return not word.strip("\n")


class RawBpe:
    """Text (no special tokens in it) → ids, and ids → text, for one raw-UTF-8 BPE vocab."""

    def __init__(
        self,
        pre: RawPre,
        tokens: Sequence[str],
        vocab: dict[str, int],
        merges: Sequence[str],
        attrs: Sequence[int],
        specials: Sequence[SpecialToken],
    ) -> None:
        self.pre, self.tokens, self.attrs, self.specials = pre, tokens, attrs, specials
        whole = _only_newlines if pre.kind == "GEMMA4" else None
        self.model = MergeBpe(vocab, merges, byte_token_fallback(vocab), whole=whole)
        self.split: Callable[[str], list[str]] = (
            _WORDS_AND_GAPS.findall if pre.kind == "WHITESPACE" else _LINES.findall
        )

    def encode(self, text: str) -> list[int]:
        return encode_parts(text, self.specials, lambda p: self.encode_words(self.escape(p)))

    def escape(self, fragment: str) -> str:
        return fragment.replace(" ", ESCAPED_SPACE) if self.pre.escape_whitespaces else fragment

    def encode_words(self, text: str) -> list[int]:
        """The ids of an (escaped) fragment: split, then merged."""
        return self.model.encode_words(self.split(text))

    def decode(self, ids: Sequence[int]) -> str:
        return bpe_pieces(self.tokens, self.attrs, ids, self.pre.escape_whitespaces)


def bpe_pieces(tokens: Sequence[str], attrs: Sequence[int], ids: Sequence[int], escaped: bool) -> str:
    """llama_token_to_piece(special=true) of each id of a BPE vocab, concatenated: special and
    user-defined tokens as they are, normal ones with "▁" as a space (`escaped`) or through GPT-2's byte
    decoder, byte tokens as their byte, others nothing."""
    out = bytearray()
    for i in ids:
        if not 0 <= i < len(tokens):  # llama.cpp: no piece
            continue
        text, attr = tokens[i], attrs[i]
        if attr & (SPECIAL | USER_DEFINED):
            out += text.encode()
        elif attr & NORMAL:
            out += text.replace(ESCAPED_SPACE, " ").encode() if escaped else _gpt2_decoded(text)
        elif attr & BYTE:  # "<0xAB>": strtol of "AB", as llama.cpp's token_to_byte
            hex_digits = re.match(r"[0-9A-Fa-f]*", text[3:5])
            out.append(int(hex_digits[0] or "0", 16) if hex_digits else 0)
    return out.decode(errors="replace")


def _gpt2_decoded(text: str) -> bytes:
    """llama_decode_text: each character as the byte GPT-2's alphabet gives it, else a marker."""
    if text.isascii() and text.isprintable() and " " not in text:
        return text.encode()  # printable ASCII but the space is itself in GPT-2's alphabet
    out = bytearray()
    for c in text:
        b = _BYTE_OF.get(c)
        if b is None:
            out += f"[UNK_BYTE_0x{c.encode().hex()}{text}]".encode()
        else:
            out.append(b)
    return bytes(out)
