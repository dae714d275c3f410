r"""RWKV "world" vocabs (tokenizer.ggml.model "rwkv"): llama.cpp's `llm_tokenizer_rwkv`, written out.

Mirrors llama-vocab.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors. Each token's text is
unescaped into bytes (`llama_unescape_rwkv_token`: `\t`, `\n`, `\r`, `\xhh` with lowercase hex digits,
a backslash before any other character stands for that character; the converter writes
`repr(bytes)[2:-1]`), and the text of each fragment between special tokens is cut greedily into the
longest token its bytes start with (llama.cpp's trie; a repeated token keeps its last id). A byte no
token starts with is the unknown token. Nothing is added around the ids (no BOS / EOS), and
token_to_piece is each token's unescaped bytes, special tokens included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from apr.errors import FormatError
from apr.formats.tokenizer_special import SpecialToken, encode_parts

PREFIX_CAP: Final = 24  # the token prefixes kept, in bytes (memory stays linear in the vocab's size)


def unescape(escaped: str) -> bytes:
    """llama_unescape_rwkv_token, byte for byte (on the UTF-8 of the token text)."""
    out = bytearray()
    escaping, hex_left, acc = False, 0, 0
    for c in escaped.encode():
        if hex_left:
            acc = ((acc << 4) + (c - 87 if c >= 97 else c - 48)) & 0xFF  # 'a' - 10, '0'; uint8_t arithmetic
            hex_left -= 1
            if not hex_left:
                out.append(acc)
                acc = 0
        elif escaping:
            if c == 0x78:  # x
                hex_left = 2
            else:
                out.append({0x74: 9, 0x6E: 10, 0x72: 13}.get(c, c))  # t n r
            escaping = False
        elif c == 0x5C:  # backslash
            escaping = True
        else:
            out.append(c)
    return bytes(out)


class RwkvModel:
    """Greedy longest-match over the unescaped token bytes."""

    def __init__(self, tokens: Sequence[str], specials: Sequence[SpecialToken], unk_id: int | None) -> None:
        self.ids: dict[bytes, int] = {}
        self.prefixes: set[bytes] = set()
        for i, t in enumerate(tokens):
            b = unescape(t)
            if b:
                self.ids[b] = i
                self.prefixes.update(b[:k] for k in range(1, min(len(b), PREFIX_CAP) + 1))
        self.longest = max(map(len, self.ids), default=0)
        self.pieces = [unescape(t) for t in tokens]
        self.specials, self.unk_id = specials, unk_id

    def encode(self, text: str) -> list[int]:
        return encode_parts(text, self.specials, lambda p: self._bytes(p.encode()))

    def _bytes(self, data: bytes) -> list[int]:
        ids, prefixes, out = self.ids, self.prefixes, []
        pos, n = 0, len(data)
        while pos < n:
            if data[pos : pos + 1] not in prefixes:  # no token starts with this byte
                if self.unk_id is None:  # llama.cpp emits -1 (its unknown token, not set)
                    raise FormatError(
                        f"the RWKV vocab has no token for byte 0x{data[pos]:02X} and no unknown token"
                    )
                out.append(self.unk_id)
                pos += 1
                continue
            best, best_end, end = -1, pos, pos + 1
            last = min(n, pos + self.longest)
            while end <= last:  # past PREFIX_CAP: every length up to the longest token
                piece = data[pos:end]
                if end - pos <= PREFIX_CAP and piece not in prefixes:
                    break
                if (tid := ids.get(piece)) is not None:
                    best, best_end = tid, end
                end += 1
            if best < 0:  # llama.cpp emits token 0 and starts over at byte 0: it never returns
                raise FormatError(
                    "llama.cpp cannot tokenize this text with this RWKV vocab (it loops forever)"
                )
            out.append(best)
            pos = best_end
        return out

    def decode(self, ids: Sequence[int]) -> str:
        pieces = self.pieces
        return b"".join(pieces[i] for i in ids if 0 <= i < len(pieces)).decode(errors="replace")
