"""The one interface every checkpoint format implements, and the records it returns.

A format module exports `FORMAT = Format(name, suffixes, sniff, open)`; `formats/__init__.py` lists them in
one tuple and dispatches by magic bytes, then by suffix. A `Checkpoint` lists tensors without touching their
data and reads one tensor (or some of its rows) on demand, dequantized to float32. Tensor names are the
file's own; a format knows no architecture: it exposes the architecture's name and its metadata as a
`ConfigSource`, and the family registry (apr.models) builds the model config and maps names to roles.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from apr.quant.types import QuantType

F32Array = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: (
        str  # the name in the file (GGUF "blk.0.attn_q.weight", HF "model.layers.0.self_attn.q_proj.weight")
    )
    qtype: QuantType
    shape: tuple[int, ...]  # row-major numpy order: (out_features, in_features) for matrices
    offset: int  # absolute byte offset in the file holding it
    nbytes: int
    source_name: str = ""  # the file's name when `name` is a canonical (family-mapped) one
    # a family-mapped tensor stacked from several file tensors on a new first axis (HF per-expert
    # weights): their names, in order; such a tensor has no single byte range (`offset` is its first part's)
    parts: tuple[str, ...] = ()

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
    token_types: Sequence[int] = ()  # GGUF types: 1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False  # encode adds BOS / EOS (already resolved against the format's defaults)
    json_path: Path | None = None  # an HF tokenizer.json (+ tokenizer_config.json beside it)
    chat_template: str | None = None
    add_eos: bool = False
    scores: Sequence[float] = ()  # SentencePiece: the merge priority of each token
    add_space_prefix: bool = False  # SentencePiece: "▁" before the text and after each special token
    fim_ids: Mapping[str, int] = field(default_factory=dict)  # FIM marker ("pre", "suf", ...) → stated id
    model_name: str | None = None  # GGUF general.name: llama.cpp keys a tokenizer quirk on it (phi3)
    unk_id: int | None = None  # WPM ("bert"): the token of a word no tokens spell (as stored)
    sep_id: int | None = None  # WPM: appended after the text (as stored)
    lowercase: bool | None = None  # WPM: BERT's normalizer lowercases (None: not stated, llama.cpp: yes)
    strip_accents: bool | None = None  # WPM: ... and strips accents (None: not stated, as lowercase)
    remove_extra_whitespaces: bool = False  # UGM ("t5"): runs of spaces become one
    precompiled_charsmap: bytes = b""  # UGM: SentencePiece's normalization rules (empty: none)


class ConfigSource(Protocol):
    """A checkpoint's configuration as stored: GGUF metadata, HF config.json, or .apr metadata.

    `get` returns the stored value (int, float, bool, str, or a list of them; nested dicts for JSON) or None
    when absent; families read it through their parameter tables (apr.models.params).
    """

    kind: str  # "gguf" | "hf" | "apr"
    architecture: str  # GGUF general.architecture, HF architectures[0], .apr architecture ("" if none)

    def get(self, key: str) -> Any: ...

    def keys(self) -> Collection[str]: ...


class Checkpoint(Protocol):
    """An opened model file. Cheap to open; tensor data is read only by `read`/`read_rows`."""

    path: Path
    format_name: str
    source: ConfigSource
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
        """The tensor's stored bytes (a private copy), for byte-exact conversion."""
        ...

    def raw_range(self, name: str, start: int, stop: int) -> npt.NDArray[np.uint8]:
        """Bytes [start, stop) of `raw(name)`, reading only those (the engine's row blocks)."""
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
