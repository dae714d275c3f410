"""Parameter tables: one declaration per config value, read the same way from every checkpoint format.

A family lists its `Param`s once — the ModelConfig field, its GGUF key (`{arch}` filled in), its HF
`config.json` keys and its `.apr` keys, its kind, default and range — and `read_params` reads them from any
`ConfigSource`. So a config value is derived in one place, not once per format, and every value is typed and
range-checked before anything divides by it: a wrong type or a zero head count is a one-line FormatError
naming the key as the file spells it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from apr.errors import FormatError
from apr.formats.base import ConfigSource

REQUIRED: Final = None
Default = int | float | bool | str | Callable[[Mapping[str, Any]], Any] | None
# range checks: name -> (test, what the message says)
CHECKS: Final[dict[str, tuple[Callable[[float], bool], str]]] = {
    "positive": (lambda v: v > 0, "must be > 0"),
    "nonneg": (lambda v: v >= 0, "must be >= 0"),
    "any": (lambda v: True, ""),
}
MAX_INT: Final = 1 << 40  # no dimension of a real model comes near; sizes computed from them stay exact


@dataclass(frozen=True, slots=True)
class Param:
    field: str  # ModelConfig field
    gguf: str | None  # key template, e.g. "{arch}.attention.head_count"; None: not stored in GGUF
    hf: tuple[str, ...] = ()  # config.json keys, first present wins
    apr: tuple[str, ...] | None = None  # .apr keys; None: the HF keys (apr stores family extras so)
    kind: type = int
    default: Default = REQUIRED  # a value, a function of the fields read so far, or REQUIRED
    check: str = "positive"

    def keys(self, source: ConfigSource) -> tuple[str, ...]:
        if source.kind == "gguf":
            return (self.gguf.format(arch=source.architecture),) if self.gguf else ()
        if source.kind == "hf":
            return self.hf
        return self.hf if self.apr is None else self.apr


def read_params(params: tuple[Param, ...], source: ConfigSource, where: str) -> dict[str, Any]:
    """Every param's value from `source`, in table order (a default may use the fields read above it)."""
    values: dict[str, Any] = {}
    for p in params:
        values[p.field] = read_param(p, source, values, where)
    return values


def read_param(p: Param, source: ConfigSource, done: Mapping[str, Any], where: str) -> Any:
    for key in p.keys(source):
        raw = source.get(key)
        if raw is not None:
            return _checked(p, key, raw, where)
    if p.default is REQUIRED:
        keys = " / ".join(f"'{k}'" for k in p.keys(source)) or p.field
        raise FormatError(f"{where}: config key {keys} is missing")
    return p.default(done) if callable(p.default) else p.default


def _checked(p: Param, key: str, raw: Any, where: str) -> Any:
    value = typed(raw, p.kind)
    if value is None:
        raise FormatError(f"{where}: config key '{key}' must be {_kind_name(p.kind)}, got {_short(raw)}")
    if p.kind in (int, float):
        test, message = CHECKS[p.check]
        if not math.isfinite(value) or not test(value) or (abs(value) > MAX_INT and p.kind is int):
            raise FormatError(f"{where}: config key '{key}' {message or 'is out of range'}, got {value}")
    return value


def typed(raw: Any, kind: type) -> Any:
    """`raw` as `kind` when it is one (ints are floats too; bools are not numbers); else None."""
    if kind is bool:
        return raw if isinstance(raw, bool) else None
    if isinstance(raw, bool):
        return None
    if kind is int:
        return raw if isinstance(raw, int) else None
    if kind is float:
        return float(raw) if isinstance(raw, int | float) else None
    if kind is str:
        return raw if isinstance(raw, str) else None
    return None


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "a bool", str: "a string"}.get(kind, kind.__name__)


def _short(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


# ---- the parameters every decoder family shares ---------------------------------------------------

COMMON: Final[tuple[Param, ...]] = (
    Param("hidden_size", "{arch}.embedding_length", ("hidden_size",), ("hidden_size",)),
    Param("n_layers", "{arch}.block_count", ("num_hidden_layers",), ("num_layers",)),
    Param("n_heads", "{arch}.attention.head_count", ("num_attention_heads",), ("num_heads",)),
    Param(
        "n_kv_heads",
        "{arch}.attention.head_count_kv",
        ("num_key_value_heads",),
        ("num_kv_heads",),
        default=lambda v: v["n_heads"],
    ),
    Param(
        "head_dim",
        "{arch}.attention.key_length",
        ("head_dim",),
        ("head_dim",),
        default=lambda v: v["hidden_size"] // v["n_heads"],
    ),
    Param("intermediate_size", "{arch}.feed_forward_length", ("intermediate_size",), ("intermediate_size",)),
    Param(
        "max_position",
        "{arch}.context_length",
        ("max_position_embeddings",),
        ("max_position_embeddings",),
        default=2048,
    ),
    Param(
        "rope_theta",
        "{arch}.rope.freq_base",
        # transformers 5 writes rope_parameters (per layer type for Gemma 3); older configs rope_theta
        ("rope_theta", "rope_parameters.rope_theta", "rope_parameters.full_attention.rope_theta"),
        ("rope_theta",),
        float,
        default=10000.0,
    ),
    Param(
        "rms_eps",
        "{arch}.attention.layer_norm_rms_epsilon",
        ("rms_norm_eps",),
        ("rms_norm_eps",),
        float,
        default=1e-6,
    ),
)

# GGUF keys every family may carry that change nothing the reference computes, or are checked against
# the config after reading (`consistent`): anything else under `{arch}.` is refused by the family.
GGUF_HARMLESS: Final = (
    "{arch}.vocab_size",
    "{arch}.rope.dimension_count",  # checked: = head_dim
    "{arch}.attention.value_length",  # checked: = head_dim
    "{arch}.expert_count",  # checked: 0 for dense families
    "{arch}.expert_used_count",
)


def gguf_consistency(source: ConfigSource, cfg_head_dim: int, dense: bool, where: str) -> None:
    """The harmless keys really are: rope over the whole head, V heads like K heads, no experts."""
    arch = source.architecture
    checks = (
        (f"{arch}.rope.dimension_count", cfg_head_dim, "partial rotary embeddings are not implemented"),
        (f"{arch}.attention.value_length", cfg_head_dim, "V heads wider than K heads are not implemented"),
    )
    for key, want, why in checks:
        got = source.get(key)
        if got is not None and got != want:
            raise FormatError(f"{where}: '{key}' is {got}, head_dim is {want}: {why}")
    if dense and (n := source.get(f"{arch}.expert_count")) not in (None, 0):
        raise FormatError(f"{where}: '{arch}.expert_count' is {n}: a mixture-of-experts {arch} model")
