"""A checkpoint understood by a family: its config, its tensors under canonical names, and strict accounting.

`open_model(path)` opens the file (apr.formats), finds the family from the architecture it names, reads the
family's parameter table, maps every tensor of the file to a role of the family, and refuses — with one line
naming the culprit, before any compute — whatever it does not fully understand:

- an architecture no family declares (in any format, `.apr` included);
- a tensor that is neither a role nor declared ignorable, a required role that is missing, an optional
  per-layer role present in some layers only, a tensor whose shape the config contradicts;
- a GGUF `{arch}.*` key the family neither reads nor knows to be harmless, a config.json value that changes
  the math in a way the family does not implement (an unknown `rope_scaling` type, soft-capping on llama).

The `Model` then behaves as a Checkpoint whose names are canonical (GGUF spelling), whatever the file's. HF
per-expert tensors (a role spelled with `{e}`) are one stacked (E, out, in) tensor, as GGUF stores them: its
TensorInfo names the parts, `read`/`read_rows` (first axis: experts) read only the experts asked for, and it
has no `raw` bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from apr.errors import FormatError, ModelLoadError, NotFoundError, ValidationError
from apr.formats import open_checkpoint
from apr.formats.base import Checkpoint, ConfigSource, F32Array, TensorInfo, TokenizerSpec
from apr.models.base import OPTIONAL, REQUIRED, Family, StageNode, TensorRole, Variant
from apr.models.config import ModelConfig
from apr.models.expert_stacks import EXPERTS, stack_experts
from apr.models.params import GGUF_HARMLESS, gguf_consistency, read_params
from apr.models.registry import families, find_family
from apr.quant import row_nbytes
from apr.stages import Stage

Mapped = list[tuple[str, tuple[int | None, str]]]  # (role template, (layer, file tensor name))


@dataclass
class Model:
    """A checkpoint, its family and config; tensors by canonical name (`TensorInfo.source_name` = file's)."""

    ckpt: Checkpoint
    family: Family
    variant: Variant
    config: ModelConfig
    _infos: dict[str, TensorInfo]
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (file tensor name, why it is not used)
    _slices: dict[str, tuple[int, int]] = field(default_factory=dict)  # canonical → rows of a fused tensor

    @property
    def path(self) -> Path:
        return self.ckpt.path

    @property
    def format_name(self) -> str:
        return self.ckpt.format_name

    @property
    def metadata(self) -> dict[str, Any]:
        return self.ckpt.metadata

    @property
    def source(self) -> ConfigSource:
        return self.ckpt.source

    def graph(self) -> tuple[StageNode, ...]:
        return self.family.graph(self.config)

    def stages(self) -> frozenset[Stage]:
        return frozenset(n.stage for n in self.graph())

    def tensors(self) -> Sequence[TensorInfo]:
        return tuple(self._infos.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise NotFoundError(f"{self.path}: no tensor '{name}'") from None

    def _file_name(self, name: str) -> str:
        info = self.info(name)
        return info.source_name or info.name

    def read(self, name: str) -> F32Array:
        if parts := self.info(name).parts:
            return np.stack([self.ckpt.read(p) for p in parts])
        if name in self._slices:
            r0, r1 = self._slices[name]
            return self.ckpt.read_rows(self._file_name(name), slice(r0, r1))
        return self.ckpt.read(self._file_name(name))

    def read_rows(self, name: str, rows: npt.NDArray[np.int64] | slice) -> F32Array:
        if parts := self.info(name).parts:
            picked = np.arange(len(parts), dtype=np.int64)[rows]
            return np.stack([self.ckpt.read(parts[e]) for e in np.atleast_1d(picked)])
        if name in self._slices:
            r0, r1 = self._slices[name]
            rows = np.arange(r0, r1, dtype=np.int64)[rows]
        return self.ckpt.read_rows(self._file_name(name), rows)

    def raw(self, name: str) -> npt.NDArray[np.uint8]:
        if parts := self.info(name).parts:
            raise ValidationError(
                f"{self.path}: tensor {name} is stacked from {len(parts)} per-expert tensors "
                "of the file; it has no single byte range"
            )
        data = self.ckpt.raw(self._file_name(name))
        if name not in self._slices:
            return data
        info, (r0, r1) = self.info(name), self._slices[name]
        size = info.nbytes // max(1, r1 - r0)
        return data[r0 * size : r1 * size]

    def raw_range(self, name: str, start: int, stop: int) -> npt.NDArray[np.uint8]:
        """Bytes [start, stop) of `raw(name)`, reading only those."""
        info = self.info(name)
        if info.parts or not 0 <= start <= stop <= info.nbytes:
            raise ValidationError(f"{self.path}: tensor {name} has no bytes [{start}, {stop}) of its own")
        base = 0
        if name in self._slices:
            r0, r1 = self._slices[name]
            base = r0 * (info.nbytes // max(1, r1 - r0))
        return self.ckpt.raw_range(self._file_name(name), base + start, base + stop)

    def tokenizer_spec(self) -> TokenizerSpec | None:
        return self.ckpt.tokenizer_spec()

    def close(self) -> None:
        self.ckpt.close()


def open_model(path: Path | str, *, runtime_only: bool = False) -> Model:
    """Open a model file or HF folder and resolve its family (no tensor data is read).

    With `runtime_only` (a trace by --engine transformers / llama.cpp), an architecture no family declares
    opens as the generic family (models/generic.py): the runtime runs it, the reference engine refuses it.

    >>> m = open_model("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> m.family.name, m.config.n_layers
    ('llama', 30)
    """
    ckpt = open_checkpoint(Path(path))
    try:
        return resolve(ckpt, runtime_only=runtime_only)
    except BaseException:
        ckpt.close()
        raise


def resolve(ckpt: Checkpoint, *, runtime_only: bool = False) -> Model:
    where = str(ckpt.path)
    source = ckpt.source
    found = find_family(source)
    if found is None and runtime_only:
        return _generic(ckpt, where)
    if found is None:
        raise ModelLoadError(
            f"{where}: architecture {source.architecture or '(none)'!r} is not supported "
            f"(supported: {', '.join(supported_names(source.kind))})"
        )
    family, variant = found
    _refuse_config(family, source, where)
    values = read_params(family.params, source, where)
    _check_heads(values, where)
    tensors = {t.name: t for t in ckpt.tensors()}
    if values["n_layers"] > len(tensors):  # before any loop over layers: each needs tensors of its own
        raise FormatError(
            f"{where}: {values['n_layers']} layers, but the file holds only {len(tensors)} tensors"
        )
    provisional = ModelConfig(architecture=variant.name, vocab_size=1, **values)
    by_file = stack_experts(family.roles(provisional), provisional, tensors, where)
    mapped = _map_names(family.roles(provisional), provisional.n_layers, by_file, source.kind)
    present = frozenset(role for role, _ in mapped)
    cfg = family.finish(variant, source, values, present, where)
    embedding = next((name for role, (_, name) in mapped if role == "token_embd.weight"), None)
    if cfg.vocab_size == 0 and embedding is not None and by_file[embedding].shape:
        cfg = dataclasses.replace(cfg, vocab_size=by_file[embedding].shape[0])  # no vocab key or tokens
    roles = {r.name: r for r in family.roles(cfg)}
    infos, slices = _account(roles, mapped, by_file, cfg, where)
    ignored = _ignorable(family, by_file, {i.source_name or i.name for i in infos.values()}, where)
    if source.kind == "gguf":
        _check_gguf_keys(family, source, where)
        gguf_consistency(source, cfg.head_dim, not cfg.moe, where)
    return Model(ckpt, family, variant, cfg, infos, ignored, slices)


def _generic(ckpt: Checkpoint, where: str) -> Model:
    """An unknown architecture for a runtime: common config values only, tensors as the file names them."""
    from apr.models.generic import FAMILY

    values = read_params(FAMILY.params, ckpt.source, where)
    _check_heads(values, where)
    names = frozenset(t.name for t in ckpt.tensors())
    cfg = FAMILY.finish(FAMILY.variants[0], ckpt.source, values, names, where)
    return Model(ckpt, FAMILY, FAMILY.variants[0], cfg, {t.name: t for t in ckpt.tensors()})


def supported_names(kind: str) -> list[str]:
    out: list[str] = []
    for fam in families():
        for v in fam.variants:
            out.extend(v.hf if kind == "hf" else v.gguf or ())
    return sorted(set(out))


def _refuse_config(family: Family, source: ConfigSource, where: str) -> None:
    if source.kind == "gguf":
        return
    for key, why in family.hf_refuse.items():
        value = source.get(key)
        if value is not None and (reason := why(value)) is not None:
            raise ModelLoadError(f"{where}: config '{key}' = {value!r}: {reason} is not implemented")


def _check_heads(values: dict[str, Any], where: str) -> None:
    if values["n_heads"] % values["n_kv_heads"]:
        raise FormatError(
            f"{where}: {values['n_heads']} attention heads are not a multiple of "
            f"{values['n_kv_heads']} key/value heads"
        )
    if values["head_dim"] % 2:
        raise FormatError(f"{where}: head_dim {values['head_dim']} is odd; RoPE pairs need an even one")


def _spellings(role: TensorRole, layer: int | None, kind: str) -> tuple[str, ...]:
    """The file names a role instance may have: GGUF's, HF's, or (for .apr, which holds either, or a split
    import of a fused tensor) the canonical name first."""
    canon = role.name.format(i=layer)
    gguf = role.gguf.format(i=layer) if role.gguf else canon
    hf = tuple(t.format(i=layer, e=EXPERTS) for t in (role.hf, role.hf_alt) if t)
    return {"gguf": (gguf,), "hf": hf, "apr": (canon, gguf, *hf)}[kind]


def _map_names(
    roles: tuple[TensorRole, ...], n_layers: int, by_file: dict[str, TensorInfo], kind: str
) -> Mapped:
    """[(role template, (layer, file name))] for every role instance the file has."""
    found = []
    for role in roles:
        for layer in range(n_layers) if role.per_layer else (None,):
            name = next((s for s in _spellings(role, layer, kind) if s and s in by_file), None)
            if name is not None:
                found.append((role.name, (layer, name)))
    return found


def _account(
    roles: dict[str, TensorRole],
    mapped: Mapped,
    by_file: dict[str, TensorInfo],
    cfg: ModelConfig,
    where: str,
) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]]]:
    """Every role's presence rule and shape; the canonical TensorInfos in file order, and the row ranges of
    the ones that are slices of a fused tensor."""
    layers: dict[str, set[int | None]] = {}
    for template, (layer, _) in mapped:
        layers.setdefault(template, set()).add(layer)
    for role in roles.values():
        have = layers.get(role.name, set())
        want = set(range(cfg.n_layers)) if role.per_layer else {None}
        if have == want or (role.presence == OPTIONAL and not have):
            continue
        missing = sorted(want - have, key=lambda x: -1 if x is None else x)
        what = role.name.format(i=missing[0]) if missing[0] is not None else role.name
        if role.presence == REQUIRED or have:
            raise ModelLoadError(
                f"{where}: tensor {what} is missing"
                + (f" (present in {len(have)} of {len(want)} layers)" if have else "")
            )
    infos: dict[str, TensorInfo] = {}
    slices: dict[str, tuple[int, int]] = {}
    fused: dict[str, int] = {}  # file name → rows its slices cover
    for template, (layer, name) in mapped:
        role, info, canon = roles[template], by_file[name], roles[template].name.format(i=layer)
        want_shape = role.shape(cfg)
        if _same_elements(info.shape, want_shape) or role.rows is None:
            if not _same_elements(info.shape, want_shape):
                raise FormatError(
                    f"{where}: tensor {name} has shape {list(info.shape)}; the config needs "
                    f"{list(want_shape)}"
                )
            source = name if name != canon else ""
            infos[canon] = dataclasses.replace(info, name=canon, source_name=source, shape=want_shape)
            continue
        r0, r1 = role.rows(cfg)
        infos[canon], slices[canon] = _slice(info, canon, r0, r1, want_shape, where), (r0, r1)
        fused[name] = fused.get(name, 0) + r1 - r0
    for name, covered in fused.items():
        if covered != by_file[name].shape[0]:
            raise FormatError(
                f"{where}: fused tensor {name} has {by_file[name].shape[0]} rows; the config splits {covered}"
            )
    order = {n: k for k, n in enumerate(by_file)}
    ordered = dict(sorted(infos.items(), key=lambda kv: order[kv[1].source_name or kv[1].name]))
    return ordered, slices


