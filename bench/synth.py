"""Synthetic GGUF models of any size from a seed: real shapes, random but sane Q4_K_M weights, real tokenizer.

    .venv/bin/python bench/synth.py --preset 7b -o ~/.cache/apr/bench/synth-7b-qwen2-s0.gguf
    .venv/bin/python bench/synth.py --preset tiny --layers 4 -o /tmp/tiny.gguf

The file is a Qwen2 (q/k/v biases, NEOX RoPE), LLaMA or Qwen3-MoE (QK-norm, merged 3-D expert tensors, an
F32 router; preset 30b-a3b) GGUF that llama.cpp and apr both load. Tensor types
follow llama.cpp's Q4_K_M mix (`llama_tensor_get_type` in llama-quant.cpp): Q4_K everywhere, except Q6_K for
`output.weight` and for `attn_v` / `ffn_down` in the layers where `use_more_bits` holds; token_embd stays
Q4_K (untied embeddings), norms and biases F32.

Blocks are written as bytes, not quantized from values: random quants, with the f16 super-block scales
chosen so that every weight is ~N(0, `std`)-sized with zero mean (Q4_K: all sub-block mins equal their
scales and dmin = 7.5·d, the mean of a uniform 4-bit quant), which keeps activations finite through
any number of layers. Norm weights are 1 ± 10 %, biases N(0, `std`).

The tokenizer section is SmolLM2's byte-level BPE (49152 tokens, merges, `tokenizer.ggml.pre = smollm`,
read from the test fixture with apr's reader), padded to the vocab size with `[PAD{i}]` tokens of type
UNUSED, as convert_hf_to_gguf pads Qwen vocabularies.

Writing streams: the header and tensor index first (gguf.GGUFWriter), then each tensor's bytes in chunks
of ~`CHUNK_BYTES`, so memory stays at one chunk whatever the model size. The same seed gives the same bytes,
and each tensor has its own random stream (seed, tensor index).
A 7B file (4.4 GiB) takes about a minute to write here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np
import numpy.typing as npt

from apr.formats.gguf import open_gguf
from apr.quant import QuantType
from apr.quant.types import QUANT_LAYOUT

U8Array = npt.NDArray[np.uint8]
CHUNK_BYTES: Final = 32 << 20
FILE_TYPE_Q4_K_M: Final = 15  # llama_ftype LLAMA_FTYPE_MOSTLY_Q4_K_M
TOKEN_TYPE_UNUSED: Final = 5


@dataclass(frozen=True, slots=True)
class Shape:
    arch: str  # "qwen2" (q/k/v biases) or "llama"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    context: int = 32768
    key_length: int = 0  # head_dim when it is not hidden / heads (Qwen3)
    experts: int = 0  # > 0: a qwen3moe (QK-norm, routed FFN of `experts` experts, `ffn` wide each)
    experts_used: int = 0

    @property
    def head_dim(self) -> int:
        return self.key_length or self.hidden // self.heads


SEVEN_B: Final = Shape("qwen2", 3584, 28, 28, 4, 18944, 152064)  # Qwen2.5(-Coder)-7B
# Qwen3-30B-A3B: 128 experts of FFN width 768, 8 per token
QWEN3_30B_A3B: Final = Shape(
    "qwen3moe", 2048, 48, 32, 4, 768, 151936, key_length=128, experts=128, experts_used=8
)
PRESETS: Final[dict[str, Shape]] = {
    "tiny": Shape("qwen2", 256, 2, 4, 2, 512, 49152),
    "1.5b": Shape("qwen2", 1536, 28, 12, 2, 8960, 151936),  # Qwen2.5-1.5B
    "7b": SEVEN_B,
    "70b": Shape("llama", 8192, 80, 64, 8, 28672, 128256, rope_theta=500_000.0, rms_eps=1e-5),  # LLaMA-3-70B
    "30b-a3b": QWEN3_30B_A3B,
}


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, cols) for matrices
    qtype: QuantType
    kind: str  # "matrix", "norm", "bias" or "router"

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape))
        return QUANT_LAYOUT[self.qtype].nbytes(n)


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp: the layers whose attn_v / ffn_down Q4_K_M makes Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensors(s: Shape) -> list[Tensor]:
    """Every tensor of the model, in file order, with its Q4_K_M type."""
    q4, q6, f32 = QuantType.Q4_K, QuantType.Q6_K, QuantType.F32
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    out = [Tensor("token_embd.weight", (s.vocab, s.hidden), q4, "matrix")]
    for i in range(s.layers):
        more = q6 if use_more_bits(i, s.layers) else q4
        p = f"blk.{i}."
        out.append(Tensor(p + "attn_norm.weight", (s.hidden,), f32, "norm"))
        for proj, rows, qtype in (("q", q, q4), ("k", kv, q4), ("v", kv, more)):
            out.append(Tensor(p + f"attn_{proj}.weight", (rows, s.hidden), qtype, "matrix"))
            if s.arch == "qwen2":
                out.append(Tensor(p + f"attn_{proj}.bias", (rows,), f32, "bias"))
        if s.experts:
            out += [Tensor(p + f"attn_{n}_norm.weight", (s.head_dim,), f32, "norm") for n in ("q", "k")]
        out += [
            Tensor(p + "attn_output.weight", (s.hidden, q), q4, "matrix"),
            Tensor(p + "ffn_norm.weight", (s.hidden,), f32, "norm"),
        ]
        if s.experts:  # the router stays F32 in llama.cpp's quantizations
            e = s.experts
            out += [
                Tensor(p + "ffn_gate_inp.weight", (e, s.hidden), f32, "router"),
                Tensor(p + "ffn_gate_exps.weight", (e, s.ffn, s.hidden), q4, "matrix"),
                Tensor(p + "ffn_up_exps.weight", (e, s.ffn, s.hidden), q4, "matrix"),
                Tensor(p + "ffn_down_exps.weight", (e, s.hidden, s.ffn), more, "matrix"),
            ]
            continue
        out += [
            Tensor(p + "ffn_gate.weight", (s.ffn, s.hidden), q4, "matrix"),
            Tensor(p + "ffn_up.weight", (s.ffn, s.hidden), q4, "matrix"),
            Tensor(p + "ffn_down.weight", (s.hidden, s.ffn), more, "matrix"),
        ]
    out.append(Tensor("output_norm.weight", (s.hidden,), f32, "norm"))
    out.append(Tensor("output.weight", (s.vocab, s.hidden), q6, "matrix"))
    return out


# ---- random blocks --------------------------------------------------------------------------------


def _random_bytes(rng: np.random.Generator, n: int) -> U8Array:
    words = rng.bit_generator.random_raw(-(-n // 8))
    return np.asarray(words).view(np.uint8)[:n]


def _f16(values: npt.NDArray[np.floating[Any]]) -> U8Array:
    return values.astype("<f2").view(np.uint8).reshape(len(values), 2)


def _jitter(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    return rng.uniform(0.75, 1.25, n)


def q4_k_blocks(rng: np.random.Generator, n: int, std: float) -> U8Array:
    """n Q4_K blocks (d, dmin, scales[12], qs[128]) of zero-mean weights with standard deviation ~std."""
    b = _random_bytes(rng, n * 144).reshape(n, 144)
    sc = rng.integers(24, 48, (n, 8), dtype=np.uint8)  # 6-bit sub-block scales; the mins equal them
    d = std / (sc.mean(axis=1) * np.sqrt(255 / 12)) * _jitter(rng, n)  # std of a uniform 4-bit quant
    b[:, 0:2] = _f16(d)
    b[:, 2:4] = _f16(7.5 * d)  # dmin · m = 7.5 · d · sc: each sub-block's mean is 0
    lo, hi = sc[:, :4], sc[:, 4:]  # get_scale_min_k4's packing, with m = sc
    b[:, 4:8] = lo | ((hi >> 4) << 6)
    b[:, 8:12] = lo | ((hi >> 4) << 6)
    b[:, 12:16] = (hi & 0x0F) | ((hi & 0x0F) << 4)
    return b


def q6_k_blocks(rng: np.random.Generator, n: int, std: float) -> U8Array:
    """n Q6_K blocks (ql[128], qh[64], scales[16]:i8, d) of weights with standard deviation ~std."""
    b = _random_bytes(rng, n * 210).reshape(n, 210)
    sc = rng.integers(8, 17, (n, 16), dtype=np.int8)
    d = std / (sc.mean(axis=1) * np.sqrt(4095 / 12)) * _jitter(rng, n)  # std of a uniform 6-bit quant
    b[:, 192:208] = sc.view(np.uint8)
    b[:, 208:210] = _f16(d)
    return b


BLOCKS: Final[dict[QuantType, Callable[[np.random.Generator, int, float], U8Array]]] = {
    QuantType.Q4_K: q4_k_blocks,
    QuantType.Q6_K: q6_k_blocks,
}


def tensor_chunks(t: Tensor, rng: np.random.Generator, std: float) -> Iterator[U8Array]:
    """The stored bytes of `t`, in chunks of about CHUNK_BYTES."""
    if t.qtype is QuantType.F32:
        n = int(np.prod(t.shape))
        values = 1 + 0.1 * rng.uniform(-1, 1, n) if t.kind == "norm" else std * rng.standard_normal(n)
        yield values.astype("<f4").view(np.uint8)
        return
    layout = QUANT_LAYOUT[t.qtype]
    total = t.nbytes // layout.type_size
    step = max(1, CHUNK_BYTES // layout.type_size)
    for start in range(0, total, step):
        yield BLOCKS[t.qtype](rng, min(step, total - start), std)


# ---- the file -------------------------------------------------------------------------------------


def smollm2_vocab() -> tuple[list[str], list[int], list[str]]:
    """SmolLM2's tokens, token types and merges, read from the test fixture with apr's GGUF reader."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fixtures import models

    with open_gguf(models.smollm2_gguf()) as ckpt:
        spec = ckpt.tokenizer_spec()
        assert spec is not None
        return list(spec.tokens), list(spec.token_types), list(spec.merges)


