"""Hugging Face model folders: config.json + model.safetensors (or a sharded index) + tokenizer.json.

safetensors layout: u64 LE header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin,
end]}, "__metadata__": {...}}, then the data area; offsets are relative to byte 8 + N. We parse the header
ourselves (strictly: every offset, size and dtype is checked before use) and memory-map tensor bytes per
read, because the `safetensors` package's numpy path cannot return BF16 and exposes no byte offsets. Tests
check every tensor against the `safetensors` package. Names are translated to canonical (GGUF) spelling via
formats/names.py.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.errors import FormatError, ModelLoadError
from apr.formats import names
from apr.formats.base import F32Array, Format, TensorInfo, TokenizerSpec
from apr.formats.config import ModelConfig, QKLayout
from apr.formats.tensorio import read_tensor, read_tensor_rows, tensor_bytes
from apr.quant.types import QuantType

CONFIG_JSON: Final = "config.json"
TOKENIZER_JSON: Final = "tokenizer.json"
SINGLE_FILE: Final = "model.safetensors"
INDEX_FILE: Final = "model.safetensors.index.json"
MAX_HEADER: Final = 100 << 20
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
SUPPORTED_ARCHS: Final = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def parse_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header JSON) of one .safetensors file, validated."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: safetensors header length truncated: {len(head)} of 8 bytes")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise FormatError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    return 8 + n, header


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{path}: tensor {name}: malformed header entry {entry!r}") from None
    if dtype not in ST_DTYPES:
        raise FormatError(
            f"{path}: tensor {name}: unsupported dtype {dtype} (supported: {', '.join(ST_DTYPES)})"
        )
    qtype = ST_DTYPES[dtype]
    need = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[qtype]
    if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != need:
        raise FormatError(
            f"{path}: tensor {name}: data_offsets [{begin}, {end}] hold {end - begin} bytes, "
            f"shape {list(shape)} × {dtype} needs {need}"
        )
    if data_start + end > size:
        raise FormatError(f"{path}: tensor {name}: data ends at byte {data_start + end}, file has {size}")
    return TensorInfo(names.canonical_from_hf(name), qtype, shape, data_start + begin, need, name)


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({str(v) for v in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{index}: malformed shard index ({e})") from None
        return [folder / f for f in files]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    raise FormatError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} in this folder")


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in (None, "default"):
        raise ModelLoadError(f"rope scaling type {kind!r} is not supported by the reference engine yet")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or cfg.get("rope_theta", 10000.0))


def config_from_hf(cfg: dict[str, Any], tensor_names: set[str], source: Path) -> ModelConfig:
    archs = cfg.get("architectures") or []
    arch = next((SUPPORTED_ARCHS[a] for a in archs if a in SUPPORTED_ARCHS), None)
    if arch is None:
        raise ModelLoadError(
            f"{source}: architecture {archs or cfg.get('model_type')} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return ModelConfig(
            architecture=arch,
            hidden_size=hidden,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            rope_theta=_rope_theta(cfg),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            qkv_bias=names.blk(0, "attn_q.bias") in tensor_names,
            qk_norm=names.blk(0, "attn_q_norm.weight") in tensor_names,
            tied_embeddings=names.OUTPUT not in tensor_names,
            qk_layout=QKLayout.HF,
            max_position=int(cfg.get("max_position_embeddings", 2048)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{source}: config.json lacks or mangles {e}") from None


@dataclass
class SafetensorsCheckpoint:
    path: Path
    config: ModelConfig
    metadata: dict[str, Any]
    _tensors: dict[str, TensorInfo]
    _files: dict[str, Path]
    format_name: str = "safetensors"

    def tensors(self) -> Sequence[TensorInfo]:
        return list(self._tensors.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelLoadError(f"{self.path}: no tensor {name}") from None

    def raw(self, name: str) -> npt.NDArray[np.uint8]:
        return tensor_bytes(self._files[name], self.info(name))

    def read(self, name: str) -> F32Array:
        return read_tensor(self._files[name], self.info(name))

    def read_rows(self, name: str, rows: npt.NDArray[np.int64] | slice) -> F32Array:
        return read_tensor_rows(self._files[name], self.info(name), rows)

    def tokenizer_spec(self) -> TokenizerSpec | None:
        tj = self.path / TOKENIZER_JSON
        return TokenizerSpec(model="tokenizer.json", json_path=tj) if tj.is_file() else None

    def close(self) -> None:
        pass


def open_safetensors(path: Path) -> SafetensorsCheckpoint:
    folder = path if path.is_dir() else path.parent
    try:
        hf_cfg = json.loads((folder / CONFIG_JSON).read_text())
    except FileNotFoundError:
        raise FormatError(f"{folder}: no {CONFIG_JSON} next to the safetensors weights") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{folder / CONFIG_JSON}: not valid JSON ({e})") from None
    files = [path] if path.is_file() else _shard_files(folder)
    tensors: dict[str, TensorInfo] = {}
    where: dict[str, Path] = {}
    for f in files:
        start, header = parse_header(f)
        size = f.stat().st_size
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            info = _tensor_info(f, name, entry, start, size)
            tensors[info.name], where[info.name] = info, f
    config = config_from_hf(hf_cfg, set(tensors), folder)
    meta = {k: v for k, v in hf_cfg.items() if isinstance(v, (str, int, float, bool)) or v is None}
    return SafetensorsCheckpoint(folder, config, meta, tensors, where)


def _sniff(head: bytes, path: Path) -> bool:
    if path.is_dir():
        return (path / CONFIG_JSON).is_file() and (
            (path / SINGLE_FILE).is_file()
            or (path / INDEX_FILE).is_file()
            or any(path.glob("model-*-of-*.safetensors"))
        )
    return path.suffix == ".safetensors" and len(head) >= 9 and head[8:9] == b"{"


FORMAT: Final = Format("safetensors", (".safetensors",), _sniff, open_safetensors)