def _same_elements(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Equal shapes, up to leading 1s: ggml's trailing ne = 1 (llama-quantize writes Qwen2-MoE's [1, D]
    shared-expert gate back as [D]; llama.cpp reads both as ne = (D, 1))."""

    def strip(shape: tuple[int, ...]) -> tuple[int, ...]:
        i = 0
        while i < len(shape) - 1 and shape[i] == 1:
            i += 1
        return shape[i:]

    return strip(have) == strip(want)


def _slice(info: TensorInfo, canon: str, r0: int, r1: int, shape: tuple[int, ...], where: str) -> TensorInfo:
    """Rows [r0, r1) of a fused 2-D tensor as a TensorInfo of their own (its bytes, when rows are whole)."""
    if len(info.shape) != 2 or info.shape[1:] != shape[1:] or r1 > info.shape[0] or shape[0] != r1 - r0:
        raise FormatError(
            f"{where}: fused tensor {info.name} has shape {list(info.shape)}; the config needs "
            f"rows [{r0}, {r1}) of width {shape[1:]}"
        )
    size = row_nbytes(info.qtype, info.shape[1])
    if size is None or size * info.shape[0] != info.nbytes:
        raise ModelLoadError(
            f"{where}: fused tensor {info.name} ({info.qtype.name}) does not store whole rows; "
            "apr cannot split it"
        )
    return dataclasses.replace(
        info,
        name=canon,
        shape=shape,
        offset=info.offset + r0 * size,
        nbytes=(r1 - r0) * size,
        source_name=info.name,
    )


def _ignorable(
    family: Family, by_file: dict[str, TensorInfo], used: set[str], where: str
) -> list[tuple[str, str]]:
    ignored = []
    for name in by_file:
        if name in used:
            continue
        reason = next((ig.reason for ig in family.ignorable if ig.matches(name)), None)
        if reason is None:
            raise ModelLoadError(
                f"{where}: tensor {name} is not used by the {family.name} family's math; "
                "refusing to trace a model apr does not fully understand"
            )
        ignored.append((name, reason))
    return ignored


def _check_gguf_keys(family: Family, source: ConfigSource, where: str) -> None:
    arch = source.architecture
    known = {p.gguf.format(arch=arch) for p in family.params if p.gguf}
    known |= {k.format(arch=arch) for k in (*GGUF_HARMLESS, *family.gguf_keys)}
    for key in source.keys():  # noqa: SIM118 (a ConfigSource is not a mapping)
        if key.startswith(f"{arch}.") and key not in known:
            raise ModelLoadError(
                f"{where}: GGUF key '{key}' is not understood by the {family.name} family; "
                "refusing to trace with math that may ignore it"
            )
