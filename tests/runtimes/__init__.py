"""Helpers shared by the runtime oracle tests: a recording tap, canonical shapes, tiny GGUFs, one cached
transformers run of SmolLM2 (loading the GGUF in transformers takes ~20 s; both test modules reuse it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apr.formats.config import QKLayout, interleaved_to_hf
from apr.runtimes import RuntimeRun, run_transformers
from apr.runtimes.base import model_stages
from apr.stages import Stage, StageId

PROMPT = "What is 2+2?"
PROMPT_IDS = (1780, 314, 216, 34, 27, 34, 47)


@dataclass(frozen=True)
class Dims:
    d: int  # hidden
    h: int  # heads
    hkv: int
    dh: int  # head_dim
    i: int  # ffn
    v: int  # vocab
    layers: int


SMOLLM2 = Dims(d=576, h=9, hkv=3, dh=64, i=1536, v=49152, layers=30)


@dataclass
class Recorder:
    """A Tap that keeps everything, and the order it came in."""

    order: list[StageId] = field(default_factory=list)
    arrays: dict[StageId, np.ndarray] = field(default_factory=dict)

    def __call__(self, sid: StageId, value: Any, /) -> None:
        self.order.append(sid)
        self.arrays[sid] = value

    def stages(self) -> set[Stage]:
        return {sid.stage for sid in self.order}


def canonical_shape(stage: Stage, s: int, m: Dims) -> tuple[int, ...]:
    qkv = m.h * m.dh + 2 * m.hkv * m.dh
    shapes = {
        Stage.QKV_MATMUL: (s, qkv),
        Stage.QKV_BIAS: (s, qkv),
        Stage.Q_POST_ROPE: (s, m.h * m.dh),
        Stage.K_POST_ROPE: (s, m.hkv * m.dh),
        Stage.ATTN_SCORES: (m.h, s, s),
        Stage.ATTN_SOFTMAX: (m.h, s, s),
        Stage.ATTENTION: (s, m.h * m.dh),
        Stage.FFN_GATE: (s, m.i),
        Stage.FFN_UP: (s, m.i),
        Stage.FFN_SILU: (s, m.i),
        Stage.FFN_SWIGL: (s, m.i),
        Stage.LM_HEAD: (s, m.v),
    }
    return shapes.get(stage, (s, m.d))


def expected_order(n_layers: int, *, qkv_bias: bool, lacking: set[Stage]) -> list[StageId]:
    stages = [s for s in model_stages(qkv_bias=qkv_bias) if s not in lacking]
    ids = [StageId(Stage.EMBEDDING, 0)] if Stage.EMBEDDING in stages else []
    for layer in range(n_layers):
        per_layer = (s for s in stages if s.per_layer and s is not Stage.EMBEDDING)
        ids += [StageId(s, layer) for s in per_layer]
    ids += [StageId(s) for s in stages if not s.per_layer]
    assert ids == sorted(ids, key=lambda sid: sid.sort_key)
    return ids


def to_hf_order(sid: StageId, x: np.ndarray, layout: QKLayout, m: Dims) -> np.ndarray:
    """Put a Q/K-derived stage into HF row order (per head; for [Q|K|V] only the Q and K segments)."""
    if layout is QKLayout.HF:
        return x
    q, k = m.h * m.dh, m.hkv * m.dh
    if sid.stage is Stage.Q_POST_ROPE:
        return interleaved_to_hf(x, m.h)
    if sid.stage is Stage.K_POST_ROPE:
        return interleaved_to_hf(x, m.hkv)
    if sid.stage in (Stage.QKV_MATMUL, Stage.QKV_BIAS):
        parts = interleaved_to_hf(x[:, :q], m.h), interleaved_to_hf(x[:, q : q + k], m.hkv), x[:, q + k :]
        return np.concatenate(parts, axis=-1)
    return x


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a−b| / max|b| (b the reference)."""
    return float(np.abs(a.astype(np.float64) - b).max() / max(float(np.abs(b).max()), 1e-30))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64) or 1.0))


@functools.cache
def transformers_run(model_path: Path, token_ids: tuple[int, ...]) -> tuple[RuntimeRun, Recorder]:
    """One transformers capture per process per (model, prompt)."""
    rec = Recorder()
    return run_transformers(model_path, token_ids, rec), rec


# -- tiny random GGUFs that both transformers and llama.cpp load -------------------------------------


def _byte_level_vocab() -> list[str]:
    """GPT-2's bytes_to_unicode alphabet: 256 single-character tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + n) for n in range(len(others))]


TINY_DIMS = {
    "llama": Dims(d=64, h=4, hkv=2, dh=16, i=96, v=257, layers=2),
    "qwen2": Dims(d=64, h=4, hkv=2, dh=16, i=96, v=257, layers=2),
    # transformers' GGUF reader ignores qwen3.attention.key_length and assumes head_dim 128
    "qwen3": Dims(d=64, h=2, hkv=1, dh=128, i=96, v=257, layers=2),
}


def write_tiny_gguf(path: Path, arch: str, seed: int = 0) -> Path:
    """A random 2-layer F32 GGUF of `arch` (llama, qwen2 with q/k/v bias, qwen3 with q/k norm)."""
    from gguf import GGUFWriter

    m, rng = TINY_DIMS[arch], np.random.default_rng(seed)
    tokens = [*_byte_level_vocab(), "ĠĠ"]
    assert len(tokens) == m.v

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return 1 + rand(n, scale=0.1)

    w = GGUFWriter(path, arch=arch)
    w.add_context_length(128)
    w.add_block_count(m.layers)
    w.add_embedding_length(m.d)
    w.add_feed_forward_length(m.i)
    w.add_head_count(m.h)
    w.add_head_count_kv(m.hkv)
    w.add_key_length(m.dh)
    w.add_value_length(m.dh)
    w.add_rope_dimension_count(m.dh)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(m.v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * m.v)
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_tensor("token_embd.weight", rand(m.v, m.d, scale=1.0))
    for b in range(m.layers):
        p = f"blk.{b}."
        w.add_tensor(p + "attn_norm.weight", norm(m.d))
        w.add_tensor(p + "attn_q.weight", rand(m.h * m.dh, m.d))
        w.add_tensor(p + "attn_k.weight", rand(m.hkv * m.dh, m.d))
        w.add_tensor(p + "attn_v.weight", rand(m.hkv * m.dh, m.d))
        if arch == "qwen2":
            w.add_tensor(p + "attn_q.bias", rand(m.h * m.dh))
            w.add_tensor(p + "attn_k.bias", rand(m.hkv * m.dh))
            w.add_tensor(p + "attn_v.bias", rand(m.hkv * m.dh))
        if arch == "qwen3":
            w.add_tensor(p + "attn_q_norm.weight", norm(m.dh))
            w.add_tensor(p + "attn_k_norm.weight", norm(m.dh))
        w.add_tensor(p + "attn_output.weight", rand(m.d, m.h * m.dh))
        w.add_tensor(p + "ffn_norm.weight", norm(m.d))
        w.add_tensor(p + "ffn_gate.weight", rand(m.i, m.d))
        w.add_tensor(p + "ffn_up.weight", rand(m.i, m.d))
        w.add_tensor(p + "ffn_down.weight", rand(m.d, m.i))
    w.add_tensor("output_norm.weight", norm(m.d))
    w.add_tensor("output.weight", rand(m.v, m.d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
