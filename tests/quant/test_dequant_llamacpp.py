"""apr.quant.dequantize on llama.cpp's own data and against ggml's own C dequantizers.

- ggml's `dequantize_row_*` (ctypes, tests/quant/ggml_ref.py) on random blocks, for every GGML block type
  apr registers: bit for bit except NaN signs (ggml's compiled `x * (s ? -1.f : 1.f)` flips a NaN's sign,
  numpy's multiply does not; gguf-py, the bit-exact oracle, sides with numpy).
- Real blocks: SmolLM2 weights quantized by ggml's `ggml_quantize_chunk` to every type (fixtures.py's
  `llamacpp_blocks`; a synthetic importance matrix for IQ1_S/IQ2_XXS/IQ2_XS), vs gguf-py bit for bit and
  vs ggml.
- Real files: the SmolLM2 Q4_1 GGUF and whole files llama.cpp's `llama_model_quantize` made from its F32
  copy, every tensor type vs gguf-py.
"""

from __future__ import annotations

from functools import cache
from typing import Final

import gguf as gguf
import numpy as np
import pytest

from apr.quant import DEQUANT_TYPES, QuantType, dequantize
from apr.quant.types import QUANT_LAYOUT
from tests.quant import ggml_ref
from tests.quant.gguf_ref import assert_bits_equal, assert_equal_nan_equal, dequantizable
from tests.quant.gguf_ref import gguf_dequantize as oracle

GGML_BLOCK_TYPES: Final = sorted(
    q for q in DEQUANT_TYPES if q.name in dequantizable() - {"F32", "F16", "BF16"}
)


@pytest.fixture(scope="module")
def libggml() -> None:
    """llama-cpp-python's libggml-base (skip without llama-cpp-python, fail if it is not where expected)."""
    import llama_cpp  # noqa: F401 (the oracle must be installed)

    if not ggml_ref.available():
        pytest.fail("llama-cpp-python is installed but its libggml-base is not where ggml_ref looks")


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", GGML_BLOCK_TYPES, ids=lambda q: q.name)
def test_random_bytes_match_ggml_c(libggml: None, qtype: QuantType) -> None:
    assert ggml_ref.knows(qtype), f"libggml has no dequantize_row_* for {qtype.name}"
    layout = QUANT_LAYOUT[qtype]
    raw = np.random.default_rng(int(qtype)).integers(0, 256, 3000 * layout.type_size, dtype=np.uint8)
    n = 3000 * layout.block_size
    assert_equal_nan_equal(dequantize(raw, qtype, (n,)), ggml_ref.ggml_dequantize(raw, qtype), qtype.name)


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", GGML_BLOCK_TYPES, ids=lambda q: q.name)
def test_llamacpp_quantized_blocks(libggml: None, qtype: QuantType) -> None:
    from tests.quant.fixtures import REAL_ROWS, llamacpp_blocks, real_weights

    raw = llamacpp_blocks(qtype)
    x = real_weights()
    got = dequantize(raw, qtype, x.shape)
    assert raw.shape[0] == REAL_ROWS and np.isfinite(got).all()
    assert_bits_equal(got, oracle(raw, qtype).reshape(x.shape), qtype.name)
    assert_bits_equal(got.reshape(-1), ggml_ref.ggml_dequantize(raw, qtype), qtype.name)
    # A real quantization of x, within 0.9 of its RMS (0 for Q4_1: x came from a Q4_1 file).
    err = np.sqrt(np.mean((got - x) ** 2)) / np.sqrt(np.mean(x**2))
    assert got.any() and err < 0.9, err


# --- real files: the SmolLM2 Q4_1 GGUF and files llama.cpp quantized from its F32 copy ---------------


@cache
def _reader(path: str) -> object:
    return gguf.GGUFReader(path)


def assert_file_matches(path: str, per_type: int) -> set[str]:
    """Every type in the file: up to `per_type` tensors (+ the embedding) vs gguf-py, bit for bit."""
    seen: dict[str, int] = {}
    for t in _reader(path).tensors:  # type: ignore[attr-defined]
        name = t.tensor_type.name
        if seen.get(name, 0) >= per_type and t.name != "token_embd.weight":
            continue
        seen[name] = seen.get(name, 0) + 1
        shape = tuple(int(d) for d in reversed(t.shape))
        got = dequantize(t.data.view(np.uint8), QuantType[name], shape)
        assert_bits_equal(got, oracle(t.data, QuantType[name]).reshape(shape), f"{path}: {t.name}")
    return set(seen)


@pytest.mark.oracle
def test_smollm2_q4_1_tensors(smollm2_gguf: object) -> None:
    assert assert_file_matches(str(smollm2_gguf), per_type=6) == {"Q4_1", "Q8_0", "F32"}


@pytest.mark.oracle
@pytest.mark.parametrize(
    "name", ["Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K", "Q2_K_PURE", "Q6_K", "Q4_0", "Q5_1", "F16", "BF16"]
)
def test_llamacpp_quantized_tensors(name: str) -> None:
    import llama_cpp  # noqa: F401 (the oracle must be installed)

    from tests.quant.fixtures import quantized_gguf

    types = assert_file_matches(str(quantized_gguf(name)), per_type=4)
    assert types - {"F32"}, name


def test_real_data_covers_every_ggml_type(libggml: None) -> None:
    """Every GGML type apr dequantizes meets real llama.cpp output: the legacy and K types in whole
    files (the table above), all of them as `llamacpp_blocks` (ggml can make each one)."""
    from tests.quant.fixtures import FILE_TYPES, quantized_gguf

    found = {t.tensor_type.name for name in FILE_TYPES for t in _reader(str(quantized_gguf(name))).tensors}  # type: ignore[attr-defined]
    found |= {"Q4_1"}  # the original SmolLM2 file (test_smollm2_q4_1_tensors)
    in_files = {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    assert in_files <= found
    assert all(ggml_ref.knows(q) for q in GGML_BLOCK_TYPES)
