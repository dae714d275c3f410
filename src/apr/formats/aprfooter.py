"""The .apr v2 footer: a CRC32 (zlib's) of every byte of the file before its last 4, stored in those 4
(spec/aprender.md §7). Checking it means reading the whole file: `check_footer` reads it; `FooterCrc` takes
the bytes of a read made anyway (the trace's sha256 fingerprint, apr.trace.fingerprint) in chunks."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import BinaryIO

from apr.errors import FormatError
from apr.formats.aprcodec import FOOTER_SIZE


@dataclass(frozen=True, slots=True)
class FooterCheck:
    stored: int
    computed: int
    covered: int  # bytes the computed CRC covers: [0, covered), the whole file but its footer

    @property
    def ok(self) -> bool:
        return self.stored == self.computed

    def error(self, where: str) -> FormatError:
        """The one message of a failed check (`apr inspect --verify`, a trace, a conversion)."""
        return FormatError(
            f"{where}: footer checksum mismatch: stored 0x{self.stored:08x}, computed 0x{self.computed:08x} "
            f"over bytes [0, {self.covered}) (the file is corrupt)"
        )


class FooterCrc:
    """The footer check over a file's bytes fed in order, in chunks of any size: the CRC32 of all but the
    last 4 bytes against those 4. `check_footer` reads with it; the trace's fingerprint feeds it the chunks
    its sha256 reads (apr.trace.fingerprint), so a trace checks an .apr file without a second read."""

    def __init__(self) -> None:
        self._crc, self._covered, self._tail = 0, 0, b""

    def update(self, chunk: bytes) -> None:
        if len(chunk) >= FOOTER_SIZE:  # no copy of the chunk: the held-back tail, then all but its own
            body = memoryview(chunk)[:-FOOTER_SIZE]
            self._crc = zlib.crc32(body, zlib.crc32(self._tail, self._crc))
            self._covered += len(self._tail) + len(body)
            self._tail = bytes(chunk[-FOOTER_SIZE:])
            return
        data = self._tail + chunk
        cut = max(len(data) - FOOTER_SIZE, 0)
        self._crc, self._covered, self._tail = (
            zlib.crc32(data[:cut], self._crc),
            self._covered + cut,
            data[cut:],
        )

    def result(self) -> FooterCheck:
        stored = int.from_bytes(self._tail.rjust(FOOTER_SIZE, b"\0"), "little")
        return FooterCheck(stored, self._crc, self._covered)


def check_footer(f: BinaryIO, file_size: int, chunk: int = 1 << 22) -> FooterCheck:
    """CRC32 of bytes [0, file_size − 4) against the stored footer; reads the whole file once."""
    f.seek(0)
    crc, left = FooterCrc(), file_size
    while left > 0 and (block := f.read(min(chunk, left))):
        crc.update(block)
        left -= len(block)
    return crc.result()
