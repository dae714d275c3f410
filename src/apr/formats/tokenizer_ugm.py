"""Unigram GGUF vocabs (tokenizer.ggml.model "t5"), written out as llama.cpp's `llm_tokenizer_ugm`.

`tokenizers`' Unigram does not apply llama.cpp's normalization, so both halves are written out:

- `normalize`: the text, prefix by prefix, as SentencePiece's normalizer rewrites it: a user-defined
  token is kept whole; else the longest prefix in tokenizer.ggml.precompiled_charsmap's trie (an
  XOR-compressed compact double array, walked byte by byte) becomes its replacement string; else the
  character stays. Every space becomes "▁" (llama.cpp's UGM always escapes whitespace), one goes in
  front when add_space_prefix says so, and with remove_extra_whitespaces each run of spaces becomes one
  "▁" before the next non-space (none at the end).
- `UgmModel.encode`: SentencePiece's optimized Viterbi over the normalized bytes: at each character,
  every token (normal, user-defined, unused) starting there competes on the sum of scores (doubles;
  user-defined tokens score 0); a character no single token covers is UNK at the lowest normal score
  less 10 (in float32, as llama.cpp); runs of UNK become one.

The ids llama.cpp defaults to for a "t5" vocab: EOS 1, UNK 2, no BOS; add_eos defaults to true
(formats/gguf_meta.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from apr.errors import FormatError
from apr.formats.tokenizer_special import NORMAL, USER_DEFINED, Attr

DEFAULT_EOS, DEFAULT_UNK = 1, 2
ESCAPED_SPACE: Final = "\u2581".encode()
UNKNOWN_PENALTY: Final = np.float32(10.0)
_MATCHED: Final = NORMAL | USER_DEFINED | int(Attr.UNUSED)
_UTF8_LEN: Final = (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)  # unicode_len_utf8, by the high nibble
_FLT_MAX: Final = float(np.finfo(np.float32).max)


@dataclass(frozen=True, slots=True)
class Charsmap:
    """A precompiled_charsmap: the XCDA entries and the NUL-terminated replacement strings."""

    xcda: tuple[int, ...]
    replacements: bytes

    @classmethod
    def parse(cls, blob: bytes) -> Charsmap | None:
        if not blob:
            return None
        if len(blob) < 4:
            raise FormatError("tokenizer.ggml.precompiled_charsmap is too small for its header")
        size = int.from_bytes(blob[:4], "little")
        if 4 + size > len(blob):
            raise FormatError("tokenizer.ggml.precompiled_charsmap is shorter than its header says")
        xcda = np.frombuffer(blob[4 : 4 + size - size % 4], dtype="<u4")
        return cls(tuple(xcda.tolist()), blob[4 + size :])

    def longest(self, text: bytes, start: int) -> tuple[bytes, int] | None:
        """The replacement of the longest prefix of text[start:] the trie has, and that prefix's length."""
        node = self._base(0)
        length = offset = 0
        for i in range(start, len(text)):
            c = text[i]
            if c == 0:
                break
            node ^= c
            if self._node(node) & ((1 << 31) | 0xFF) != c:  # LCHECK: not a child
                break
            leaf = (self._node(node) >> 8) & 1
            node ^= self._base(node)
            if leaf:
                length = i - start + 1
                offset = self._node(node) & ((1 << 31) - 1)
        if length == 0:
            return None
        if offset >= len(self.replacements):
            raise FormatError("tokenizer.ggml.precompiled_charsmap points past its replacement strings")
        end = self.replacements.find(b"\0", offset)
        if end < 0:
            raise FormatError("tokenizer.ggml.precompiled_charsmap has an unterminated replacement string")
        return self.replacements[offset:end], length

    def _node(self, index: int) -> int:
        if index >= len(self.xcda):
            raise FormatError("tokenizer.ggml.precompiled_charsmap indexes past its trie")
        return self.xcda[index]

    def _base(self, index: int) -> int:
        packed = self._node(index)
        return (packed >> 10) << ((packed & (1 << 9)) >> 6)


