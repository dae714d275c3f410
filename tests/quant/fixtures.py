"""SmolLM2 GGUFs in more quant types, made by llama.cpp's own quantizer from the F32 fixture.

`quantized_gguf("Q4_K_M")` runs `llama_model_quantize(src, out, ftype=LLAMA_FTYPE_MOSTLY_Q4_K_M)` once
(0.5–2.5 s) and caches the file in $APR_CACHE/fixtures, keyed by the model and the llama-cpp-python
version. `src` is the F32 fixture without its tokenizer metadata (`tensors_only_f32_gguf`, built once):
GGUFReader then opens the results in milliseconds instead of ~5 s. Tensor types per file (576 columns
is not a multiple of 256, so only ffn_down can hold a K-quant; spec/oracles.md §1):

    Q4_K_M  Q4_K Q6_K Q5_0 Q8_0     Q5_K_M  Q5_K Q6_K Q5_1 Q8_0     Q3_K_M  Q4_K Q5_K Q4_0 Q5_0 Q5_1 Q8_0
    Q2_K    Q3_K Q4_0 Q8_0          Q2_K_PURE  Q2_K Q4_0            Q6_K    Q6_K Q8_0
    IQ4_XS  IQ4_XS IQ4_NL Q5_K
    Q4_0, Q5_1, Q8_0, F16, BF16: that type (+ one Q8_0 token_embd for Q4_0/Q5_1); F32 norms in every file

`llamacpp_blocks(qtype)` covers every type, the IQ ones included, one tensor at a time: real SmolLM2
weights (`REAL_TENSOR`, `REAL_ROWS` rows) quantized by ggml's `ggml_quantize_chunk` — the call
llama.cpp's quantizer makes per tensor — cached as .npy. llama.cpp refuses IQ1_S, IQ2_XXS and IQ2_XS
without an importance matrix; those get a synthetic one (`synthetic_imatrix`: positive per-column
weights from a fixed seed, not activation statistics), which only steers which codes ggml picks.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from apr.quant.types import QuantType
from tests.fixtures import models

# name → (llama_ftype suffix, pure: every tensor the file type's own type where the shape allows)
FILE_TYPES: Final[dict[str, tuple[str, bool]]] = {
    "Q4_K_M": ("Q4_K_M", False),
    "Q5_K_M": ("Q5_K_M", False),
    "Q3_K_M": ("Q3_K_M", False),
    "Q2_K": ("Q2_K", False),
    "Q2_K_PURE": ("Q2_K", True),
    "Q6_K": ("Q6_K", False),
    "Q4_0": ("Q4_0", False),
    "Q5_1": ("Q5_1", False),
    "F16": ("F16", False),
    "BF16": ("BF16", False),
    "Q8_0": ("Q8_0", False),
    "IQ4_XS": ("IQ4_XS", False),
}


REAL_TENSOR: Final = "blk.0.ffn_down.weight"  # 1536 columns: whole blocks of every type
REAL_ROWS: Final = 192


def _tag() -> str:
    import llama_cpp

    return f"{models.SMOLLM2_GGUF_SHA256[:12]}-llamacpp{llama_cpp.__version__}"


def _atomic(out: Path, build: Callable[[Path], None]) -> Path:
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    try:
        build(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def tensors_only_f32_gguf() -> Path:
    """The F32 fixture minus `tokenizer.*` keys (GGUFReader parses those element by element)."""
    name = f"smollm2-f32-notok-{models.SMOLLM2_GGUF_SHA256[:12]}.gguf"
    out = Path(models.cache_dir()) / "fixtures" / name
    if out.is_file():
        return out
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    def build(tmp: Path) -> None:
        src = GGUFReader(models.smollm2_f32_gguf())
        w = GGUFWriter(tmp, arch="llama")
        for key, field in src.fields.items():
            if key.startswith(("GGUF.", "tokenizer.")) or key == "general.architecture":
                continue
            sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
        for t in src.tensors:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return _atomic(out, build)


def quantized_gguf(name: str, tokenizer: bool = False) -> Path:
    """SmolLM2 quantized by llama.cpp as FILE_TYPES[name] (needs llama-cpp-python); without its tokenizer
    metadata unless `tokenizer` (llama.cpp itself will not load a GGUF without a vocabulary)."""
    import llama_cpp

    ftype, pure = FILE_TYPES[name]
    tok = "-tok" if tokenizer else ""
    out = Path(models.cache_dir()) / "fixtures" / f"smollm2-{name.lower()}{tok}-{_tag()}.gguf"
    if out.is_file():
        return out
    source = models.smollm2_f32_gguf() if tokenizer else tensors_only_f32_gguf()

    def build(tmp: Path) -> None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.pure = pure
        params.nthread = os.cpu_count() or 1
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            raise RuntimeError(f"llama_model_quantize({name}) failed with status {status}")

    return _atomic(out, build)


def synthetic_imatrix(cols: int) -> npt.NDArray[np.float32]:
    return (np.random.default_rng(15).random(cols) + 0.25).astype(np.float32)


def real_weights() -> npt.NDArray[np.float32]:
    """(REAL_ROWS, 1536) float32: the first rows of SmolLM2's blk.0.ffn_down, from the F32 fixture."""
    from gguf import GGUFReader

    reader = GGUFReader(tensors_only_f32_gguf())
    tensor = next(t for t in reader.tensors if t.name == REAL_TENSOR)
    return np.array(tensor.data[:REAL_ROWS], np.float32)


def llamacpp_blocks(qtype: QuantType) -> npt.NDArray[np.uint8]:
    """`real_weights()` quantized to `qtype` by ggml (needs llama-cpp-python): (REAL_ROWS, row bytes)."""
    from tests.quant import ggml_ref

    name = f"smollm2-ffn-down-r{REAL_ROWS}-{qtype.name.lower()}-{_tag()}.npy"
    out = Path(models.cache_dir()) / "fixtures" / name
    if not out.is_file():
        x = real_weights()
        imatrix = synthetic_imatrix(x.shape[1]) if ggml_ref.requires_imatrix(qtype) else None
        raw = ggml_ref.ggml_quantize(x, qtype, imatrix)

        def build(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.save(f, raw)

        _atomic(out, build)
    return np.asarray(np.load(out), np.uint8)