def _metadata(w: Any, s: Shape, seed: int) -> None:
    import gguf

    w.add_name(f"apr synthetic {s.arch} ({s.layers} layers, hidden {s.hidden}, seed {seed})")
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.rms_eps)
    if s.key_length:
        w.add_key_length(s.key_length)
        w.add_value_length(s.key_length)
    if s.experts:
        w.add_expert_count(s.experts)
        w.add_expert_used_count(s.experts_used)
        w.add_expert_feed_forward_length(s.ffn)
    w.add_file_type(FILE_TYPE_Q4_K_M)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = smollm2_vocab()
    if s.vocab < len(tokens):
        raise ValueError(f"vocab {s.vocab} is smaller than the tokenizer's {len(tokens)} tokens")
    pad = range(len(tokens), s.vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens + [f"[PAD{i}]" for i in pad])
    w.add_token_types(types + [TOKEN_TYPE_UNUSED] * len(pad))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)


def write_synthetic_gguf(
    path: Path | str,
    shape: Shape = SEVEN_B,
    seed: int = 0,
    std: float = 0.02,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the model to `path` (atomically: a temporary file, then a rename) and return the path."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    plan = tensors(shape)
    w = gguf.GGUFWriter(tmp, arch=shape.arch)
    try:
        _metadata(w, shape, seed)
        for t in plan:
            raw = None if t.qtype is QuantType.F32 else gguf.GGMLQuantizationType(int(t.qtype))
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None and len(w.fout) == 1
        _write_data(w.fout[0], w.data_alignment, plan, seed, std, progress)
    finally:
        w.close()
    if tmp.exists():
        os.replace(tmp, path)
    return path


def _write_data(
    f: BinaryIO,
    align: int,
    plan: list[Tensor],
    seed: int,
    std: float,
    progress: Callable[[str], None] | None,
) -> None:
    def pad() -> None:
        f.write(b"\0" * (-f.tell() % align))

    pad()
    for index, t in enumerate(plan):
        rng = np.random.default_rng([seed, index])
        written = 0
        for chunk in tensor_chunks(t, rng, std):
            f.write(chunk.data)
            written += chunk.nbytes
        assert written == t.nbytes, (t.name, written, t.nbytes)
        pad()
        if progress is not None and (t.kind == "matrix" or index == len(plan) - 1):
            progress(f"{index + 1}/{len(plan)} {t.name}")


def file_size(shape: Shape) -> int:
    """Bytes of tensor data (the file is this plus the metadata, ~4 MB with the tokenizer)."""
    return sum(t.nbytes for t in tensors(shape))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="7b")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02, help="weight scale (default 0.02)")
    for field in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "experts", "experts_used"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, help=f"override the preset's {field}")
    parser.add_argument(
        "--arch", choices=("qwen2", "llama", "qwen3moe"), help="override the preset's architecture"
    )
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in Shape.__slots__ and v is not None}
    shape = replace(PRESETS[args.preset], **overrides)
    tty = sys.stderr.isatty()
    start = time.perf_counter()

    def show(msg: str) -> None:
        if tty:
            print(f"\r\x1b[K{msg}", end="", file=sys.stderr, flush=True)

    print(f"writing {args.output} ({file_size(shape) / 2**30:.2f} GiB of tensors)", file=sys.stderr)
    write_synthetic_gguf(args.output, shape, args.seed, args.std, show)
    if tty:
        print(file=sys.stderr)
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