@dataclass(frozen=True, slots=True)
class UgmModel:
    matcher: dict[bytes, int]  # the tokens Viterbi may pick (a repeated text keeps its last id)
    max_len: int  # the longest of them, in bytes
    scores: Sequence[float]
    user_defined: frozenset[bytes]
    user_ids: frozenset[int]
    unk_id: int
    unk_score: float
    add_space_prefix: bool
    merge_spaces: bool
    charsmap: Charsmap | None

    @classmethod
    def of(
        cls,
        tokens: Sequence[str],
        scores: Sequence[float],
        attrs: Sequence[int],
        unk_id: int | None,
        add_space_prefix: bool,
        remove_extra_whitespaces: bool,
        charsmap: bytes,
    ) -> UgmModel:
        if unk_id is None:
            raise FormatError("a UGM vocab needs an UNK token")
        scores = scores or [0.0] * len(tokens)
        if len(scores) != len(tokens):
            raise FormatError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
        encoded = [t.encode() for t in tokens]
        matcher = {e: i for i, e in enumerate(encoded) if attrs[i] & _MATCHED}
        user_ids = frozenset(i for i, a in enumerate(attrs) if a & USER_DEFINED)
        normal = [scores[i] for i, a in enumerate(attrs) if a & NORMAL]
        lowest = np.float32(min(normal)) if normal else np.float32(_FLT_MAX)
        return cls(
            matcher, max(map(len, matcher), default=0), scores, frozenset(encoded[i] for i in user_ids),
            user_ids, unk_id, float(lowest - UNKNOWN_PENALTY), add_space_prefix, remove_extra_whitespaces,
            Charsmap.parse(charsmap),
        )  # fmt: skip

    def encode(self, text: str) -> list[int]:
        norm = self.normalize(text.encode())
        n = len(norm)
        if n == 0:
            return []
        best: list[tuple[int, int, float]] = [(self.unk_id, 0, -sys.float_info.max)] * (n + 1)
        best[0] = (self.unk_id, 0, 0.0)
        at = 0
        while at < n:
            units = min(_UTF8_LEN[norm[at] >> 4], n - at)
            here = best[at][2]
            covered = False
            for end in range(at + 1, min(n, at + self.max_len) + 1):
                tid = self.matcher.get(norm[at:end])
                if tid is None:
                    continue
                covered |= end - at == units
                score = here + (0.0 if tid in self.user_ids else self.scores[tid])
                if score > best[end][2]:
                    best[end] = (tid, at, score)
            if not covered:
                score = here + self.unk_score
                if score > best[at + units][2]:
                    best[at + units] = (self.unk_id, at, score)
            at += units
        out: list[int] = []
        prev_unknown = False
        step = best[n]
        while True:  # back from the end, one UNK for a run of them
            unknown = step[0] == self.unk_id
            if not (prev_unknown and unknown):
                out.append(step[0])
            if step[1] == 0:
                break
            prev_unknown = unknown
            step = best[step[1]]
        return out[::-1]

    def normalize(self, text: bytes) -> bytes:
        out = bytearray()
        prepended = in_word = False
        at = 0
        while at < len(text):
            replacement, consumed = self._prefix(text, at)
            for c in replacement:
                if c != 0x20:
                    if not in_word:
                        in_word = True
                        if (self.add_space_prefix and not prepended) or self.merge_spaces:
                            out += ESCAPED_SPACE
                            prepended = True
                    out.append(c)
                else:
                    in_word = False
                    if not self.merge_spaces:
                        out += ESCAPED_SPACE
            at += consumed
        return bytes(out)

    def _prefix(self, text: bytes, at: int) -> tuple[bytes, int]:
        """normalize_prefix: what text[at:] starts with after normalization, and the bytes it used."""
        for length in range(min(self.max_len, len(text) - at), 0, -1):
            if text[at : at + length] in self.user_defined:
                return text[at : at + length], length
        if self.charsmap is not None and (found := self.charsmap.longest(text, at)) is not None:
            return found
        units = _UTF8_LEN[text[at] >> 4]  # the text is valid UTF-8 (it came from a str)
        return text[at : at + units], units
