"""Small valid inputs the fuzzers start from: one tiny llama in every format, a trace, a tokenizer.

The GGUF is written by gguf-py's GGUFWriter (independent of apr); the safetensors folder and the .apr are
apr's own export / import of it, so every seed opens, tokenizes and runs the reference forward cleanly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import GGUFValueType, GGUFWriter
from gguf.quants import quantize

VT = GGUFValueType
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "Ġ", "ab", "Ġa", "abc"]
HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 32, 64, 4, 2, len(TOKENS)
TOKEN_IDS = (1, 3, 4, 7)


def _kv() -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
    return {
        "general.name": ("fuzz", VT.STRING, None),
        "llama.block_count": (1, VT.UINT32, None),
        "llama.context_length": (16, VT.UINT32, None),
        "llama.embedding_length": (HIDDEN, VT.UINT32, None),
        "llama.feed_forward_length": (FFN, VT.UINT32, None),
        "llama.attention.head_count": (HEADS, VT.UINT32, None),
        "llama.attention.head_count_kv": (KV_HEADS, VT.UINT32, None),
        "llama.rope.freq_base": (10000.0, VT.FLOAT32, None),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32, None),
        "tokenizer.ggml.model": ("gpt2", VT.STRING, None),
        "tokenizer.ggml.pre": ("smollm", VT.STRING, None),
        "tokenizer.ggml.tokens": (TOKENS, VT.ARRAY, VT.STRING),
        "tokenizer.ggml.token_type": ([3, 3, 3, 1, 1, 1, 1, 1, 1, 1], VT.ARRAY, VT.INT32),
        "tokenizer.ggml.merges": (["a b", "Ġ a", "ab c"], VT.ARRAY, VT.STRING),
        "tokenizer.ggml.bos_token_id": (1, VT.UINT32, None),
        "tokenizer.ggml.add_bos_token": (False, VT.BOOL, None),
    }


def _tensors() -> dict[str, tuple[np.ndarray[Any, Any], GT]]:
    rng = np.random.default_rng(0)
    hd = HIDDEN // HEADS

    def w(*shape: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    return {
        "token_embd.weight": (w(VOCAB, HIDDEN), GT.F32),
        "blk.0.attn_norm.weight": (1 + w(HIDDEN), GT.F32),
        "blk.0.attn_q.weight": (w(HIDDEN, HIDDEN), GT.Q8_0),
        "blk.0.attn_k.weight": (w(KV_HEADS * hd, HIDDEN), GT.Q8_0),
        "blk.0.attn_v.weight": (w(KV_HEADS * hd, HIDDEN), GT.F16),
        "blk.0.attn_output.weight": (w(HIDDEN, HIDDEN), GT.F32),
        "blk.0.ffn_norm.weight": (1 + w(HIDDEN), GT.F32),
        "blk.0.ffn_gate.weight": (w(FFN, HIDDEN), GT.Q8_0),
        "blk.0.ffn_up.weight": (w(FFN, HIDDEN), GT.F32),
        "blk.0.ffn_down.weight": (w(HIDDEN, FFN), GT.F16),
        "output_norm.weight": (1 + w(HIDDEN), GT.F32),
        "output.weight": (w(VOCAB, HIDDEN), GT.F32),
    }


def write_gguf(path: Path) -> Path:
    w = GGUFWriter(path, "llama")
    for key, (value, vtype, sub) in _kv().items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, (x, qtype) in _tensors().items():
        if qtype in (GT.F32, GT.F16):
            w.add_tensor(name, x.astype(np.float32 if qtype == GT.F32 else np.float16))
        else:
            w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_all(root: Path) -> dict[str, Path]:
    """{target: seed path} for every fuzz target, written under `root`."""
    from apr.convert.export import export_safetensors
    from apr.convert.importer import import_gguf
    from apr.models import open_model
    from tests.fixtures.traces import write_trace

    root.mkdir(parents=True, exist_ok=True)
    gguf = write_gguf(root / "tiny.gguf")
    hf = root / "hf"
    export_safetensors(open_model(gguf), hf)
    apr = root / "tiny.apr"
    import_gguf(gguf, apr)
    trace = write_trace(root / "trace")
    return {"gguf": gguf, "safetensors": hf, "apr": apr, "aprt": trace / "layer-1" / "ffn_out.bin",
            "trace": trace, "tokenizer": hf}  # fmt: skip
