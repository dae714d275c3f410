"""WordPiece GGUF vocabs (tokenizer.ggml.model "bert"), written out as llama.cpp's `llm_tokenizer_wpm`.

`tokenizers`' WordPiece cannot stand in: llama.cpp's converter rewrites the vocab to "phantom space"
form (a word-initial token is "▁" + token, a "##" continuation loses its "##") and llama.cpp tokenizes
that: each word gets a "▁" in front and is cut greedily into the longest tokens from its start (byte
lengths up to the longest token); a word with a position no token starts at becomes one UNK. The words
come from `_words`, llama.cpp's BERT pre-processing: NFD (each character replaced by the first character
of its decomposition, when accents are stripped), whitespace splits, NUL, U+FFFD and other (C*)
characters dropped, accents (M*) dropped when stripping, simple lowercasing, and each punctuation
character, ASCII symbol and CJK ideograph a word of its own. Character classes are Python's
`unicodedata` (llama.cpp's tables are of a newer Unicode; they differ only on characters Python has
as unassigned). llama_tokenize with add_special puts [CLS] (the BOS id) first and [SEP] last, whatever
add_bos says; the ids default to BERT's 101, 102 and UNK 100 when the GGUF leaves them out, and
lowercasing (tokenizer.ggml.normalizer.lowercase) to on, stripping accents to lowercasing.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from apr.errors import FormatError

PHANTOM_SPACE: Final = "\u2581"
# llama_vocab::impl::load's defaults for a "bert" vocab (a default past the vocab is no token)
DEFAULT_BOS, DEFAULT_UNK, DEFAULT_SEP = 101, 100, 102
# unicode_set_whitespace
WHITESPACE: Final = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
# llm_tokenizer_wpm_session::is_chinese_char (0x2B920, not 0x2B820, as in HF's Rust code)
_CHINESE: Final = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip


def token_or_default(given: int | None, default: int, n_vocab: int) -> int | None:
    """llama.cpp's id for a special token: the GGUF's if in the vocab, else the default if in it."""
    if given is not None and 0 <= given < n_vocab:
        return given
    return default if default < n_vocab else None


@dataclass(frozen=True, slots=True)
class WpmModel:
    ids: dict[bytes, int]  # token (UTF-8) → id; a repeated token keeps its last id, as llama.cpp
    max_len: int  # the longest token, in bytes
    unk_id: int | None
    lowercase: bool
    strip_accents: bool

    @classmethod
    def of(cls, tokens: Sequence[str], unk_id: int | None, lowercase: bool, strip_accents: bool) -> WpmModel:
        encoded = [t.encode() for t in tokens]
        ids = dict(zip(encoded, range(len(encoded)), strict=True))
        return cls(ids, max(map(len, encoded), default=0), unk_id, lowercase, strip_accents)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for word in _words(text, self.lowercase, self.strip_accents):
            w = (PHANTOM_SPACE + word).encode()
            n, start, i = len(w), len(out), 0
            while i < n:
                for j in range(min(n, i + self.max_len + 1), i, -1):
                    tid = self.ids.get(w[i:j])
                    if tid is not None:
                        out.append(tid)
                        i = j
                        break
                else:  # no token starts here: the whole word is unknown
                    del out[start:]
                    break
            if len(out) == start:
                if self.unk_id is None:
                    raise FormatError(f"no tokens spell the word {word!r} and the vocab has no UNK token")
                out.append(self.unk_id)
        return out


def _words(text: str, lowercase: bool, strip_accents: bool) -> list[str]:
    """llm_tokenizer_wpm_session::preprocess."""
    words: list[str] = []
    word: list[str] = []
    for c in text:
        if strip_accents:
            c = unicodedata.normalize("NFD", c)[0]
        if c in WHITESPACE:
            if word:
                words.append("".join(word))
                word = []
            continue
        category = unicodedata.category(c)
        cat, unassigned = category[0], category == "Cn"  # llama.cpp: no flags, not CONTROL
        cp = ord(c)
        if cp in (0, 0xFFFD) or (cat == "C" and not unassigned) or (strip_accents and cat == "M"):
            continue
        s = (c.lower()[:1] or c) if lowercase else c  # simple lowercase: İ → i
        if cat == "P" or (cp < 0x7F and cat == "S") or any(lo <= cp <= hi for lo, hi in _CHINESE):
            if word:
                words.append("".join(word))
                word = []
            words.append(s)
        else:
            word.append(s)
    if word:
        words.append("".join(word))
    return words
