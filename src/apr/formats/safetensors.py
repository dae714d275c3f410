"""Hugging Face model folders: config.json + model.safetensors (or a sharded index) + tokenizer.json.

safetensors layout: u64 LE header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin,
end]}, "__metadata__": {...}}, then the data area; offsets are relative to byte 8 + N. We parse the header
ourselves (strictly: every offset, size and dtype is checked before use) and pread tensor bytes per read
from each shard's descriptor, held open until `close` (formats/tensorio.py: a shard truncated during a run
is a clean error, not SIGBUS), because the `safetensors` package's numpy path cannot return BF16 and
exposes no byte offsets; apr never calls into that package, so no Rust panic of it can reach the user. Tests
check every tensor against the `safetensors` package. Names stay HF's; the family maps them to roles.

Which weight files a folder is: the ones transformers would load, or an error. transformers takes
model.safetensors when it exists and the index only otherwise, and never loads unindexed shards (it falls back
to pytorch_model.bin). A folder where that choice and the index disagree (a stale model.safetensors beside a
sharded index, or unindexed shards beside pytorch_model.bin) is refused, so that `apr trace DIR` and
`apr trace DIR --engine transformers` can never trace different weights. A folder that looks like an HF
folder (weights or tokenizer files) but lacks config.json is this format's, and says what is missing.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.errors import FormatError, ModelLoadError
from apr.formats.base import ConfigSource, F32Array, Format, TensorInfo, TokenizerSpec
from apr.formats.files import confined, printable, shown
from apr.formats.jsonio import check, int_list, load_object, parse_json, type_name, want
from apr.formats.tensorio import TensorFile, read_exact, read_range, read_rows, row_index
from apr.quant import dequantize
from apr.quant.types import QuantType

CONFIG_JSON: Final = "config.json"
TOKENIZER_JSON: Final = "tokenizer.json"
SINGLE_FILE: Final = "model.safetensors"
INDEX_FILE: Final = "model.safetensors.index.json"
SHARD_GLOB: Final = "model-*-of-*.safetensors"
TORCH_WEIGHTS: Final = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # transformers' next choice
# files that make a folder an HF model folder even without config.json (then opening says it is missing)
HF_MARKERS: Final = (
    "*.safetensors",
    INDEX_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
)
MAX_HEADER: Final = 100 << 20
MAX_CONFIG: Final = 16 << 20
MAX_DIM: Final = 1 << 40  # no real tensor dimension comes close; past it numpy's int64 shapes overflow
ST_DTYPES: Final[dict[str, QuantType]] = {
    "F64": QuantType.F64,
    "F32": QuantType.F32,
    "F16": QuantType.F16,
    "BF16": QuantType.BF16,
    "I64": QuantType.I64,
    "I32": QuantType.I32,
    "I16": QuantType.I16,
    "I8": QuantType.I8,
    "U8": QuantType.U8,
}
ITEMSIZE: Final[dict[QuantType, int]] = {
    QuantType.F64: 8, QuantType.F32: 4, QuantType.F16: 2, QuantType.BF16: 2, QuantType.I64: 8,
    QuantType.I32: 4, QuantType.I16: 2, QuantType.I8: 1, QuantType.U8: 1,
}  # fmt: skip


def parse_header(path: Path, file: TensorFile | None = None) -> tuple[int, dict[str, Any]]:
    """(data start offset, header JSON) of one .safetensors file, validated (read from `file` if given)."""
    held = file or TensorFile(path)
    try:
        return _read_header(path, held)
    finally:
        if file is None:
            held.close()


def _read_header(path: Path, file: TensorFile) -> tuple[int, dict[str, Any]]:
    size = file.size()
    with os.fdopen(os.dup(file.fileno()), "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: safetensors header length truncated: {len(head)} of 8 bytes")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise FormatError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes)")
        raw = f.read(n)
    header = parse_json(raw, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object, found {type_name(header)}")
    return 8 + n, header


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    where = f"{path}: tensor {printable(name, f'{path}: a tensor')}"
    entry = check(entry, dict, where)
    dtype = want(entry, "dtype", str, where)
    shape = tuple(int_list(want(entry, "shape", list, where), f"{where}: 'shape'"))
    offsets = int_list(want(entry, "data_offsets", list, where), f"{where}: 'data_offsets'")
    if len(offsets) != 2:
        raise FormatError(f"{where}: 'data_offsets' must be [begin, end], found {len(offsets)} numbers")
    begin, end = offsets
    if dtype not in ST_DTYPES:
        raise FormatError(f"{where}: unsupported dtype {shown(dtype)} (supported: {', '.join(ST_DTYPES)})")
    qtype = ST_DTYPES[dtype]
    if any(d > MAX_DIM for d in shape):
        raise FormatError(f"{where}: shape {list(shape)} has a dimension above {MAX_DIM}")
    need = ITEMSIZE[qtype]
    for d in shape:  # exact integers: a product of huge dims must not wrap
        need *= max(d, 0)
    if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != need:
        raise FormatError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, "
            f"shape {list(shape)} × {dtype} needs {need}"
        )
    if data_start + end > size:
        raise FormatError(f"{where}: data ends at byte {data_start + end}, file has {size}")
    return TensorInfo(name, qtype, shape, data_start + begin, need)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder, as transformers would load them (see the module docstring)."""
    index, single = folder / INDEX_FILE, folder / SINGLE_FILE
    if index.is_file():
        weight_map = want(load_object(index), "weight_map", dict, str(index))
        files = sorted({check(v, str, f"{index}: 'weight_map' value") for v in weight_map.values()})
        if single.is_file() and files != [SINGLE_FILE]:
            raise FormatError(
                f"{folder}: holds both {SINGLE_FILE} and {INDEX_FILE} (sharded weights); transformers "
                f"would load {SINGLE_FILE}, apr the shards: remove the stale one"
            )
        return [confined(folder, f, str(index)) for f in files]
    if single.is_file():
        return [single]
    shards = sorted(folder.glob(SHARD_GLOB))
    if shards and (other := next((n for n in TORCH_WEIGHTS if (folder / n).is_file()), None)):
        raise FormatError(
            f"{folder}: holds {shards[0].name}... without {INDEX_FILE}, and {other}; transformers "
            f"would load {other}, apr the shards: remove the stale one or add the index"
        )
    if shards:
        return shards
    raise FormatError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} in this folder")


