"""GGUF string arrays (vocabularies, merges): indexed when the header is parsed, decoded on first use."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np
import numpy.typing as npt

from apr.errors import FormatError


class StringArray(Sequence[str]):
    """A GGUF array of strings, indexed at parse time and decoded (all at once) on first access."""

    def __init__(self, blob: bytes, starts: npt.NDArray[np.int64], where: str, base: int) -> None:
        self._blob = blob  # the array's bytes, length prefixes included
        self._starts = starts  # start of each string in blob; each is preceded by its u64 length
        self._where = where
        self._base = base  # file offset of blob[0], for messages
        self._items: list[str] | None = None

    def __len__(self) -> int:
        return len(self._starts)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        return self.decoded()[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.decoded())

    def decoded(self) -> list[str]:
        if self._items is None:
            self._items = self._decode()
        return self._items

    def _decode(self) -> list[str]:
        blob, starts = self._blob, self._starts.tolist()
        ends = [s - 8 for s in starts[1:]] + [len(blob)]
        try:
            return [blob[s:e].decode("utf-8") for s, e in zip(starts, ends, strict=True)]
        except UnicodeDecodeError:
            bad = next(
                i for i, (s, e) in enumerate(zip(starts, ends, strict=True)) if not _is_utf8(blob[s:e])
            )
            at = self._base + starts[bad]
            raise FormatError(f"{self._where}[{bad}] at offset {at}: invalid UTF-8") from None


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
