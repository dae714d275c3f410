"""What `apr inspect` and the metadata-only `apr trace` show about a checkpoint, as values (no rendering).

Nothing here reads tensor data: the tensor table, parameter counts and layer skeleton come from the index.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from apr.formats.base import TensorInfo
from apr.models.config import ModelConfig
from apr.models.model import Model

_LAYER_RE: Final = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True, slots=True)
class TokenizerSummary:
    model: str
    pre: str
    vocab_size: int
    merges: int
    special_tokens: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool


@dataclass(frozen=True, slots=True)
class CheckpointSummary:
    path: str
    format: str
    config: ModelConfig
    tensors: list[TensorInfo]
    parameters: int
    bytes: int
    qtypes: dict[str, int]  # quant type name -> tensor count
    tokenizer: TokenizerSummary | None
    metadata: dict[str, Any]
    family: str = ""
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (tensor, why the math does not use it)
    warnings: list[str] = field(default_factory=list)
    integrity: str | None = None  # result of --verify (whole-file checksums), None when not asked


SHOWN_FIELDS: Final = frozenset(
    {
        "architecture",
        "family",
        "hidden_size",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
        "rope_theta",
        "rms_eps",
        "qkv_bias",
        "qk_norm",
        "tied_embeddings",
        "qk_layout",
        "max_position",
    }
)


def config_extras(cfg: ModelConfig) -> dict[str, Any]:
    """The config values beyond the common ones that differ from their neutral defaults (what makes this
    family member's math differ: windows, caps, multipliers, RoPE scaling)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.name in SHOWN_FIELDS:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(cfg, f.name)
        if value != default:
            is_record = dataclasses.is_dataclass(value) and not isinstance(value, type)
            out[f.name] = dataclasses.asdict(value) if is_record else value
    return out


def _integrity(model: Model) -> str:
    """Checksums a format keeps beyond its header (today: the .apr footer CRC32); reads the whole file."""
    check = getattr(model.ckpt, "check_footer", None)
    if check is None:
        return f"{model.format_name} files carry no whole-file checksum"
    f = check()
    if f.ok:
        return f"footer CRC32 {f.stored:08x} verified"
    return f"footer CRC32 MISMATCH: stored {f.stored:08x}, computed {f.computed:08x} (the file is corrupt)"


def summarize(ckpt: Model, verify: bool = False) -> CheckpointSummary:
    tensors = list(ckpt.tensors())
    spec = ckpt.tokenizer_spec()
    tok = None
    if spec is not None:
        special = sum(1 for t in spec.token_types if t in (2, 3, 4))
        tok = TokenizerSummary(
            spec.model,
            spec.pre,
            len(spec.tokens),
            len(spec.merges),
            special,
            spec.bos_id,
            spec.eos_id,
            spec.add_bos,
        )
    return CheckpointSummary(
        path=str(ckpt.path),
        format=ckpt.format_name,
        config=ckpt.config,
        tensors=tensors,
        parameters=sum(t.n_elements for t in tensors),
        bytes=sum(t.nbytes for t in tensors),
        qtypes=dict(Counter(t.qtype.name for t in tensors)),
        tokenizer=tok,
        metadata=ckpt.metadata,
        family=ckpt.family.name,
        ignored=list(ckpt.ignored),
        warnings=list(getattr(ckpt.ckpt, "warnings", ())),
        integrity=_integrity(ckpt) if verify else None,
    )


@dataclass(frozen=True, slots=True)
class SkeletonLayer:
    index: int
    name: str
    parameters: int
    hidden_dim: int | None = None


@dataclass(frozen=True, slots=True)
class Skeleton:
    """aprender's metadata-only `apr trace MODEL` (spec §1.4 item 4): layers and parameters only."""

    path: str
    format: str
    layers: list[SkeletonLayer]
    total_layers: int
    total_parameters: int
    notes: list[str] = field(default_factory=list)


def skeleton(ckpt: Model, layer_filter: str | None = None) -> Skeleton:
    cfg = ckpt.config
    per_layer: Counter[int] = Counter()
    other = 0
    for t in ckpt.tensors():
        m = _LAYER_RE.match(t.name)
        if m:
            per_layer[int(m.group(1))] += t.n_elements
        else:
            other += t.n_elements
    layers = [SkeletonLayer(0, "embedding", 0, cfg.hidden_size)]
    layers += [SkeletonLayer(i + 1, f"transformer_block_{i}", per_layer[i]) for i in range(cfg.n_layers)]
    layers.append(SkeletonLayer(cfg.n_layers + 1, "final_layer_norm", 0, cfg.hidden_size))
    total = other + sum(per_layer.values())
    notes = ["stats_source: metadata-only (no forward pass; use --payload or --save-tensor for activations)"]
    if layer_filter is not None:
        kept = [x for x in layers if layer_filter in x.name]
        if not kept:
            notes.append(f'layer filter "{layer_filter}" matched 0 of {len(layers)} layers')
        layers = kept
    return Skeleton(str(ckpt.path), ckpt.format_name, layers, cfg.n_layers, total, notes)
