"""GGUF metadata → ModelConfig and TokenizerSpec: the keys apr reads, as named constants and tables.

`Metadata` gives typed, checked access to the parsed fields (a wrong value type is a FormatError naming
the key). `CONFIG_KEYS` maps each ModelConfig field to its `{arch}.*` key with its default; flags that
GGUF does not store as keys come from tensor names (attn_q.bias → qkv_bias, attn_q_norm → qk_norm,
no output.weight → tied embeddings). `ARCH_QK_LAYOUT` lists the supported architectures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.errors import FormatError, ModelLoadError
from apr.formats import names
from apr.formats.base import TensorInfo, TokenizerSpec
from apr.formats.config import ModelConfig, QKLayout
from apr.formats.gguf_parse import FLOAT_TYPES, INT_TYPES, Field, StringArray, ValueType

# ---- metadata keys ------------------------------------------------------------------------------
ARCH: Final = "general.architecture"
EMBEDDING_LENGTH: Final = "{arch}.embedding_length"
BLOCK_COUNT: Final = "{arch}.block_count"
HEAD_COUNT: Final = "{arch}.attention.head_count"
HEAD_COUNT_KV: Final = "{arch}.attention.head_count_kv"
KEY_LENGTH: Final = "{arch}.attention.key_length"
FEED_FORWARD_LENGTH: Final = "{arch}.feed_forward_length"
CONTEXT_LENGTH: Final = "{arch}.context_length"
ROPE_FREQ_BASE: Final = "{arch}.rope.freq_base"
RMS_EPS: Final = "{arch}.attention.layer_norm_rms_epsilon"
EXPERT_COUNT: Final = "{arch}.expert_count"
VOCAB_SIZE: Final = "{arch}.vocab_size"
TOKENIZER_MODEL: Final = "tokenizer.ggml.model"
TOKENIZER_PRE: Final = "tokenizer.ggml.pre"
TOKENS: Final = "tokenizer.ggml.tokens"
MERGES: Final = "tokenizer.ggml.merges"
TOKEN_TYPE: Final = "tokenizer.ggml.token_type"
BOS_ID: Final = "tokenizer.ggml.bos_token_id"
EOS_ID: Final = "tokenizer.ggml.eos_token_id"
ADD_BOS: Final = "tokenizer.ggml.add_bos_token"
CHAT_TEMPLATE: Final = "tokenizer.chat_template"

# How each architecture stores Q/K rows; the keys are the architectures this reader supports.
ARCH_QK_LAYOUT: Final[dict[str, QKLayout]] = {
    "llama": QKLayout.INTERLEAVED,  # convert_hf_to_gguf permutes Q/K for llama.cpp's NORM rope
    "qwen2": QKLayout.HF,  # NEOX rope: rows stay in HF order
    "qwen3": QKLayout.HF,
}
REQUIRED: Final = None
Default = float | Callable[[dict[str, Any]], float] | None


@dataclass(frozen=True, slots=True)
class ConfigKey:
    template: str
    kind: type[int] | type[float]
    default: Default = REQUIRED  # a number, a function of the fields read so far, or REQUIRED


# ModelConfig field → GGUF key, in order: a default may use the fields read above it
CONFIG_KEYS: Final[dict[str, ConfigKey]] = {
    "hidden_size": ConfigKey(EMBEDDING_LENGTH, int),
    "n_layers": ConfigKey(BLOCK_COUNT, int),
    "n_heads": ConfigKey(HEAD_COUNT, int),
    "n_kv_heads": ConfigKey(HEAD_COUNT_KV, int, lambda v: v["n_heads"]),
    "head_dim": ConfigKey(KEY_LENGTH, int, lambda v: v["hidden_size"] // v["n_heads"]),
    "intermediate_size": ConfigKey(FEED_FORWARD_LENGTH, int),
    "max_position": ConfigKey(CONTEXT_LENGTH, int),
    "rope_theta": ConfigKey(ROPE_FREQ_BASE, float, 10000.0),
    "rms_eps": ConfigKey(RMS_EPS, float),
    "n_experts": ConfigKey(EXPERT_COUNT, int, 0),
}
POSITIVE_FIELDS: Final = (
    "hidden_size",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "max_position",
)
INLINE_ARRAY_MAX: Final = 64  # longer metadata arrays are summarized as {"type", "len"}


# ---- typed metadata access ----------------------------------------------------------------------


def type_name(f: Field) -> str:
    if f.elem_type is None:
        return f.type.name.lower()
    return f"array<{f.elem_type.name.lower()}>"


class Metadata:
    """Typed, checked access to parsed GGUF fields: wrong types raise FormatError naming the key."""

    def __init__(self, fields: dict[str, Field]) -> None:
        self.fields = fields

    def _get(self, key: str, types: frozenset[ValueType], kind: str, array: bool = False) -> Any:
        f = self.fields.get(key)
        if f is None:
            return None
        if (f.elem_type if array else f.type) not in types or (f.elem_type is not None) != array:
            raise FormatError(f"metadata key '{key}' must be {kind}, got {type_name(f)}")
        return f.value

    def integer(self, key: str) -> int | None:
        v = self._get(key, INT_TYPES, "an integer")
        return None if v is None else int(v)

    def number(self, key: str) -> float | None:
        v = self._get(key, FLOAT_TYPES | INT_TYPES, "a number")
        return None if v is None else float(v)

    def flag(self, key: str) -> bool | None:
        v = self._get(key, frozenset({ValueType.BOOL}), "a bool")
        return None if v is None else bool(v)

    def text(self, key: str) -> str | None:
        v = self._get(key, frozenset({ValueType.STRING}), "a string")
        return None if v is None else str(v)

    def strings(self, key: str) -> StringArray | None:
        v = self._get(key, frozenset({ValueType.STRING}), "an array of strings", array=True)
        return None if v is None else v

    def integers(self, key: str) -> tuple[int, ...] | None:
        v = self._get(key, INT_TYPES, "an array of integers", array=True)
        return None if v is None else tuple(v.tolist())

    def summary(self) -> dict[str, Any]:
        return {k: _summary(f) for k, f in self.fields.items()}


def _summary(f: Field) -> Any:
    if f.elem_type is None:
        return f.value
    assert isinstance(f.value, np.ndarray | StringArray)
    if len(f.value) <= INLINE_ARRAY_MAX:
        return sequence_of(f.value)
    return {"type": type_name(f), "len": len(f.value)}


# ---- ModelConfig --------------------------------------------------------------------------------


def model_config(meta: Metadata, tensors: dict[str, TensorInfo]) -> ModelConfig:
    """ModelConfig of a llama / qwen2 / qwen3 GGUF from its metadata and tensor names."""
    arch = meta.text(ARCH)
    if arch is None:
        raise FormatError(f"metadata key '{ARCH}' is missing")
    if arch not in ARCH_QK_LAYOUT:
        supported = ", ".join(ARCH_QK_LAYOUT)
        raise ModelLoadError(f"architecture '{arch}' is not supported (supported: {supported})")
    values: dict[str, Any] = {}
    for field, key in CONFIG_KEYS.items():  # checked as read: later defaults divide by them
        values[field] = v = _config_value(meta, arch, key, values)
        if field in POSITIVE_FIELDS and v <= 0:
            raise FormatError(f"{key.template.format(arch=arch)} must be > 0, got {v}")
    if values["n_heads"] % values["n_kv_heads"]:
        raise FormatError(
            f"head_count {values['n_heads']} is not a multiple of head_count_kv {values['n_kv_heads']}"
        )
    return ModelConfig(
        architecture=arch,
        vocab_size=_vocab_size(meta, arch, tensors),
        qkv_bias=names.blk(0, "attn_q.bias") in tensors,
        qk_norm=names.blk(0, "attn_q_norm.weight") in tensors,
        tied_embeddings=names.OUTPUT not in tensors,
        qk_layout=ARCH_QK_LAYOUT[arch],
        **values,
    )


def _config_value(meta: Metadata, arch: str, key: ConfigKey, done: dict[str, Any]) -> int | float:
    name = key.template.format(arch=arch)
    v = meta.integer(name) if key.kind is int else meta.number(name)
    if v is not None:
        return v
    if key.default is REQUIRED:
        raise FormatError(f"metadata key '{name}' is missing")
    return key.default(done) if callable(key.default) else key.default


def _vocab_size(meta: Metadata, arch: str, tensors: dict[str, TensorInfo]) -> int:
    n = meta.integer(VOCAB_SIZE.format(arch=arch))
    if n is not None:
        return n
    tokens = meta.strings(TOKENS)
    if tokens is not None:
        return len(tokens)
    if names.TOKEN_EMBD in tensors:
        return tensors[names.TOKEN_EMBD].shape[0]
    raise FormatError(
        f"cannot tell the vocab size: no {VOCAB_SIZE.format(arch=arch)}, {TOKENS} or {names.TOKEN_EMBD}"
    )


def tokenizer_spec(m: Metadata) -> TokenizerSpec | None:
    """What formats/tokenizer.py needs to rebuild the GGUF's tokenizer; None if it has none."""
    model = m.text(TOKENIZER_MODEL)
    if model is None:
        return None
    tokens = m.strings(TOKENS)
    if tokens is None:
        raise FormatError(f"{TOKENIZER_MODEL} is set but {TOKENS} is missing")
    return TokenizerSpec(
        model=model,
        pre=m.text(TOKENIZER_PRE) or "default",
        tokens=tokens,
        merges=m.strings(MERGES) or (),
        token_types=m.integers(TOKEN_TYPE) or (),
        bos_id=m.integer(BOS_ID),
        eos_id=m.integer(EOS_ID),
        add_bos=bool(m.flag(ADD_BOS)),
        chat_template=m.text(CHAT_TEMPLATE),
    )


def sequence_of(values: Sequence[Any] | npt.NDArray[Any]) -> list[Any]:
    """Plain Python values of a parsed array (for JSON-able metadata)."""
    return values.tolist() if isinstance(values, np.ndarray) else list(values)
