"""HF checkpoints that store one tensor per expert (`experts.{e}.w1`): each layer's set seen as one stacked
(E, out, in) tensor, as GGUF stores it, whose TensorInfo names its parts (Model reads only the experts
asked for) — and, for `apr export`, the way back: the per-expert HF names a stacked tensor is written as."""

from __future__ import annotations

from typing import Final

from apr.errors import FormatError, ModelLoadError
from apr.formats.base import TensorInfo
from apr.models.base import TensorRole
from apr.models.config import ModelConfig

EXPERTS: Final = "*"  # the expert index in the name of a stacked per-expert tensor


def stack_experts(
    roles: tuple[TensorRole, ...], cfg: ModelConfig, by_file: dict[str, TensorInfo], where: str
) -> dict[str, TensorInfo]:
    """`by_file` with each layer's per-expert tensors of a role spelled with `{e}` (HF: experts.{e}.w1)
    replaced by one stacked TensorInfo (E, out, in), named with `*` for the expert, at the first's place."""
    stacks: dict[str, TensorInfo] = {}
    for template in (t for r in roles for t in (r.hf, r.hf_alt) if "{e}" in t):
        for layer in range(cfg.n_layers):
            # one tensor per expert: past the file's tensor count they are all missing anyway
            names = [template.format(i=layer, e=e) for e in range(min(cfg.n_experts, len(by_file) + 1))]
            have = [by_file[n] for n in names if n in by_file]
            if not have:
                continue
            if cfg.n_experts > len(by_file):
                raise FormatError(
                    f"{where}: {cfg.n_experts} experts, but the file holds only {len(by_file)} tensors"
                )
            stacked = template.format(i=layer, e=EXPERTS)
            if len(have) < len(names):
                missing = next(n for n in names if n not in by_file)
                raise ModelLoadError(
                    f"{where}: tensor {missing} is missing ({len(have)} of {len(names)} experts present)"
                )
            if len({(t.qtype, t.shape) for t in have}) > 1:
                raise FormatError(f"{where}: tensors {stacked} differ in type or shape between experts")
            first = have[0]
            nbytes = sum(t.nbytes for t in have)
            stacks[names[0]] = TensorInfo(
                stacked, first.qtype, (len(names), *first.shape), first.offset, nbytes, parts=tuple(names)
            )
    stacked_parts = {p for t in stacks.values() for p in t.parts}
    out: dict[str, TensorInfo] = {}
    for name, info in by_file.items():
        if name in stacks:
            out[stacks[name].name] = stacks[name]
        elif name not in stacked_parts:
            out[name] = info
    return out


def expert_names(roles: tuple[TensorRole, ...], cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """The inverse of `stack_experts`: each stacked canonical tensor of a role whose HF spelling is per
    expert (`hf` has `{e}`: what save_pretrained writes) → its experts' HF names, in expert order."""
    return {
        role.name.format(i=layer): tuple(role.hf.format(i=layer, e=e) for e in range(cfg.n_experts))
        for role in roles
        if "{e}" in role.hf
        for layer in range(cfg.n_layers)
    }
