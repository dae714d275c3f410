"""GGUF checkpoints: `open_gguf` parses metadata and the tensor index (gguf_parse.py) and reads
tensors on demand.

Opening reads no tensor data (~25 ms for SmolLM2 with its 49k-token vocab); the header is parsed from a
prefix of the file read into memory (grown while the parse asks for more). Nothing is ever mapped:
`read` preads one tensor into a private buffer and dequantizes it, `read_rows` preads just the wanted rows,
`raw_range` a byte range (the engine's row blocks) and `raw` a tensor's stored bytes, all from the
descriptor held open until `close` (formats/tensorio.py: why a file truncated during a run is then a clean
error, not SIGBUS). A trace over a 4 GB file therefore keeps only the row block in use resident.

Tensor names are GGUF's own (also apr's canonical spelling); shapes are numpy row-major,
i.e. GGUF's `ne` reversed (token_embd ne=[576, 49152] → (49152, 576)). LLaMA GGUFs keep attn_q and
attn_k rows in llama.cpp's per-head interleaved order (convert_hf_to_gguf permutes them for
adjacent-pair RoPE); the family's config records that (`qk_layout`), and the reader never permutes data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final

import numpy as np
import numpy.typing as npt

from apr.errors import AprIOError, FormatError, NotFoundError, UnsupportedQuantError, ValidationError
from apr.formats.base import ConfigSource, F32Array, Format, TensorInfo, TokenizerSpec
from apr.formats.files import regular
from apr.formats.gguf_meta import GGUFSource, Metadata, tokenizer_spec
from apr.formats.gguf_parse import MAGIC, Header, NeedMoreBytes, located, parse_header
from apr.formats.tensorio import U8Array, read_exact, read_range, read_rows, row_index
from apr.quant import DEQUANT_TYPES, dequantize


def sniff(head: bytes, path: Path) -> bool:
    return head[:4] == MAGIC


def open_gguf(path: Path | str) -> GGUFCheckpoint:
    """Open a GGUF file: parse metadata + tensor index; no tensor data is read.

    >>> ckpt = open_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"))  # doctest: +SKIP
    >>> ckpt.info("token_embd.weight").shape  # doctest: +SKIP
    (49152, 576)
    """
    path = Path(path)
    regular(path)  # a FIFO would block open(), a device would be mapped whole
    try:
        file = path.open("rb")
    except FileNotFoundError:
        raise NotFoundError(f"File not found: {path}") from None
    except OSError as e:
        raise AprIOError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        header = _read_header(file, str(path))  # its errors name the file already
        with located(str(path)):
            return GGUFCheckpoint(path, header, file)
    except BaseException:
        file.close()
        raise


HEADER_FIRST_READ: Final = 4 << 20  # SmolLM2's header (49k tokens, 48k merges) is 1.6 MB


def _read_header(file: BinaryIO, source: str) -> Header:
    """The header, parsed from a prefix of the file read into memory (4 MiB, then as much as the parse asks
    for, at most the file): never mapped, so a file truncated while it is opened is an error, not SIGBUS."""
    fd = file.fileno()
    size = os.fstat(fd).st_size
    n = min(size, HEADER_FIRST_READ)
    while True:
        buf = os.pread(fd, n, 0)
        if len(buf) < n:
            raise FormatError(f"{source}: {len(buf)} bytes, {n} expected (truncated while apr opened it?)")
        try:
            return parse_header(buf, size, source)
        except NeedMoreBytes as more:
            if n >= size:  # cannot happen: every read is checked against the file's size first
                raise FormatError(f"{source}: the header needs {more.needed} bytes of {size}") from None
            n = min(size, max(more.needed, 4 * n))


# ---- the checkpoint -----------------------------------------------------------------------------


class GGUFCheckpoint:
    """An open GGUF file (see the module docstring for how tensor bytes are read)."""

    format_name: str = "gguf"

    def __init__(self, path: Path, header: Header, file: BinaryIO) -> None:
        self.path = path
        self.version = header.version
        self.alignment = header.alignment
        self.fields = header.fields  # every KV pair, parsed (big string arrays decode on first use)
        self.meta = Metadata(header.fields)
        self._file = file
        self._tensors = header.tensors
        self._by_name = {t.name: t for t in header.tensors}
        self.source: ConfigSource = GGUFSource(self.meta)
        self.metadata: dict[str, Any] = {
            "GGUF.version": header.version,
            "GGUF.tensor_count": len(header.tensors),
            "GGUF.kv_count": len(header.fields),
            **self.meta.summary(),
        }

    def __enter__(self) -> GGUFCheckpoint:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def tensors(self) -> Sequence[TensorInfo]:
        return self._tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            import difflib  # only for this message

            close = difflib.get_close_matches(name, self._by_name, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise NotFoundError(f"{self.path}: no tensor named '{name}'{hint}") from None

    def read(self, name: str) -> F32Array:
        info = self.info(name)
        return self._dequantize(info, read_exact(self._fd(), info, str(self.path)), info.shape)

    def read_rows(self, name: str, rows: npt.NDArray[np.int64] | slice) -> F32Array:
        info = self.info(name)
        if len(info.shape) < 2:
            raise ValidationError(
                f"{self.path}: read_rows needs a tensor of 2 or more dims; '{name}' has shape {info.shape}"
            )
        n_rows = info.shape[0]
        index = row_index(rows, n_rows, f"{self.path}: tensor '{info.name}'")
        picked = read_rows(self._fd(), info, 0, info.nbytes // n_rows if n_rows else 0, index, str(self.path))
        return self._dequantize(info, picked.reshape(-1), (len(picked), *info.shape[1:]))

    def raw(self, name: str) -> U8Array:
        """The tensor's stored bytes (a private copy)."""
        return read_exact(self._fd(), self.info(name), str(self.path))

    def raw_range(self, name: str, start: int, stop: int) -> U8Array:
        """Bytes [start, stop) of the tensor's stored bytes (a private copy; nothing else is read)."""
        return read_range(self._fd(), self.info(name), start, stop, str(self.path))

    def tokenizer_spec(self) -> TokenizerSpec | None:
        with located(str(self.path)):
            return tokenizer_spec(self.meta)

    def close(self) -> None:
        self._file.close()

    # -- reading ----------------------------------------------------------------------------------

    def _fd(self) -> int:
        if self._file.closed:
            raise AprIOError(f"{self.path}: the checkpoint is closed")
        return self._file.fileno()

    def _dequantize(self, info: TensorInfo, raw: U8Array, shape: tuple[int, ...]) -> F32Array:
        message = f"{self.path}: tensor '{info.name}' has type {info.qtype.name}, which apr cannot dequantize"
        if info.qtype not in DEQUANT_TYPES:
            raise UnsupportedQuantError(message)
        try:
            return dequantize(raw, info.qtype, shape)
        except UnsupportedQuantError:
            raise UnsupportedQuantError(message) from None


FORMAT: Final = Format("gguf", (".gguf",), sniff, open_gguf)
