"""`.apr` v2 model files (aprender's container, spec §7) as a Checkpoint.

Opening reads the 64-byte header, the JSON metadata and the tensor index, checks all of them strictly
(formats/aprcodec.py has the byte layout and every rule), and exposes the metadata as a ConfigSource for
the family registry; no tensor data is touched. The footer CRC covers every byte of the file, so checking
it means reading all of it: open does not (for a 7B file that is gigabytes of I/O before the first layer
is traced, and aprender itself never checks it); `check_footer()` / `verify()` do, and
`open_apr(path, verify=True)` does both. A trace checks it on the read its sha256 fingerprint makes anyway
(apr.trace.fingerprint, beside the forward pass), `apr convert` / `apr export` before converting.

Tensors appear under their stored names (aprender stores HF names for Qwen2 imports and GGUF names for
LLaMA imports; the family maps either spelling to its roles). Every read (`read`, `read_rows`, `raw`,
`raw_range`) preads just the bytes it needs into a private buffer from the descriptor held open until
`close` (formats/tensorio.py: a file truncated during a run is then a clean error, not SIGBUS), so a trace
of a 7B file keeps only the row block in use resident. Every dtype is decoded by
`apr.quant.dequantize`; this module only strips the padding of K-quant rows that are not a whole
number of super-blocks (GH-202).

Q/K row layout follows the file's `rope_type` (read by the family, apr.models): 0 (NORM) = llama.cpp-
interleaved rows, which is what aprender writes for a LLaMA GGUF (it keeps the GGUF rows as stored);
2 (NEOX) = HF rows, as for Qwen2 (whose GGUF rows are not permuted). Without `rope_type`, aprender's
`infer_rope_type(architecture)` decides, as in realizar.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from apr.errors import AprIOError, FormatError, NotFoundError, ValidationError
from apr.formats.aprcodec import (
    LEGACY_MAGICS,
    MAGIC,
    PACKING,
    AprHeader,
    read_container,
)
from apr.formats.aprfooter import FooterCheck, check_footer
from apr.formats.aprmeta import (
    AprSource,
    decode_metadata,
    summary,
    tokenizer_from_metadata,
)
from apr.formats.base import ConfigSource, F32Array, Format, TensorInfo, TokenizerSpec
from apr.formats.tensorio import TensorFile, U8Array, read_exact, read_range, read_rows, row_index
from apr.quant import dequantize
from apr.quant.types import QuantType


def decode(raw: U8Array, qtype: QuantType, shape: tuple[int, ...]) -> F32Array:
    """Stored bytes of an .apr tensor → float32 of `shape`; K-quant rows drop their padding."""
    if math.prod(shape) == 0:
        return np.zeros(shape, np.float32)  # aprender writes empty APR_Q8 as 0 bytes, not 4
    packing = PACKING[qtype]
    cols = shape[-1] if shape else 1
    padded = packing.row_bytes(cols) // packing.block_bytes * packing.block
    if not packing.per_row or padded == cols:
        return dequantize(raw, qtype, shape)
    out = dequantize(raw, qtype, (*shape[:-1], padded))
    return np.ascontiguousarray(out[..., :cols]).reshape(shape)


class AprCheckpoint:
    """An opened .apr file: cheap to open; tensor bytes are touched only by `raw`/`read`/`read_rows`."""

    format_name = "apr"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._footer: FooterCheck | None = None
        where = str(path)
        self._file = TensorFile(path)  # held open until close(): see formats/tensorio.py
        try:
            self._open(where)
        except BaseException:
            self._file.close()
            raise

    def _open(self, where: str) -> None:
        try:
            with os.fdopen(os.dup(self._file.fileno()), "rb") as f:
                self.file_size = os.fstat(f.fileno()).st_size
                self.header: AprHeader
                self.header, raw_meta, entries = read_container(f, self.file_size, where)
        except OSError as e:
            raise AprIOError(f"cannot read {self.path}: {e.strerror or e}") from None
        self.full_metadata, self.warnings = decode_metadata(raw_meta, where)
        self.metadata: dict[str, Any] = summary(self.full_metadata)
        self._infos: dict[str, TensorInfo] = {}
        for entry in entries:
            name = entry.name
            if name in self._infos:
                raise FormatError(f"{where}: two tensors are named '{name}'")
            offset = self.header.data_offset + entry.offset
            self._infos[name] = TensorInfo(name, entry.qtype, entry.shape, offset, entry.size)
        self.source: ConfigSource = AprSource(self.full_metadata, where)

    def tensors(self) -> Sequence[TensorInfo]:
        return tuple(self._infos.values())

    def __enter__(self) -> AprCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self, name: str) -> TensorInfo:
        """By stored name."""
        info = self._infos.get(name)
        if info is None:
            import difflib  # only for this message

            close = difflib.get_close_matches(name, self._infos, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise NotFoundError(f"{self.path}: no tensor named '{name}'{hint}")
        return info

    def raw(self, name: str) -> U8Array:
        """The stored bytes (a private copy, read with pread)."""
        return read_exact(*self._at(name), str(self.path))

    def raw_range(self, name: str, start: int, stop: int) -> U8Array:
        """Bytes [start, stop) of the stored bytes (a private copy; nothing else is read)."""
        return read_range(*self._at(name), start, stop, str(self.path))

    def read(self, name: str) -> F32Array:
        """The whole tensor as a private float32 array."""
        fd, info = self._at(name)
        return decode(read_exact(fd, info, str(self.path)), info.qtype, info.shape)

    def read_rows(self, name: str, rows: npt.NDArray[np.int64] | slice) -> F32Array:
        """Rows of a 2-D tensor, reading only the selected rows' bytes (and the type's prefix)."""
        fd, info = self._at(name)
        if len(info.shape) != 2:
            raise ValidationError(
                f"{self.path}: read_rows needs a 2-D tensor; '{name}' has shape {info.shape}"
            )
        n_rows, cols = info.shape
        idx = row_index(rows, n_rows, f"{self.path}: tensor '{name}'")
        packing = PACKING[info.qtype]
        if len(idx) == 0 or not packing.rows_addressable(cols):
            return self.read(name)[rows]
        row_bytes = packing.row_bytes(cols)
        picked = read_rows(fd, info, packing.prefix, row_bytes, idx, str(self.path))
        blob = np.concatenate([self.raw_range(name, 0, packing.prefix), picked.reshape(-1)])
        padded = row_bytes // packing.block_bytes * packing.block
        return np.ascontiguousarray(decode(blob, info.qtype, (len(idx), padded))[:, :cols])

    def _at(self, name: str) -> tuple[int, TensorInfo]:
        fd = self._file.fileno()  # first: a closed checkpoint says so, whatever the name
        return fd, self.info(name)

    def tokenizer_spec(self) -> TokenizerSpec | None:
        return tokenizer_from_metadata(self.full_metadata, str(self.path))

    def check_footer(self) -> FooterCheck:
        """Stored vs computed footer CRC32: reads the whole file on the first call, and remembers the
        result for this opened file (`apr inspect --verify` reports it, then exits on it)."""
        if self._footer is None:
            try:
                with os.fdopen(os.dup(self._file.fileno()), "rb") as f:
                    self._footer = check_footer(f, self.file_size)
            except OSError as e:
                raise AprIOError(f"cannot read {self.path}: {e.strerror or e}") from None
        return self._footer

    def verify(self) -> None:
        """Raise FormatError unless the footer CRC32 matches every byte before it."""
        if not (check := self.check_footer()).ok:
            raise check.error(str(self.path))

    def close(self) -> None:
        self._file.close()


def verify_checkpoint(ckpt: object) -> None:
    """Raise FormatError when `ckpt` is an .apr file whose footer CRC fails (its remembered check: no second
    read after `check_footer`); other formats keep no whole-file checksum, and pass."""
    if isinstance(ckpt, AprCheckpoint):
        ckpt.verify()


def sniff(head: bytes, path: Path) -> bool:
    return head[:4] == MAGIC or head[:4] in LEGACY_MAGICS  # legacy ones fail in open, with a hint


def open_apr(path: Path, *, verify: bool = False) -> AprCheckpoint:
    """Open an .apr v2 file; with `verify`, also check the footer CRC (reads the whole file).

    >>> ckpt = open_apr(Path("qwen2-0.5b.apr"))   # doctest: +SKIP
    >>> ckpt.source.architecture, ckpt.read_rows("model.embed_tokens.weight", np.array([9707])).shape
    ('qwen2', (1, 896))
    """
    ckpt = AprCheckpoint(path)
    if verify:
        ckpt.verify()
    return ckpt


FORMAT = Format(
    "apr",
    (".apr",),
    sniff,
    open_apr,
    notes=(
        "the footer CRC is checked by verify()/check_footer() and by a trace's fingerprint, not when opening",
    ),
)
