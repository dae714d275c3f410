"""GGUF checkpoints: `open_gguf` parses metadata and the tensor index (gguf_parse.py) and reads
tensors on demand.

Opening reads no tensor data (~25 ms for SmolLM2 with its 49k-token vocab). Tensor bytes are
never mapped for the life of the checkpoint: `read` preads one tensor into a private buffer and
dequantizes it, `read_rows` maps just that tensor, copies the wanted rows and unmaps, and `raw`
returns a per-tensor `np.memmap` that is unmapped when the caller drops it. A trace over a 4 GB file
therefore keeps only the tensors in use resident, never the whole file.

Tensor names are GGUF's own (also apr's canonical spelling); shapes are numpy row-major,
i.e. GGUF's `ne` reversed (token_embd ne=[576, 49152] → (49152, 576)). LLaMA GGUFs keep attn_q and
attn_k rows in llama.cpp's per-head interleaved order (convert_hf_to_gguf permutes them for
adjacent-pair RoPE); the family's config records that (`qk_layout`), and the reader never permutes data.
"""

from __future__ import annotations

import difflib
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final

import numpy as np
import numpy.typing as npt

from apr.errors import AprIOError, NotFoundError, UnsupportedQuantError, ValidationError
from apr.formats.base import ConfigSource, F32Array, Format, TensorInfo, TokenizerSpec
from apr.formats.files import regular
from apr.formats.gguf_meta import GGUFSource, Metadata, tokenizer_spec
from apr.formats.gguf_parse import HEADER_SIZE, MAGIC, Header, located, parse_header
from apr.formats.tensorio import check_extent, read_exact
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


def _read_header(file: BinaryIO, source: str) -> Header:
    size = os.fstat(file.fileno()).st_size
    if size < HEADER_SIZE:
        return parse_header(file.read(), size, source)
    with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return parse_header(mm, size, source)


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
            close = difflib.get_close_matches(name, self._by_name, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise NotFoundError(f"{self.path}: no tensor named '{name}'{hint}") from None

    def read(self, name: str) -> F32Array:
        info = self.info(name)
        return self._dequantize(info, self._pread(info), info.shape)

    def read_rows(self, name: str, rows: npt.NDArray[np.int64] | slice) -> F32Array:
        info = self.info(name)
        if len(info.shape) < 2:
            raise ValidationError(
                f"{self.path}: read_rows needs a tensor of 2 or more dims; '{name}' has shape {info.shape}"
            )
        picked = self._rows(info, rows)
        return self._dequantize(info, picked.reshape(-1), (len(picked), *info.shape[1:]))

    def raw(self, name: str) -> npt.NDArray[np.uint8]:
        info = self.info(name)
        if info.nbytes == 0:
            return np.empty(0, np.uint8)
        return np.memmap(self._mappable(info), np.uint8, "r", offset=info.offset, shape=(info.nbytes,))

    def tokenizer_spec(self) -> TokenizerSpec | None:
        with located(str(self.path)):
            return tokenizer_spec(self.meta)

    def close(self) -> None:
        self._file.close()

    # -- reading ----------------------------------------------------------------------------------

    def _open_file(self) -> BinaryIO:
        if self._file.closed:
            raise AprIOError(f"{self.path}: the checkpoint is closed")
        return self._file

    def _mappable(self, info: TensorInfo) -> BinaryIO:
        file = self._open_file()
        check_extent(os.fstat(file.fileno()).st_size, info, str(self.path))
        return file

    def _pread(self, info: TensorInfo) -> npt.NDArray[np.uint8]:
        return read_exact(self._open_file().fileno(), info, str(self.path))

    def _rows(self, info: TensorInfo, rows: npt.NDArray[np.int64] | slice) -> npt.NDArray[np.uint8]:
        n_rows = info.shape[0]
        index = _row_index(rows, n_rows, f"{self.path}: tensor '{info.name}'")
        if info.nbytes == 0:  # no rows, or empty ones: nothing to map
            return np.empty((n_rows, 0), np.uint8)[index]
        shape = (n_rows, info.nbytes // n_rows)
        mapped = np.memmap(self._mappable(info), np.uint8, "r", offset=info.offset, shape=shape)
        picked = np.array(mapped[index])  # a copy: the mapping dies with `mapped`, right here
        del mapped
        return picked

    def _dequantize(self, info: TensorInfo, raw: npt.NDArray[np.uint8], shape: tuple[int, ...]) -> F32Array:
        message = f"{self.path}: tensor '{info.name}' has type {info.qtype.name}, which apr cannot dequantize"
        if info.qtype not in DEQUANT_TYPES:
            raise UnsupportedQuantError(message)
        try:
            return dequantize(raw, info.qtype, shape)
        except UnsupportedQuantError:
            raise UnsupportedQuantError(message) from None


def _row_index(rows: npt.NDArray[np.int64] | slice, n_rows: int, what: str) -> npt.NDArray[np.int64] | slice:
    if isinstance(rows, slice):
        return rows
    index = np.asarray(rows)
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise ValidationError(
            f"{what}: rows must be a slice or a 1-D integer array, got {index.dtype}{list(index.shape)}"
        )
    bad = index[(index < -n_rows) | (index >= n_rows)]
    if bad.size:
        raise ValidationError(f"{what}: row {int(bad[0])} is out of range for {n_rows} rows")
    return index.astype(np.int64, copy=False)


FORMAT: Final = Format("gguf", (".gguf",), sniff, open_gguf)
