"""`apr export MODEL -o DIR --format safetensors`: an HF folder that transformers loads offline.

Writes config.json, tokenizer.json (+ tokenizer_config.json) and model.safetensors. The folder is replaced
whole (convert/outfolder.py): afterwards it holds exactly these files, and an existing folder is replaced
only when it holds nothing but model-folder files (MODEL_FOLDER_FILES). Tensors are streamed one
at a time (the safetensors header is computed from shapes first), so exporting never holds the model in
memory. Quantized tensors are dequantized exactly (gguf-compatible dequantizers); Q/K rows stored in
GGUF-interleaved order are permuted back to HF order; a tied lm_head is not written (tie_word_embeddings).
A stacked expert tensor (E, out, in) is written as its E per-expert tensors, under the names the family's
roles give them (save_pretrained's: `experts.{e}.w1`), read one expert at a time. config.json is refused
when it holds a value the family's own HF reader refuses (what apr would not open, it does not write).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.atomicfile import atomic_output, write_bytes_atomic
from apr.convert.outfolder import replacing_folder
from apr.convert.outputs import check_output
from apr.errors import FormatError, ValidationError
from apr.formats import names
from apr.formats import tokenizer_spm_json as spm_json
from apr.formats.base import TensorInfo, TokenizerSpec
from apr.formats.config import QKLayout, interleaved_to_hf, qk_heads
from apr.formats.safetensors import CONFIG_JSON, INDEX_FILE, SINGLE_FILE, TOKENIZER_JSON
from apr.formats.tokenizer import Tokenizer, build_tokenizer
from apr.formats.tokenizer_probe import probe_encoders, probe_texts
from apr.models import Model
from apr.models.config import ModelConfig
from apr.models.exchange import hf_config, hf_name
from apr.models.exchange_gguf import ROPE_FREQS, llama3_from_freqs
from apr.models.expert_stacks import expert_names

DTYPES: Final[dict[str, tuple[str, npt.DTypeLike]]] = {"f32": ("F32", "<f4"), "f16": ("F16", "<f2")}
HEADER_ALIGN: Final = 8
TOKENIZER_CONFIG: Final = "tokenizer_config.json"
# What a Hugging Face model folder holds (save_pretrained's files; a hub snapshot's weights, config and
# tokenizer files) and what an earlier export wrote, temp files of a killed one included: an export
# replaces a folder of only these whole; anything else there is the user's, and the export is refused.
MODEL_FOLDER_FILES: Final = frozenset(
    {CONFIG_JSON, "generation_config.json", SINGLE_FILE, INDEX_FILE, "pytorch_model.bin",
     "pytorch_model.bin.index.json", TOKENIZER_JSON, TOKENIZER_CONFIG, "special_tokens_map.json",
     "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
     "chat_template.jinja", "chat_template.json"}
)  # fmt: skip
MODEL_FOLDER_NAMES: Final = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)|\..+\.tmp-.+")


@dataclass(frozen=True, slots=True)
class ExportResult:
    out_dir: Path
    files: list[Path]
    tensors: int
    permuted: list[str]  # tensors whose Q/K rows were put back in HF order
    notes: list[str] = field(default_factory=list)  # what was not exported, and why


def _qk_heads(cfg: ModelConfig, name: str) -> int | None:
    """Heads to un-permute for attn_q / attn_k weights and biases of an interleaved checkpoint."""
    if cfg.qk_layout is not QKLayout.INTERLEAVED:
        return None
    return qk_heads(name, cfg.n_heads, cfg.n_kv_heads)


@dataclass(frozen=True, slots=True)
class Piece:
    """A row block of an HF tensor: a canonical tensor, or one expert of a stacked (E, out, in) one."""

    name: str
    expert: int | None = None


Plan = list[tuple[tuple[Piece, ...], str, tuple[int, ...]]]  # (row blocks, HF name, shape)


UNEXPORTED: Final = "fused expert gate/up stacks (ffn_gate_up_exps)"


def _tensor_plan(ckpt: Model, in_config: frozenset[str]) -> Plan:
    """Every HF tensor to write, in name order: canonical tensors that share an HF name (Phi-3's fused
    qkv_proj, gate_up_proj) are its row blocks, in role order; a stacked expert tensor is E HF tensors.
    Tensors `in_config` are not written: config.json says what they hold."""
    experts = expert_names(ckpt.family.roles(ckpt.config), ckpt.config)
    groups: dict[str, list[tuple[Piece, tuple[int, ...]]]] = {}
    for t in ckpt.tensors():
        if (t.name == names.OUTPUT and ckpt.config.tied_embeddings) or t.name in in_config:
            continue
        for piece, hf, shape in _pieces(ckpt, t, experts.get(t.name)):
            groups.setdefault(hf, []).append((piece, shape))
    plan: Plan = []
    for hf, parts in groups.items():
        rows = sum(shape[0] for _, shape in parts)
        plan.append(
            (tuple(p for p, _ in parts), hf, (rows, *parts[0][1][1:]) if len(parts) > 1 else parts[0][1])
        )
    return sorted(plan, key=lambda p: p[1])


def _pieces(
    ckpt: Model, t: TensorInfo, per_expert: tuple[str, ...] | None
) -> list[tuple[Piece, str, tuple[int, ...]]]:
    """(piece, HF name, shape) of each HF tensor `t` is written as."""
    if per_expert is not None:
        assert len(per_expert) == t.shape[0], (t.name, t.shape)  # accounting checked (E, out, in)
        return [(Piece(t.name, e), hf, t.shape[1:]) for e, hf in enumerate(per_expert)]
    hf = hf_name(ckpt, t.name)
    # a stack of experts without per-expert HF names (transformers 5's fused gate_up_proj) is not split yet
    if hf is None or len(t.shape) > 2:
        raise ValidationError(
            f"tensor {t.name} has no Hugging Face name; cannot export it (apr export writes the "
            f"tensors {ckpt.variant.hf[0]} has: {UNEXPORTED} are not exported yet)"
        )
    return [(Piece(t.name), hf, t.shape)]


def _write_safetensors(path: Path, plan: Plan, read: Callable[[Piece], npt.NDArray[Any]], dt: str) -> None:
    st_dtype, np_dtype = DTYPES[dt]
    itemsize = np.dtype(np_dtype).itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for _, hf, shape in plan:
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[hf] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % HEADER_ALIGN)
    with atomic_output(path) as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for parts, _, shape in plan:
            block = np.concatenate([read(c) for c in parts]) if len(parts) > 1 else read(parts[0])
            f.write(np.ascontiguousarray(block.reshape(shape), dtype=np_dtype).tobytes())


def is_model_folder_file(name: str) -> bool:
    return name in MODEL_FOLDER_FILES or MODEL_FOLDER_NAMES.fullmatch(name) is not None


def export_safetensors(ckpt: Model, out_dir: Path, dtype: str = "f32") -> ExportResult:
    """Write an HF folder for `ckpt` as `out_dir`: created, or an earlier model folder there replaced whole
    (a folder holding other files is refused; a failed or interrupted export leaves it as it was)."""
    check_output(
        ckpt.path,
        out_dir,
        None,
        "a Hugging Face export writes a folder: choose a folder name (a GGUF: NAME.gguf)",
    )
    if not ckpt.variant.hf:
        raise ValidationError(f"cannot export architecture {ckpt.config.architecture!r} to Hugging Face")
    if dtype not in DTYPES:
        raise ValidationError(f"unknown export dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    cfg = ckpt.config
    permuted: list[str] = []

    shift = cfg.norm_offset - ckpt.family.hooks.rms_norm_offset  # HF stores w of the family's (offset + w)

    def read(piece: Piece) -> npt.NDArray[Any]:
        name, e = piece.name, piece.expert
        x = ckpt.read(name) if e is None else ckpt.read_rows(name, slice(e, e + 1))[0]
        if shift and name.endswith("norm.weight"):
            x = x + np.float32(shift)
        heads = _qk_heads(cfg, name)
        if heads is not None:
            permuted.append(name)
            return interleaved_to_hf(x, heads, axis=0)
        return x

    cfg_out, in_config = _stated_config(ckpt)
    plan = _tensor_plan(ckpt, in_config)
    spec = ckpt.tokenizer_spec()
    config = _config_json(ckpt, spec, cfg_out)
    notes: list[str] = []
    with replacing_folder(out_dir, is_model_folder_file) as tmp:
        written = _write_folder(ckpt, tmp, plan, read, dtype, spec, config, notes)
    return ExportResult(out_dir, [out_dir / name for name in written], len(plan), permuted, notes)


def _stated_config(ckpt: Model) -> tuple[ModelConfig, frozenset[str]]:
    """The config the export states, and the tensors it states in their place: a GGUF's Llama 3 rope
    scaling is a rope_freqs tensor (llama.cpp's converter writes no parameters), which transformers
    knows only as rope_scaling. ValidationError when no rope_scaling gives those divisors."""
    cfg = ckpt.config
    if not (cfg.rope_scaling.freq_factors and any(t.name == ROPE_FREQS for t in ckpt.tensors())):
        return cfg, frozenset()
    scaling = llama3_from_freqs(cfg, ckpt.read(ROPE_FREQS))
    if scaling is None:
        raise ValidationError(
            f"cannot export {ROPE_FREQS}: no Llama 3 rope_scaling (factor, low/high_freq_factor, "
            "original_max_position_embeddings) gives its per-frequency divisors"
        )
    return replace(cfg, rope_scaling=scaling), frozenset({ROPE_FREQS})


def _config_json(ckpt: Model, spec: TokenizerSpec | None, cfg: ModelConfig) -> dict[str, Any]:
    """config.json of the export, refused when the family's HF reader would refuse a value of it."""
    bos, eos = (spec.bos_id, spec.eos_id) if spec else (None, None)
    config = hf_config(ckpt, bos, eos, cfg)
    for key, why in ckpt.family.hf_refuse.items():
        value = config.get(key)
        if value is not None and (reason := why(value)) is not None:
            raise ValidationError(
                f"cannot export {ckpt.config.architecture!r} to Hugging Face: its config.json would say "
                f"'{key}' = {value!r}: {reason} is not implemented"
            )
    return config


def _write_folder(
    ckpt: Model,
    folder: Path,
    plan: Plan,
    read: Callable[[Piece], npt.NDArray[Any]],
    dt: str,
    spec: TokenizerSpec | None,
    config: dict[str, Any],
    notes: list[str],
) -> list[str]:
    """Write the folder's files; the names written, in order."""
    _write_safetensors(folder / SINGLE_FILE, plan, read, dt)
    write_bytes_atomic(folder / CONFIG_JSON, (json.dumps(config, indent=2) + "\n").encode())
    written = [SINGLE_FILE, CONFIG_JSON]
    if spec is not None:
        tok = build_tokenizer(spec)
        backend = tok.backend
        if backend is None and spec.model in JSON_BUILDERS:
            backend = JSON_BUILDERS[spec.model](spec, tok, notes)
        elif backend is None:
            notes.append(
                f"tokenizer not exported: a {spec.model} vocabulary cannot be written as tokenizer.json yet"
            )
        if backend is not None:
            written += _write_tokenizer(spec, backend, folder)
    return written


def _spm_backend(spec: TokenizerSpec, tok: Tokenizer, notes: list[str]) -> Any:
    """tokenizer.json's model of a SentencePiece vocab (apr.formats.tokenizer_spm_json), written only when
    it encodes every probe text (apr.formats.tokenizer_probe) to llama.cpp's ids; else None and a note."""
    try:
        built = spm_json.build(spec)
    except FormatError as e:
        notes.append(f"tokenizer not exported: {e}")
        return None
    texts = [*probe_texts(spec, spec), *((f"tie {text!r}", text) for text in built.tie_texts)]
    check = probe_encoders(tok.encode, lambda t: built.backend.encode(t).ids, texts)
    if check.problems:
        notes.append(f"tokenizer not exported: {check.problems[0]}")
        return None
    if check.differ:
        d, at = check.differ[0], check.differ[0].position
        got, want = list(d.b_ids[at : at + 4]), list(d.a_ids[at : at + 4])
        notes.append(
            f"tokenizer not exported: a tokenizer.json would encode the {d.name} probe as {got}… from "
            f"token {at}, where llama.cpp gives {want}…"
        )
        return None
    if built.ambiguous:
        notes.append(
            f"tokenizer.json: {built.ambiguous} of its {built.merges} merges tie with an overlapping one, "
            "which llama.cpp resolves leftmost and tokenizers by rank: each such meeting alone encodes as "
            "llama.cpp does, a longer text might not"
        )
    return built.backend


# vocab models whose `build_tokenizer` has no `tokenizers` backend, and how export makes one
JSON_BUILDERS: Final[dict[str, Callable[[TokenizerSpec, Tokenizer, list[str]], Any]]] = {
    "llama": _spm_backend
}


def _write_tokenizer(spec: TokenizerSpec, backend: Any, out_dir: Path) -> list[str]:
    tj, tc = out_dir / TOKENIZER_JSON, out_dir / TOKENIZER_CONFIG
    write_bytes_atomic(tj, backend.to_str().encode())
    vocab = backend.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    conf: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": spec.add_bos}
    for key, tid in (("bos_token", spec.bos_id), ("eos_token", spec.eos_id)):
        if tid is not None and tid in by_id:
            conf[key] = by_id[tid]
    if spec.chat_template:
        conf["chat_template"] = spec.chat_template
    write_bytes_atomic(tc, (json.dumps(conf, indent=2, ensure_ascii=False) + "\n").encode())
    return [TOKENIZER_JSON, TOKENIZER_CONFIG]
