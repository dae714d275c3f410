"""Write `.apr` v2 files byte for byte as aprender's in-memory writer does, streaming tensor data.

`write_apr(path, tensors, metadata)` takes tensor *descriptions* (name, type, shape, and the bytes or a
callable producing them) and writes in two passes over the descriptions: sizes come from type × shape,
so the header, metadata and index are written first; then each tensor's bytes are produced, checked
against their size, written, zero-padded to 64 and dropped. Only one tensor's bytes are alive at a time,
so a multi-GB model is never held in memory. The file appears atomically (`atomic_output`).

`metadata_for(config, tokenizer, shapes=…)` builds the metadata aprender's GGUF import writes (spec §8
step 8). The byte layout and its rules live in formats/aprcodec.py, the JSON in formats/aprmeta.py.
"""

from __future__ import annotations

import base64
import itertools
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.atomicfile import atomic_output
from apr.errors import FormatError, UnsupportedQuantError
from apr.formats.aprcodec import (
    CODE_OF,
    MAX_NAME_LEN,
    MAX_NDIM,
    PACKING,
    AprEntry,
    align64,
    layout_header,
)
from apr.formats.aprmeta import IMPORT_DESCRIPTION, encode_metadata, ordered
from apr.formats.base import TokenizerSpec
from apr.formats.tokenizer_special import name_keyed
from apr.quant.types import QuantType

TensorBytes = bytes | bytearray | memoryview | npt.NDArray[Any]
# numpy dtype of each plain element type, for `AprTensor.from_array` and the dtype check on arrays
NUMPY_QTYPE: Final[dict[np.dtype[Any], QuantType]] = {
    np.dtype("<f4"): QuantType.F32,
    np.dtype("<f2"): QuantType.F16,
    np.dtype("<f8"): QuantType.F64,
    np.dtype("i1"): QuantType.I8,
    np.dtype("u1"): QuantType.U8,
    np.dtype("<i4"): QuantType.I32,
    np.dtype("<i8"): QuantType.I64,
}
_ZEROS: Final = bytes(64)
_UNWRITABLE: Final[dict[QuantType, str]] = {
    QuantType.Q8_1: "dtype code 9 is GGML Q8_1 to realizar but legacy APR_Q8 to aprender",
}


@dataclass(frozen=True, slots=True)
class AprTensor:
    """One tensor to write: its stored name, type, row-major shape, and bytes (or how to get them).

    `data` is the raw stored bytes (for quantized types, the blocks as GGUF holds them), or a
    zero-argument callable returning them, called once while writing, so it can read lazily.
    """

    name: str
    qtype: QuantType
    shape: tuple[int, ...]
    data: TensorBytes | Callable[[], TensorBytes]

    @classmethod
    def from_array(cls, name: str, array: npt.NDArray[Any]) -> AprTensor:
        """A plain-typed tensor (F32, F16, F64, I8, U8, I32, I64) holding `array`."""
        le = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if le not in NUMPY_QTYPE:
            raise FormatError(f"tensor '{name}': numpy dtype {array.dtype} has no .apr dtype")
        return cls(name, NUMPY_QTYPE[le], tuple(array.shape), np.ascontiguousarray(array, le))

    @property
    def nbytes(self) -> int:
        return PACKING[self.qtype].nbytes(self.shape)


