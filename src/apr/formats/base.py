"""The one interface every checkpoint format implements, and the records it returns.

A format module exports `FORMAT = Format(name, suffixes, sniff, open)`; `formats/__init__.py` lists them in
one tuple and dispatches by magic bytes, then by suffix. A `Checkpoint` lists tensors without touching their
data and reads one tensor (or some of its rows) on demand, dequantized to float32. Tensor names are
canonical (GGUF spelling, formats/names.py); `TensorInfo.source_name` keeps the file's own name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from apr.formats.config import ModelConfig
from apr.quant.types import QuantType

F32Array = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str  # canonical name, e.g. "blk.0.attn_q.weight"
    qtype: QuantType
    shape: tuple[int, ...]  # row-major numpy order: (out_features, in_features) for matrices
    offset: int  # absolute byte offset in the file holding it
    nbytes: int
    source_name: str = ""  # the name in the file, when it differs

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True, slots=True)
class TokenizerSpec:
    """What a tokenizer is built from, as the checkpoint stores it (formats/tokenizer.py builds it)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece) or "tokenizer.json"
    pre: str = "default"  # GGUF tokenizer.ggml.pre
    tokens: Sequence[str] = ()
    merges: Sequence[str] = ()
    token_types: Sequence[int] = ()
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False
    json_path: Path | None = None  # an HF tokenizer.json, used as is
    chat_template: str | None = None


class Checkpoint(Protocol):
    """An opened model file. Cheap to open; tensor data is read only by `read`/`read_rows`."""

    path: Path
    format_name: str
    config: ModelConfig
    metadata: dict[str, Any]  # the file's own metadata, for `apr inspect` (small values only)

    def tensors(self) -> Sequence[TensorInfo]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str) -> F32Array:
        """The whole tensor as float32 in `info(name).shape`."""
        ...

    def read_rows(self, name: str, rows: npt.NDArray[np.int64] | slice) -> F32Array:
        """Selected rows (first axis) of a 2-D tensor as float32, reading only their bytes."""
        ...

    def raw(self, name: str) -> npt.NDArray[np.uint8]:
        """The tensor's stored bytes (memory-mapped), for byte-exact conversion."""
        ...

    def tokenizer_spec(self) -> TokenizerSpec | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Format:
    name: str  # "gguf", "safetensors", "apr"
    suffixes: tuple[str, ...]
    sniff: Callable[[bytes, Path], bool]  # (first 16 bytes, path) -> is this format
    open: Callable[[Path], Checkpoint]
    notes: tuple[str, ...] = field(default=())
