"""Rust panics in third-party extensions (`tokenizers`, `safetensors` via transformers): pyo3's
PanicException derives from BaseException, and Rust's panic hook writes its text straight to fd 2 before
Python sees the exception. `HeldStderr` holds fd 2 back for a block so a caught panic costs the user one
`error:` line, not a Rust backtrace banner; `is_panic` tells a panic from other BaseExceptions."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import IO, ClassVar


def is_panic(e: BaseException) -> bool:
    return type(e).__name__ == "PanicException"


class HeldStderr:
    """fd 2 redirected to a temporary file for the block; what was written there and not `take`n is
    copied to the real fd 2 at the end."""

    _sink: ClassVar[IO[bytes] | None] = None

    def __enter__(self) -> HeldStderr:
        self.saved = -1
        try:
            if HeldStderr._sink is None:
                HeldStderr._sink = tempfile.TemporaryFile()  # kept open for the process
            sys.stderr.flush()
            self.saved = os.dup(2)
            os.dup2(HeldStderr._sink.fileno(), 2)
        except (OSError, ValueError):  # no fd 2 (or a closed sys.stderr): nothing to hold back
            self._restore()
        return self

    def take(self) -> str:
        sink = HeldStderr._sink
        if self.saved < 0 or sink is None:
            return ""
        sink.seek(0)
        text = sink.read()
        sink.seek(0)
        sink.truncate()
        return text.decode(errors="replace").strip()

    def __exit__(self, *exc: object) -> None:
        text = self.take()
        self._restore()
        if text:
            os.write(2, text.encode() + b"\n")

    def _restore(self) -> None:
        if self.saved >= 0:
            os.dup2(self.saved, 2)
            os.close(self.saved)
            self.saved = -1