def write_apr(
    path: Path, tensors: Iterable[AprTensor], metadata: Mapping[str, object], *, fsync: bool = False
) -> None:
    """Write an .apr v2 file: header, metadata, index sorted by name, data in index order, footer.

    >>> write_apr(Path("tiny.apr"), [AprTensor.from_array("w", np.ones(4, np.float32))],
    ...           {"model_type": "llama"})  # doctest: +SKIP
    """
    where = f"cannot write {path}"
    todo = sorted(tensors, key=lambda t: t.name.encode())
    entries, offset = [], 0
    for t in todo:
        _check(t, where)
        entries.append(AprEntry(t.name, t.qtype, t.shape, offset, t.nbytes))
        offset += align64(t.nbytes)
    for a, b in itertools.pairwise(entries):
        if a.name == b.name:
            raise FormatError(f"{where}: two tensors are named '{a.name}'")
    meta = encode_metadata(metadata)
    header = layout_header(len(meta), entries)
    index = b"".join(e.encode() for e in entries)
    with atomic_output(path, fsync=fsync) as f:
        crc = 0

        def put(chunk: bytes | memoryview) -> None:
            nonlocal crc
            f.write(chunk)
            crc = zlib.crc32(chunk, crc)

        for section in (header.encode(), meta, index):
            put(section)
            put(_ZEROS[: -len(section) % 64])
        for t in todo:
            data = _bytes_of(t, where)
            put(data)
            put(_ZEROS[: -len(data) % 64])
            del data
        f.write(crc.to_bytes(4, "little"))


def _check(t: AprTensor, where: str) -> None:
    if t.qtype not in CODE_OF:
        why = _UNWRITABLE.get(t.qtype, "aprender has no dtype code for it")
        raise UnsupportedQuantError(
            f"{where}: tensor '{t.name}' is {t.qtype.name}, which .apr cannot hold ({why}); "
            "requantize it to Q4_K or Q6_K, or store F16"
        )
    if len(t.name.encode()) > MAX_NAME_LEN:
        raise FormatError(f"{where}: tensor name '{t.name[:40]}…' is over {MAX_NAME_LEN} bytes")
    if len(t.shape) > MAX_NDIM or any(d < 0 for d in t.shape):
        raise FormatError(f"{where}: tensor '{t.name}': shape {list(t.shape)} (at most 8 dims ≥ 0)")


def _bytes_of(t: AprTensor, where: str) -> memoryview:
    data = t.data() if callable(t.data) else t.data
    if isinstance(data, np.ndarray):
        if data.dtype.itemsize != 1 and NUMPY_QTYPE.get(data.dtype) != t.qtype:
            raise FormatError(f"{where}: tensor '{t.name}' is {t.qtype.name}, data is {data.dtype}")
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
    view = memoryview(data).cast("B")
    if view.nbytes != t.nbytes:
        raise FormatError(
            f"{where}: tensor '{t.name}': {view.nbytes} bytes, but {t.qtype.name} "
            f"{list(t.shape)} needs {t.nbytes}"
        )
    return view


# --- what aprender's GGUF import writes (spec §8 step 8) ---------------------------------------


@dataclass(frozen=True, slots=True)
class AprModelKeys:
    """The model values aprender's import writes (the family registry fills it from its config).

    `extra` holds a family's own keys that aprender has no typed field for (HF spelling: soft-caps,
    multipliers, rope scaling); they go to the custom map and come back through the family's table.
    """

    architecture: str
    hf_architecture: str | None
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    intermediate_size: int
    max_position: int
    rope_theta: float
    rope_type: int  # 0 NORM (llama.cpp-interleaved Q/K rows), 2 NEOX (HF rows)
    rms_eps: float
    head_dim: int
    n_experts: int
    tied_embeddings: bool
    extra: Mapping[str, object] = field(default_factory=dict)


