"""`apr export MODEL -o x.gguf --format gguf` / `apr convert MODEL -o x.gguf`: a GGUF llama.cpp runs.

Written with gguf-py's `GGUFWriter`, streamed: every tensor's info is declared from shapes and types first,
then tensors are read, transformed and written one at a time, so the model is never held in memory.

- Metadata: the family's `{arch}.*` keys from the same parameter tables the reader uses
  (models/exchange_gguf.py); the tokenizer as `tokenizer.ggml.*` (tokens, types, merges or SentencePiece
  scores, BOS/EOS and their add flags, FIM ids, chat template).
- Tensors under their GGUF names; rows of tensors a GGUF stores fused (Phi-3's attn_qkv, ffn_up) joined
  again; Q/K rows permuted to llama.cpp's interleaved order for NORM-rope architectures when the source
  holds them in HF order; Gemma's norms stored as 1 + w; Llama 3 rope scaling as `rope_freqs.weight`.
- Types: 1-D tensors stay F32 (as llama.cpp's converter keeps them); every other tensor becomes the
  requested type, or what llama-quantize stores when its rows are not whole blocks of that type (Q4_K →
  Q5_0, Q6_K → Q8_0, then F16; quant/quantize.py `fitting_type`). A
  tensor already stored as the chosen type is copied byte for byte (its rows permuted or joined as above).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.convert.outputs import check_output
from apr.errors import AprIOError, FeatureDisabledError, ValidationError
from apr.formats import gguf_meta as keys
from apr.formats.base import TokenizerSpec
from apr.formats.config import QKLayout, hf_to_interleaved, interleaved_to_hf, qk_heads
from apr.models import Model
from apr.models.base import ROPE_NORM
from apr.models.exchange_gguf import ROPE_FREQS, gguf_architecture, gguf_metadata, rope_freqs
from apr.quant import quantize, row_nbytes
from apr.quant.quantize import fitting_type
from apr.quant.types import QuantType

GGUF_TYPES: Final = {
    "f32": QuantType.F32,
    "f16": QuantType.F16,
    "bf16": QuantType.BF16,
    "q8_0": QuantType.Q8_0,
    "q4_k": QuantType.Q4_K,
    "q6_k": QuantType.Q6_K,
}
SPM_BYTE_TOKEN: Final = "<0x00>"  # an HF vocab holding SentencePiece byte-fallback tokens is an SPM vocab
PAD_TYPE: Final = 4  # user-defined: the converter's type for the [PAD{i}] tokens that fill a vocab
NORMAL, UNKNOWN, BYTE = 1, 2, 6
SPM_UNK: Final = "<unk>"
BYTE_TOKEN: Final = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece's byte-fallback pieces


@dataclass(frozen=True, slots=True)
class GgufTensor:
    name: str  # GGUF name
    parts: tuple[str, ...]  # canonical tensors it is made of, in row order ((): rope_freqs computed here)
    shape: tuple[int, ...]
    qtype: QuantType


@dataclass
class GgufExportResult:
    out: Path
    architecture: str
    tensors: int = 0
    types: dict[str, str] = field(default_factory=dict)  # GGUF name → type written
    copied: list[str] = field(default_factory=list)  # written byte for byte from the source
    fallback: list[tuple[str, str, str]] = field(default_factory=list)  # (name, wanted, written): rows
    permuted: list[str] = field(default_factory=list)  # Q/K rows put in GGUF order
    notes: list[str] = field(default_factory=list)


def export_gguf(model: Model, out: Path, dtype: str = "f32") -> GgufExportResult:
    """Write `model` as a GGUF file at `out` (atomically: a failed export leaves nothing behind)."""
    check_output(model.path, out, "gguf", "a GGUF export writes a .gguf file")
    if dtype.lower() not in GGUF_TYPES:
        raise ValidationError(f"unknown GGUF type {dtype!r} (choose from {', '.join(GGUF_TYPES)})")
    try:
        import gguf
    except ImportError:
        raise FeatureDisabledError("--format gguf", "gguf") from None
    arch = gguf_architecture(model)
    result = GgufExportResult(out, arch)
    plan = _plan(model, GGUF_TYPES[dtype.lower()], result)
    writer = gguf.GGUFWriter(None, arch)
    _add_metadata(writer, gguf, model, result)
    for t in plan:  # declared as bytes (rows × bytes per row), as gguf-py declares quantized tensors
        row = _row_bytes(t)
        byte_shape = (*t.shape[:-1], row)
        nbytes = row * int(np.prod(t.shape[:-1], dtype=np.int64))
        writer.add_tensor_info(
            t.name, byte_shape, np.dtype(np.uint8), nbytes, gguf.GGMLQuantizationType(t.qtype)
        )
    produce = _producer(model, result)
    with _replacing(out) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            writer.write_tensor_data(produce(t))
        writer.close()
    result.tensors = len(plan)
    result.types = {t.name: t.qtype.name for t in plan}
    return result


@contextlib.contextmanager
def _replacing(out: Path) -> Any:
    """A temp path beside `out`, renamed over it on success and removed on failure; errors name `out`."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(name, 0o666 & ~mask)  # mkstemp makes 0600; give the file the permissions open() would
    except OSError as e:
        raise AprIOError(f"cannot write {out}: {e.strerror or e}") from e
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise AprIOError(f"cannot write {out}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- which tensors, under which names and types ---------------------------------------------------


def _gguf_place(model: Model, canonical: str) -> tuple[str, int]:
    """(GGUF name, first row in it) of a canonical tensor: a fused role is rows of another tensor."""
    layer, key = _template(canonical)
    for role in model.family.roles(model.config):
        if role.name == key and role.gguf:
            r0 = role.rows(model.config)[0] if role.rows else 0
            return role.gguf.format(i=layer), r0
    return canonical, 0


def _template(canonical: str) -> tuple[int | None, str]:
    parts = canonical.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit():
        return int(parts[1]), f"blk.{{i}}.{parts[2]}"
    return None, canonical


def _plan(model: Model, want: QuantType, result: GgufExportResult) -> list[GgufTensor]:
    groups: dict[str, list[tuple[int, str]]] = {}
    for t in model.tensors():
        name, r0 = _gguf_place(model, t.name)
        groups.setdefault(name, []).append((r0, t.name))
    plan = []
    for name, rows in groups.items():
        parts = tuple(c for _, c in sorted(rows))
        first = model.info(parts[0]).shape
        shape = (sum(model.info(c).shape[0] for c in parts), *first[1:]) if len(parts) > 1 else first
        plan.append(GgufTensor(name, parts, shape, _qtype(name, shape, want, result)))
    if (freqs := rope_freqs(model.config)) is not None:
        plan.append(GgufTensor(ROPE_FREQS, (), freqs.shape, QuantType.F32))
    return plan


def _qtype(name: str, shape: tuple[int, ...], want: QuantType, result: GgufExportResult) -> QuantType:
    if len(shape) < 2:
        return QuantType.F32
    qtype = fitting_type(want, shape[-1])
    if qtype != want:
        result.fallback.append((name, want.name, qtype.name))
    return qtype


def _row_bytes(t: GgufTensor) -> int:
    per_row = row_nbytes(t.qtype, t.shape[-1])
    assert per_row is not None, t
    return per_row


# ---- tensor data ------------------------------------------------------------------------------------


def _producer(model: Model, result: GgufExportResult) -> Callable[[GgufTensor], npt.NDArray[np.uint8]]:
    cfg = model.config
    shift = np.float32(cfg.norm_offset)  # a GGUF stores the weight its norm multiplies by (Gemma: 1 + w)
    permute = model.variant.rope == ROPE_NORM and cfg.qk_layout is QKLayout.HF
    unpermute = model.variant.rope != ROPE_NORM and cfg.qk_layout is QKLayout.INTERLEAVED

    def rows(canonical: str, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        heads = _qk_heads(model, canonical)
        if heads is None or not (permute or unpermute):
            return x
        result.permuted.append(canonical)
        return (hf_to_interleaved if permute else interleaved_to_hf)(x, heads, axis=0)

    def part(canonical: str, qtype: QuantType) -> npt.NDArray[np.uint8]:
        info = model.info(canonical)
        shifted = bool(shift) and canonical.endswith("norm.weight")
        if info.qtype == qtype and not info.parts and not shifted:
            raw = np.asarray(model.raw(canonical), dtype=np.uint8)
            result.copied.append(canonical)
            return rows(canonical, raw.reshape(info.shape[0], -1))
        x = model.read(canonical)
        if shifted:
            x = x + shift
        return quantize(rows(canonical, x), qtype).reshape(info.shape[0], -1)

    def produce(t: GgufTensor) -> npt.NDArray[np.uint8]:
        if not t.parts:
            freqs = rope_freqs(cfg)
            assert freqs is not None
            return quantize(freqs, QuantType.F32).reshape(-1)
        blocks = [part(c, t.qtype) for c in t.parts]
        return np.ascontiguousarray(np.concatenate(blocks) if len(blocks) > 1 else blocks[0]).reshape(-1)

    return produce


def _qk_heads(model: Model, canonical: str) -> int | None:
    layer, key = _template(canonical)
    cfg = model.config
    return qk_heads(key, cfg.n_heads, cfg.n_kv_heads) if layer is not None else None


# ---- metadata ---------------------------------------------------------------------------------------


def _add_metadata(writer: Any, gguf: Any, model: Model, result: GgufExportResult) -> None:
    spec = model.tokenizer_spec()
    name = (spec.model_name if spec else None) or model.metadata.get(keys.MODEL_NAME) or model.path.stem
    writer.add_string(keys.MODEL_NAME, str(name))
    for key, value in gguf_metadata(model).items():
        _add(writer, gguf, key, value)
    if spec is None:
        result.notes.append("no tokenizer in the source: the GGUF has none (llama.cpp will refuse it)")
        return
    for key, value in tokenizer_metadata(spec, model.config.vocab_size, result.notes).items():
        _add(writer, gguf, key, value)


def _add(writer: Any, gguf: Any, key: str, value: Any) -> None:
    vt = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_key_value(key, value, vt.BOOL)
    elif isinstance(value, int):
        writer.add_key_value(key, value, vt.UINT32)
    elif isinstance(value, float):
        writer.add_key_value(key, value, vt.FLOAT32)
    elif isinstance(value, str):
        writer.add_key_value(key, value, vt.STRING)
    else:
        writer.add_array(key, list(value))


def _spm_type(token: str, hf_type: int) -> int:
    """The GGUF type of an HF SentencePiece piece: byte pieces BYTE, `<unk>` UNKNOWN (as the converter)."""
    if token == SPM_UNK:
        return UNKNOWN
    return BYTE if hf_type == NORMAL and BYTE_TOKEN.fullmatch(token) else hf_type


# llama.cpp pre-tokenizers tried first for an HF byte-level BPE vocabulary, then every other one it has
PRE_FIRST: Final = (
    "default", "llama-bpe", "qwen2", "qwen35", "deepseek-v3", "smollm", "olmo", "dbrx", "tekken"
)  # fmt: skip


def gguf_pre(spec: TokenizerSpec, types: list[int]) -> str:
    """The llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) under which the GGUF's byte-level BPE encodes
    the probe texts (apr.formats.tokenizer_probe) exactly as the HF tokenizer does — llama.cpp's converter
    picks it likewise, by the ids of a test text. ValidationError when none does: a GGUF that tokenizes
    differently from its source is never written."""
    from apr.formats.tokenizer_pre import PRE_TOKENIZERS
    from apr.formats.tokenizer_probe import probe_tokenizers

    base = replace(spec, model="gpt2", token_types=types, json_path=None)
    tried: list[str] = []
    first = None
    for pre in dict.fromkeys([*PRE_FIRST, *sorted(PRE_TOKENIZERS)]):
        if pre not in PRE_TOKENIZERS and pre != "default":
            continue
        check = probe_tokenizers(spec, replace(base, pre=pre))
        if check.compared and not check.differ and not check.problems:
            return pre
        first = first or check
        tried.append(pre)
    probe = None if first is None or not first.differ else first.differ[0].name
    shown = "" if probe is None else f" (with 'default', the {probe!r} probe differs)"
    raise ValidationError(
        f"no llama.cpp pre-tokenizer encodes like this tokenizer.json{shown}, of the {len(tried)} tried: "
        "a GGUF of it would tokenize differently from its source, so none is written"
    )


def tokenizer_metadata(spec: TokenizerSpec, vocab_size: int, notes: list[str]) -> dict[str, Any]:
    """The `tokenizer.ggml.*` keys of a tokenizer, padded to the model's vocabulary as the converter pads."""
    tokens, types = list(spec.tokens), list(spec.token_types) or [NORMAL] * len(spec.tokens)
    model = spec.model
    if model == "tokenizer.json":  # an HF folder: SentencePiece (byte fallback) or byte-level BPE
        model = keys.SPM if SPM_BYTE_TOKEN in tokens else "gpt2"
        if model == keys.SPM:  # tokenizer.json has no types for byte pieces; GGUF marks them BYTE
            types = [_spm_type(tok, t) for tok, t in zip(tokens, types, strict=True)]
        pre = "default" if model == keys.SPM else gguf_pre(spec, types)
        notes.append(
            f"tokenizer written as GGUF {model!r} from tokenizer.json"
            + (": scores from token order" if model == keys.SPM else f": pre-tokenizer {pre!r}")
        )
    scores = list(spec.scores) or [
        -float(i) if t == NORMAL else 0.0 for i, t in enumerate(types)
    ]  # SentencePiece BPE ranks pieces by score; an HF vocab lists them in that order
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(PAD_TYPE)
        scores.append(0.0)
    out: dict[str, Any] = {
        keys.TOKENIZER_MODEL: model,
        keys.TOKENIZER_PRE: spec.pre if spec.model == "gpt2" else pre if model == "gpt2" else "default",
        keys.TOKENS: tokens,
        keys.TOKEN_TYPE: types,
    }
    if model == keys.SPM:
        out[keys.SCORES] = scores
        out[keys.ADD_SPACE_PREFIX] = spec.add_space_prefix or spec.model == "tokenizer.json"
        if UNKNOWN in types:
            out["tokenizer.ggml.unknown_token_id"] = types.index(UNKNOWN)
    elif spec.merges:
        out[keys.MERGES] = list(spec.merges)
    for key, tid in ((keys.BOS_ID, spec.bos_id), (keys.EOS_ID, spec.eos_id)):
        if tid is not None:
            out[key] = tid
    out[keys.ADD_BOS], out[keys.ADD_EOS] = spec.add_bos, spec.add_eos
    for marker, tid in spec.fim_ids.items():
        out[keys.FIM_KEYS[marker][0]] = tid
    if spec.chat_template:
        out[keys.CHAT_TEMPLATE] = spec.chat_template
    return out
