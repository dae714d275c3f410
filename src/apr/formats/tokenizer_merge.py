"""llama.cpp's BPE merge loop, written out: `llm_tokenizer_bpe_session::tokenize` on pre-split words.

Used for the BPE vocabs whose pre-tokenizer runs on raw UTF-8 (`byte_encode = false` in llama-vocab.cpp:
tokenizer.ggml.pre gemma4, granite-embed-multi-311m, sarvam-moe, whitespace; tokenizer.ggml.model
gemma4), where `tokenizers`' BPE cannot say what llama.cpp does: a symbol that is not a token (a
character, or a merge result) is emitted as the `<0xXX>` tokens of its UTF-8 bytes, each dropped when the
vocab lacks it, and it still merges with its neighbours before that.

Per word: one symbol per character; every adjacent pair whose "left right" is a merge goes on a priority
queue ordered by (merge rank, left position); the best is merged if both sides are still what they were,
and the new pairs on either side are queued. The merge ranks are a dict keyed by the merge string as
stored ("a b" → its first rank), so building costs one dict: llama.cpp looks up only symbols without a
space (it asserts so, and aborts), and those join with the merge's one space as llama.cpp splits it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Final

from apr.errors import FormatError

CACHE_WORDS: Final = 1 << 16  # words whose ids are kept (the same word gives the same ids)


class MergeBpe:
    """Words → ids by llama.cpp's BPE merges over `vocab` (token → id)."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[str],
        fallback: Callable[[str], list[int]],
        ignore_merges: bool = False,
        whole: Callable[[str], bool] | None = None,
    ) -> None:
        """`fallback(symbol)`: the ids of a final symbol that is not a token; `whole(word)`: the word is
        one symbol from the start (llama.cpp's Gemma 4 rule for newline runs)."""
        self.vocab = vocab
        n = len(merges)
        self.ranks = dict(zip(reversed(merges), range(n - 1, -1, -1), strict=True))  # first rank kept
        self.fallback = fallback
        self.ignore_merges = ignore_merges
        self.whole = whole
        self.cache: dict[str, list[int]] = {}

    def encode_words(self, words: Sequence[str]) -> list[int]:
        out: list[int] = []
        cache = self.cache
        for word in words:
            ids = cache.get(word)
            if ids is None:
                ids = self._word(word)
                if len(cache) >= CACHE_WORDS:
                    cache.clear()
                cache[word] = ids
            out += ids
        return out

    def _rank(self, left: str, right: str) -> int | None:
        if " " in left or " " in right:  # llama_vocab::find_bpe_rank: GGML_ASSERT, the process aborts
            raise FormatError(
                f"llama.cpp cannot tokenize this text: its BPE merge lookup of {left!r} + "
                f"{right!r} aborts on a space (a run of whitespace with a space in it)"
            )
        return self.ranks.get(f"{left} {right}")

    def _word(self, word: str) -> list[int]:
        vocab = self.vocab
        if not word:
            return []
        if self.ignore_merges and word in vocab:
            return [vocab[word]]
        if self.whole is not None and self.whole(word) and word in vocab:
            return [vocab[word]]
        syms = list(word)
        n = len(syms)
        nxt = [*range(1, n), -1]
        prv = list(range(-1, n - 1))
        queue: list[tuple[int, int, int, str]] = []
        rank_of = self._rank
        for i in range(n - 1):
            r = rank_of(syms[i], syms[i + 1])
            if r is not None:
                queue.append((r, i, i + 1, syms[i] + syms[i + 1]))
        heapq.heapify(queue)
        while queue:
            _, left, right, text = heapq.heappop(queue)
            a, b = syms[left], syms[right]
            if not a or not b or a + b != text:
                continue  # outdated
            syms[left], syms[right] = text, ""
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prv[after] = left
            before = prv[left]
            if before >= 0 and (r := rank_of(syms[before], text)) is not None:
                heapq.heappush(queue, (r, before, left, syms[before] + text))
            if after >= 0 and (r := rank_of(text, syms[after])) is not None:
                heapq.heappush(queue, (r, left, after, text + syms[after]))
        out: list[int] = []
        for s in syms:
            if s:
                tid = vocab.get(s)
                if tid is None:
                    out += self.fallback(s)
                else:
                    out.append(tid)
        return out


def byte_token_fallback(vocab: dict[str, int]) -> Callable[[str], list[int]]:
    """Raw-UTF-8 BPE: a symbol that is not a token → the `<0xXX>` token of each of its bytes present."""
    byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)]

    def fallback(symbol: str) -> list[int]:
        return [i for i in (byte_ids[b] for b in symbol.encode()) if i is not None]

    return fallback
