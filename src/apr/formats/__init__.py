"""Checkpoint formats, registered in one tuple; `open_checkpoint` sniffs magic bytes, then the suffix.

A new format is one module exporting `FORMAT: Format` plus one line in `_FORMAT_MODULES`. Modules are imported
on first use so that `apr --help` does not pay for every reader.
"""

from __future__ import annotations

import importlib
import stat
from functools import cache
from pathlib import Path
from typing import Final

from apr.errors import AprIOError, FormatError, NotFoundError
from apr.formats.base import Checkpoint, Format
from apr.formats.files import regular

_FORMAT_MODULES: Final = ("apr.formats.gguf", "apr.formats.safetensors", "apr.formats.apr")
SNIFF_BYTES: Final = 16


@cache
def _format(module: str) -> Format:
    fmt: Format = importlib.import_module(module).FORMAT
    return fmt


@cache
def formats() -> tuple[Format, ...]:
    return tuple(map(_format, _FORMAT_MODULES))


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(SNIFF_BYTES)
    except OSError as e:
        raise AprIOError(f"cannot read {path}: {e.strerror or e}") from None


def detect_format(path: Path) -> Format:
    """The format of `path` (a file, or a directory for HF safetensors folders)."""
    if not path.exists() and not path.is_symlink():
        raise NotFoundError(f"File not found: {path}")
    st = regular(path, allow_dir=True)  # a FIFO, device or socket is refused before it is opened
    head = b"" if stat.S_ISDIR(st.st_mode) else _head(path)
    for fmt in map(_format, _FORMAT_MODULES):  # each reader imported only when reached: a GGUF loads one
        if fmt.sniff(head, path):
            return fmt
    for fmt in formats():
        if path.suffix.lower() in fmt.suffixes:
            return fmt
    known = ", ".join(s for f in formats() for s in f.suffixes)
    raise FormatError(f"{path}: not a model file this tool can read (known formats: {known})")


def open_checkpoint(path: Path | str) -> Checkpoint:
    """Open a model file or HF folder lazily: metadata and tensor index only, no tensor data.

    >>> ckpt = open_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")   # doctest: +SKIP
    >>> ckpt.format_name, ckpt.source.get("llama.block_count")  # doctest: +SKIP
    ('gguf', 30)
    >>> ckpt.read("output_norm.weight").shape  # doctest: +SKIP
    (576,)

    (The config a family reads from it, `n_layers` and the rest: `apr.models.open_model(path).config`.)
    """
    path = Path(path)
    return detect_format(path).open(path)