def metadata_for(
    config: AprModelKeys,
    tokenizer: TokenizerSpec | None = None,
    *,
    shapes: Mapping[str, Sequence[int]],
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """aprender's import key set for a model, in serialization order, one spelling per key.

    `shapes` maps every tensor name to be written to its row-major dims (they give `param_count`
    and `tensor_shapes`). `extra` adds or overrides keys; an `extra` value of None drops the key.
    `rope_type` states how the Q/K rows are stored.
    """
    arch, rope_type = config.architecture, config.rope_type
    table = {name: [int(d) for d in dims] for name, dims in shapes.items()}
    typed: dict[str, object] = {
        "model_type": arch,
        "name": arch,
        "description": IMPORT_DESCRIPTION,
        "version": "1.0.0",
        "original_format": "gguf",
        "param_count": sum(math.prod(dims) for dims in table.values()),
        "chat_template": tokenizer.chat_template if tokenizer else None,
        "architecture": arch,
        "hf_architecture": config.hf_architecture,
        **_config_keys(config, rope_type, prefix=""),
        "head_dim": config.head_dim,
        "num_experts": config.n_experts or None,
    }
    custom: dict[str, object] = {
        "tensor_shapes": table,
        **tokenizer_keys(tokenizer),
        "model.architecture": arch,
        **_config_keys(config, rope_type, prefix="model."),
        "tied_embeddings": True if config.tied_embeddings else None,
        **config.extra,
    }
    merged = {**typed, **custom, **(extra or {})}
    return ordered({k: v for k, v in merged.items() if v is not None})


def _config_keys(config: AprModelKeys, rope_type: int, prefix: str) -> dict[str, object]:
    # typed f32 fields are rounded by the encoder; aprender writes the model.* copies as f64(f32)
    as_f32 = (lambda x: float(np.float32(x))) if prefix else float
    return {
        f"{prefix}hidden_size": config.hidden_size,
        f"{prefix}num_layers": config.n_layers,
        f"{prefix}num_heads": config.n_heads,
        f"{prefix}num_kv_heads": config.n_kv_heads,
        f"{prefix}vocab_size": config.vocab_size,
        f"{prefix}intermediate_size": config.intermediate_size,
        f"{prefix}max_position_embeddings": config.max_position,
        f"{prefix}rope_theta": as_f32(config.rope_theta),
        f"{prefix}rope_type": rope_type,
        f"{prefix}rms_norm_eps": as_f32(config.rms_eps),
    }


def tokenizer_keys(tok: TokenizerSpec | None) -> dict[str, object]:
    if tok is None or not tok.tokens:
        return {}
    return {
        "tokenizer.vocabulary": list(tok.tokens),
        "tokenizer.vocab_size": len(tok.tokens),
        "tokenizer.model": tok.model,
        "tokenizer.bos_token_id": tok.bos_id,
        "tokenizer.eos_token_id": tok.eos_id,
        "tokenizer.pre_type": tok.pre,
        "tokenizer.merges": list(tok.merges) or None,
        "tokenizer.token_type": list(tok.token_types) or None,
        "tokenizer.add_bos_token": tok.add_bos,
        "tokenizer.chat_template": tok.chat_template,
        "tokenizer.scores": list(tok.scores) or None,
        # what SentencePiece needs beyond aprender's keys; left out where they say nothing
        "tokenizer.add_eos_token": tok.add_eos or None,
        "tokenizer.add_space_prefix": tok.add_space_prefix if tok.model == "llama" else None,
        "tokenizer.model_name": tok.model_name
        if tok.model == "llama" or name_keyed(tok.model_name)
        else None,
        **{f"tokenizer.fim_{m}_token_id": i for m, i in tok.fim_ids.items()},
        **_wpm_ugm_keys(tok),
    }


def _wpm_ugm_keys(tok: TokenizerSpec) -> dict[str, object]:
    """What WordPiece ("bert") and Unigram ("t5") vocabs need (custom keys; aprender has neither), and
    RWKV ("rwkv") its unknown token, whitespace BPE ("whitespace") its lowercasing."""
    if tok.model not in ("bert", "t5", "rwkv", "whitespace"):
        return {}
    charsmap = tok.precompiled_charsmap and base64.b64encode(tok.precompiled_charsmap).decode("ascii")
    return {  # None is left out, as elsewhere
        "tokenizer.unknown_token_id": tok.unk_id,
        "tokenizer.separator_token_id": tok.sep_id,
        "tokenizer.normalizer_lowercase": tok.lowercase,
        "tokenizer.normalizer_strip_accents": tok.strip_accents,
        "tokenizer.remove_extra_whitespaces": tok.remove_extra_whitespaces or None,
        "tokenizer.precompiled_charsmap_base64": charsmap or None,
    }
