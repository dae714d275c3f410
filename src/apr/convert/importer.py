"""`apr import MODEL.gguf -o MODEL.apr` (aprender's GGUF → APR import, spec §8) and `apr convert` (APR → APR).

Exact by default.

- Names: Qwen2/Qwen3 tensors get HF names (`qwen2_map_name`), LLaMA keeps GGUF names, as aprender does.
- Types: F32, F16, BF16, Q4_K and Q6_K bytes pass through unchanged. Any other type is stored as the F32 of
  its exact dequantized values (aprender refuses these), unless `quantize` asks for Q4_K / Q6_K / Q8_0 —
  then every weight of 2 or more dims (matrices, and MoE expert stacks (E, rows, cols) as aprender's
  `dispatch_quantize` does: it skips norms, biases and tiny tensors, never by shape) is (re)quantized
  row by row, as the type that fits its rows (`fitting_type`); 1-D norms and biases stay F32.
- Tied embeddings: with no output.weight, the embedding is copied as lm_head.weight (tied_embeddings).
- Completeness gate (GH-279): the family's strict tensor accounting (apr.models) — every role present,
  every tensor understood — runs when the source is opened.
Tensors are read and written one at a time; the result says which tensors were converted and how.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np

from apr.convert.outputs import check_output
from apr.errors import FormatError, ValidationError
from apr.formats import names
from apr.formats.aprcodec import CODE_OF
from apr.formats.aprwrite import AprTensor, metadata_for, write_apr
from apr.formats.base import TensorInfo
from apr.models import Model, open_model
from apr.models.exchange import apr_keys, hf_name
from apr.quant import quantize
from apr.quant.quantize import fitting_type
from apr.quant.types import QuantType

PASSTHROUGH: Final = frozenset({QuantType.F32, QuantType.F16, QuantType.BF16, QuantType.Q4_K, QuantType.Q6_K})
QUANTIZE_TARGETS: Final = {"q4_k": QuantType.Q4_K, "q6_k": QuantType.Q6_K, "q8_0": QuantType.Q8_0}
LM_HEAD_NAME: Final = "lm_head.weight"
APR_STORABLE: Final = frozenset(CODE_OF)  # .apr has no code for Q5_0: Q4_K falls back to Q8_0 there


@dataclass
class ImportResult:
    out: Path
    tensors: int = 0
    passthrough: list[str] = field(default_factory=list)
    converted: list[tuple[str, str, str]] = field(default_factory=list)  # (name, from type, to type)
    tied_lm_head: bool = False
    wanted: str | None = None  # the --quantize type
    matrices: list[tuple[str, int, str]] = field(default_factory=list)  # (name, row length, type) ≥ 2-D


def _stored_name(model: Model, canonical: str) -> str:
    if not model.variant.apr_hf_names:
        return canonical
    return hf_name(model, canonical) or canonical


def _target(t: TensorInfo, want: QuantType | None) -> QuantType:
    """The type `t` is stored as: requantized (a matrix or expert stack; as llama-quantize, another type
    when its rows do not fit the requested one's blocks), passthrough, or F32 of its exact values."""
    if want is not None and len(t.shape) >= 2:
        return fitting_type(want, t.shape[-1], APR_STORABLE)
    return t.qtype if t.qtype in PASSTHROUGH else QuantType.F32


def _producer(ckpt: Model, t: TensorInfo, to: QuantType) -> Callable[[], object]:
    if to == t.qtype:
        return lambda: ckpt.raw(t.name)
    if to == QuantType.F32:
        return lambda: np.ascontiguousarray(ckpt.read(t.name), dtype="<f4")
    return lambda: quantize(ckpt.read(t.name), to)


def _quant_target(quantize_to: str | None) -> QuantType | None:
    if quantize_to is None:
        return None
    if quantize_to.lower() not in QUANTIZE_TARGETS:
        raise ValidationError(
            f"--quantize {quantize_to}: an .apr file takes {', '.join(QUANTIZE_TARGETS)} "
            "(other types: a .gguf output)"
        )
    return QUANTIZE_TARGETS[quantize_to.lower()]


def _open_as(src: Path, fmt: str, command: str) -> Model:
    model = open_model(src)
    if model.format_name != fmt:
        raise FormatError(f"{src}: apr {command} reads {fmt} files; this is {model.format_name}")
    return model


def import_gguf(src: Path, out: Path, quantize_to: str | None = None) -> ImportResult:
    """Convert a GGUF to .apr v2 with aprender's names (see the module docstring for the rules)."""
    check_output(src, out, "apr", "apr import writes an .apr file: choose a name ending in .apr")
    model = _open_as(src, "gguf", "import")
    return write_converted(model, out, _quant_target(quantize_to), lambda t: _stored_name(model, t.name))


def convert_apr(src: Path, out: Path, quantize_to: str | None = None) -> ImportResult:
    """`apr convert`: any model → .apr, tensors (re)quantized as asked; an .apr keeps its stored names,
    another format gets the names `apr import` gives."""
    check_output(
        src,
        out,
        "apr",
        "apr convert writes an .apr file, or a GGUF for -o NAME.gguf (a Hugging Face folder: apr export)",
    )
    want = _quant_target(quantize_to)
    ckpt = open_model(src)
    if ckpt.format_name == "apr":
        return write_converted(ckpt, out, want, lambda t: t.source_name or t.name)
    return write_converted(ckpt, out, want, lambda t: _stored_name(ckpt, t.name))


def write_converted(
    ckpt: Model, out: Path, want: QuantType | None, stored: Callable[[TensorInfo], str]
) -> ImportResult:
    """Write `ckpt` as .apr v2: each tensor passed through, requantized to `want`, or stored as exact F32."""
    result = ImportResult(out, wanted=want.name if want is not None else None)
    tensors: list[AprTensor] = []
    sources = list(ckpt.tensors())
    for t in sources:
        to = _target(t, want)
        if want is not None and len(t.shape) >= 2:
            result.matrices.append((t.name, t.shape[-1], to.name))
        tensors.append(AprTensor(stored(t), to, t.shape, _producer(ckpt, t, to)))  # type: ignore[arg-type]
        if to == t.qtype:
            result.passthrough.append(t.name)
        else:
            result.converted.append((t.name, t.qtype.name, to.name))
    if names.OUTPUT not in {t.name for t in sources}:
        result.tied_lm_head = True
        emb = ckpt.info(names.TOKEN_EMBD)
        to = _target(emb, want)
        tensors.append(AprTensor(LM_HEAD_NAME, to, emb.shape, _producer(ckpt, emb, to)))  # type: ignore[arg-type]
    meta = metadata_for(apr_keys(ckpt), ckpt.tokenizer_spec(), shapes={x.name: x.shape for x in tensors})
    write_apr(out, tensors, meta)
    result.tensors = len(tensors)
    return result