def check_weight_files(folder: Path) -> None:
    """Raise FormatError when apr and transformers would load different weights from `folder` (a folder
    without safetensors weights passes: transformers may load it, apr refuses it when opening)."""
    if any(map(Path.is_file, (folder / INDEX_FILE, folder / SINGLE_FILE))) or any(folder.glob(SHARD_GLOB)):
        weight_files(folder)


class HFSource:
    """config.json as a ConfigSource (`get` of a key or dotted path; nested values stay dicts)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.kind = "hf"
        self.cfg = cfg
        archs = cfg.get("architectures")
        first = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
        model_type = cfg.get("model_type")
        self.architecture = first or (model_type if isinstance(model_type, str) else "")

    def get(self, key: str) -> Any:
        """A top-level key, or a dotted path into nested objects (`rope_parameters.rope_theta`)."""
        value: Any = self.cfg
        for part in key.split("."):
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        return value

    def keys(self) -> Collection[str]:
        return self.cfg.keys()


@dataclass
class SafetensorsCheckpoint:
    path: Path
    source: ConfigSource
    metadata: dict[str, Any]
    _tensors: dict[str, TensorInfo]
    _files: dict[str, TensorFile]  # tensor name → its shard, held open until close()
    format_name: str = "safetensors"

    def tensors(self) -> Sequence[TensorInfo]:
        return list(self._tensors.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelLoadError(f"{self.path}: no tensor {name}") from None

    def raw(self, name: str) -> npt.NDArray[np.uint8]:
        """The stored bytes (a private copy, read with pread)."""
        info = self.info(name)
        return read_exact(self._files[name].fileno(), info, str(self._files[name].path))

    def raw_range(self, name: str, start: int, stop: int) -> npt.NDArray[np.uint8]:
        """Bytes [start, stop) of the stored bytes (a private copy; nothing else is read)."""
        info, file = self.info(name), self._files[name]
        return read_range(file.fileno(), info, start, stop, str(file.path))

    def read(self, name: str) -> F32Array:
        info = self.info(name)
        return dequantize(self.raw(name), info.qtype, info.shape)

    def read_rows(self, name: str, rows: npt.NDArray[np.int64] | slice) -> F32Array:
        """Rows of a 2-D tensor (first axis), reading only their bytes."""
        info, file = self.info(name), self._files[name]
        if len(info.shape) != 2:
            raise FormatError(f"{file.path}: tensor {name} has shape {list(info.shape)}; row reads need 2-D")
        n_rows, n_cols = info.shape
        idx = row_index(rows, n_rows, f"{file.path}: tensor {name}")
        row_bytes = info.nbytes // n_rows if n_rows else 0
        picked = read_rows(file.fileno(), info, 0, row_bytes, idx, str(file.path))
        return dequantize(picked.reshape(-1), info.qtype, (len(idx), n_cols))

    def tokenizer_spec(self) -> TokenizerSpec | None:
        from apr.formats.tokenizer_hf import hf_spec  # reads tokenizer.json and tokenizer_config.json

        return hf_spec(self.path)

    def close(self) -> None:
        for file in self._files.values():
            file.close()


def open_safetensors(path: Path) -> SafetensorsCheckpoint:
    folder = path if path.is_dir() else path.parent
    if not (folder / CONFIG_JSON).exists():
        if path.is_dir():
            raise FormatError(
                f"{folder}: no {CONFIG_JSON} in this Hugging Face folder (it holds {_markers(folder)}); "
                f"copy the model's {CONFIG_JSON} into it"
            )
        raise FormatError(f"{folder}: no {CONFIG_JSON} next to the safetensors weights")
    hf_cfg = load_object(folder / CONFIG_JSON, MAX_CONFIG)
    paths = [path] if path.is_file() else weight_files(folder)
    tensors: dict[str, TensorInfo] = {}
    where: dict[str, TensorFile] = {}
    opened: list[TensorFile] = []
    try:
        for p in paths:
            opened.append(f := TensorFile(p))
            start, header = parse_header(p, f)
            size = f.size()
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                info = _tensor_info(p, name, entry, start, size)
                if info.name in tensors:
                    raise FormatError(f"{p}: tensor {shown(name)} is also in {where[info.name].path}")
                tensors[info.name], where[info.name] = info, f
    except BaseException:
        for f in opened:
            f.close()
        raise
    meta = {k: v for k, v in hf_cfg.items() if isinstance(v, (str, int, float, bool)) or v is None}
    return SafetensorsCheckpoint(folder, HFSource(hf_cfg), meta, tensors, where)


def _markers(folder: Path) -> str:
    found = sorted({p.name for pattern in HF_MARKERS for p in folder.glob(pattern) if p.is_file()})
    return ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")


def _sniff(head: bytes, path: Path) -> bool:
    if path.is_dir():
        return (path / CONFIG_JSON).is_file() or bool(_markers(path))
    return path.suffix == ".safetensors" and len(head) >= 9 and head[8:9] == b"{"


FORMAT: Final = Format("safetensors", (".safetensors",), _sniff, open_safetensors)
