"""SentencePiece GGUF vocabs (tokenizer.ggml.model "llama"), tokenized exactly as llama.cpp's SPM tokenizer.

What llama.cpp does (llm_tokenizer_spm_session in llama-vocab.cpp, llama-cpp-python 0.3.36), step by step:
1. The text is cut at the special tokens (formats/tokenizer_special.py). Each text piece gets a leading
   space if `add_space_prefix` is set and the piece starts the text or follows a special token; then
   every " " becomes "▁" (no other normalization).
2. The piece is split into characters. Every pair of neighbours whose concatenation is a token (any token,
   whatever its type) is a candidate; the candidate with the highest score is merged (ties: the leftmost),
   and the new symbol's pairs with its neighbours become candidates, until none is left.
3. A final symbol that is a token is emitted as that token; any other (an unmerged character) as one byte
   token per UTF-8 byte: "<0xXX>", else the token whose text is that byte, else llama.cpp throws.
4. BOS before and EOS after the whole text, when the vocab's flags ask for them (`encode` in tokenizer.py).

This is a bigram merge by token score, not SentencePiece's Unigram Viterbi, and `tokenizers`' BPE cannot
express it exactly: its merges are pairs with their own ranks, where llama.cpp ranks a pair by the score of
the token it makes, so two different pairs making the same token tie here and go leftmost. The engine is
therefore written out; it costs a dict lookup per candidate pair.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Final

from apr.errors import FormatError
from apr.formats.tokenizer_special import SPECIAL, Attr, SpecialToken, partition

SPACE: Final = "▁"  # U+2581, SentencePiece's visible space
_HEX: Final = "0123456789abcdefABCDEF"


class SpmModel:
    """llama.cpp's SPM tokenizer over one vocab (text ↔ ids, without BOS/EOS)."""

    def __init__(
        self,
        tokens: Sequence[str],
        scores: Sequence[float],
        attrs: Sequence[int],
        specials: Sequence[SpecialToken],
        add_space_prefix: bool,
    ) -> None:
        if scores and len(scores) < len(tokens):
            raise FormatError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
        self.tokens = tokens
        self.ids = {t: i for i, t in enumerate(tokens)}  # a repeated token keeps its last id, as llama.cpp
        self.scores = list(scores) or [0.0] * len(tokens)
        self.attrs = attrs
        self.specials = specials
        self.add_space_prefix = add_space_prefix
        hex_ids = (self.ids.get(f"<0x{b:02X}>") for b in range(256))
        self.byte_ids = [h if h is not None else self.ids.get(chr(b)) for b, h in enumerate(hex_ids)]

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        after_special = True  # the text's first piece gets the space prefix too
        for piece in partition(text, self.specials):
            if isinstance(piece, int):
                out.append(piece)
                after_special = True
                continue
            if self.add_space_prefix and after_special:
                piece = " " + piece
            self._merge(piece.replace(" ", SPACE), out)
            after_special = False
        return out

    def _merge(self, text: str, out: list[int]) -> None:
        sym = list(text)  # one symbol per character; "" once merged into its left neighbour
        nxt = [*range(1, len(sym)), -1]
        prev = list(range(-1, len(sym) - 1))
        heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, length of the pair)
        ids, scores = self.ids, self.scores

        def candidate(left: int, right: int) -> None:
            pair = sym[left] + sym[right]
            tid = ids.get(pair)
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right, len(pair)))

        for i in range(1, len(sym)):
            candidate(i - 1, i)
        while heap:
            _, left, right, n = heapq.heappop(heap)
            a, b = sym[left], sym[right]
            if not a or not b or len(a) + len(b) != n:  # a side has changed since: stale
                continue
            sym[left], sym[right] = a + b, ""
            nxt[left] = nxt[right]
            if nxt[left] >= 0:
                prev[nxt[left]] = left
                candidate(left, nxt[left])
            if prev[left] >= 0:
                candidate(prev[left], left)
        for s in sym:
            if s:
                tid = ids.get(s)
                out.extend([tid] if tid is not None else self._bytes(s))

    def _bytes(self, s: str) -> list[int]:
        ids = [self.byte_ids[b] for b in s.encode()]
        if None in ids:
            b = s.encode()[ids.index(None)]
            raise FormatError(f"the vocab has no token for {s!r}, nor the byte token <0x{b:02X}>")
        return ids  # type: ignore[return-value]

    def decode(self, ids: Sequence[int]) -> str:
        """llama.cpp's detokenize (special tokens rendered, no clean-up): the first piece loses one
        leading space when the vocab adds a space prefix."""
        parts = [self._piece(i) for i in ids]
        if parts and self.add_space_prefix and parts[0][:1] == b" ":
            parts[0] = parts[0][1:]
        return b"".join(parts).decode("utf-8", errors="replace")

    def _piece(self, tid: int) -> bytes:
        if not 0 <= tid < len(self.tokens):
            raise FormatError(f"token id {tid} is not in the vocab (size {len(self.tokens)})")
        attr, text = self.attrs[tid], self.tokens[tid]
        if attr & SPECIAL:
            return text.encode()
        if attr & Attr.NORMAL:
            return text.replace(SPACE, " ").encode()
        if attr & Attr.BYTE:  # "<0xXX>", read as llama.cpp's strtol does: the hex digits that lead
            digits = text[3:5]
            return bytes([int(digits[: len(digits) - len(digits.lstrip(_HEX))] or "0", 16)])
        return b""  # unused / undefined: llama.cpp prints nothing
