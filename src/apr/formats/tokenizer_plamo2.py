"""PLaMo-2 vocabs (tokenizer.ggml.model "plamo2"): llama.cpp's `llm_tokenizer_plamo2`, written out.

Mirrors llama-vocab.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors. llama.cpp builds an
Aho-Corasick-like table of every token's suffixes to find, at each code point, the tokens the text there
starts with; what it computes is a dynamic programme from the end of each fragment (text between
special tokens; a leading U+FEFF dropped):

    cost[n] = 0,  cost[i] = min over tokens t the text at i starts with:  cost[i + len(t)] - score(t)

where score(t) = round(score × 10⁴) (half away from zero) for every token that is not a byte token and has
a finite score, tried longest first (a tie keeps the longer), then one code point at the "unknown" score
-10⁷, which becomes the `<0xXX>` byte tokens of its UTF-8 bytes. Every byte needs its byte token, at
an id other than 0 (llama.cpp refuses the vocab otherwise). Nothing is added around the ids, and
token_to_piece is each token's text, a byte token's byte for it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Final

from apr.errors import FormatError
from apr.formats.tokenizer_special import BYTE, SpecialToken, encode_parts

UNKNOWN_SCORE: Final = -10_000_000
PREFIX_CAP: Final = 24
_BYTE_TOKEN: Final = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _int_score(score: float) -> int | None:
    if not math.isfinite(score):
        return None
    x = score * 1e4
    return math.floor(x + 0.5) if x >= 0 else -math.floor(-x + 0.5)  # std::round


class Plamo2Model:
    def __init__(
        self,
        tokens: Sequence[str],
        scores: Sequence[float],
        attrs: Sequence[int],
        specials: Sequence[SpecialToken],
    ) -> None:
        scores = scores or [0.0] * len(tokens)  # llama.cpp: no tokenizer.ggml.scores, all 0
        if len(scores) != len(tokens):
            raise FormatError(
                f"a PLaMo-2 vocab needs a score per token: {len(scores)} for {len(tokens)} tokens"
            )
        byte_ids = [0] * 256
        self.pieces: list[bytes] = []
        self.best: dict[str, tuple[int, int]] = {}  # token text → (id, score); the last of a repeat
        for i, (t, s) in enumerate(zip(tokens, scores, strict=True)):
            m = _BYTE_TOKEN.fullmatch(t) if attrs[i] & BYTE else None
            self.pieces.append(bytes([int(m[1], 16)]) if m else t.encode())
            if attrs[i] & BYTE:
                if m:
                    byte_ids[int(m[1], 16)] = i
                continue
            score = _int_score(s)
            if score is None:
                self.best.pop(t, None)  # this one's score overrides the earlier one's, as llama.cpp
            else:
                self.best[t] = (i, score)
        if 0 in byte_ids:
            raise FormatError(
                f"the PLaMo-2 vocab has no byte token <0x{byte_ids.index(0):02X}> (llama.cpp refuses it)"
            )
        self.byte_ids = byte_ids
        # the tokens' prefixes up to PREFIX_CAP code points (memory stays linear in the vocab's size)
        self.prefixes = {t[:k] for t in self.best for k in range(1, min(len(t), PREFIX_CAP) + 1)}
        self.longest = max(map(len, self.best), default=0)
        self.specials = specials

    def encode(self, text: str) -> list[int]:
        return encode_parts(text, self.specials, lambda p: self._fragment(p.removeprefix("\ufeff")))

    def _fragment(self, text: str) -> list[int]:
        n = len(text)
        cost = [0] * (n + 1)
        step = [1] * (n + 1)
        token = [-1] * (n + 1)
        best, prefixes = self.best, self.prefixes
        for i in range(n - 1, -1, -1):
            found = []
            end = i + 1
            last = min(n, i + self.longest)
            while end <= last:  # past PREFIX_CAP: every length up to the longest token
                piece = text[i:end]
                if end - i <= PREFIX_CAP and piece not in prefixes:
                    break
                if piece in best:
                    found.append((end, best[piece]))
                end += 1
            c, length, tid = 1 << 60, 1, -1
            for end, (t, score) in reversed(found):  # longest first
                if (s := cost[end] - score) < c:
                    c, length, tid = s, end - i, t
            if (s := cost[i + 1] - UNKNOWN_SCORE) < c:
                c, length, tid = s, 1, -1
            cost[i], step[i], token[i] = c, length, tid
        out: list[int] = []
        pos = 0
        while pos < n:
            if token[pos] >= 0:
                out.append(token[pos])
            else:
                out += [self.byte_ids[b] for b in text[pos].encode()]
            pos += step[pos]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        pieces = self.pieces
        return b"".join(pieces[i] for i in ids if 0 <= i < len(pieces)).decode(errors="replace")
