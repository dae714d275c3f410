"""apr.quant.dequantize against independent oracles: gguf-py (GGML types), numpy (plain types), and a
line-by-line transcription of aprender's readers (APR_Q4, APR_Q8). Every comparison is on uint32 views,
so signed zeros and NaN payloads must match too. ggml's C dequantizers and real llama.cpp-quantized
blocks: test_dequant_llamacpp.py."""

from __future__ import annotations

from typing import Final

import gguf as gguf
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apr.errors import FormatError, UnsupportedQuantError
from apr.quant import DEQUANT_TYPES, QuantType, dequantize
from apr.quant import blocks as quant_blocks
from apr.quant.types import QUANT_LAYOUT
from tests.quant.gguf_ref import assert_bits_equal, bits, dequantizable
from tests.quant.gguf_ref import gguf_dequantize as oracle

F32 = npt.NDArray[np.float32]

# The registry's types that gguf-py can check, bit for bit (F32 is a plain view there and here).
GGML_BLOCK_TYPES: Final = sorted(q for q in DEQUANT_TYPES if q.name in dequantizable() - {"F32"})
PLAIN_TYPES: Final = {
    QuantType.I8: "i1",
    QuantType.U8: "u1",
    QuantType.I16: "<i2",
    QuantType.I32: "<i4",
    QuantType.I64: "<i8",
    QuantType.F64: "<f8",
}
# f16 bit patterns written over whole blocks, so every scale field takes them: ±inf, signalling and
# quiet NaN, negative NaN, the smallest subnormal, the largest finite, -0.
SPECIAL_F16: Final = (0x7C00, 0xFC00, 0x7C01, 0x7E00, 0xFFFF, 0x0001, 0x7BFF, 0x8000)
NO_DEQUANTIZER: Final = sorted(q for q in QuantType if q not in DEQUANT_TYPES)


def random_blocks(qtype: QuantType, rows: int, blocks_per_row: int, seed: int) -> npt.NDArray[np.uint8]:
    """Random bytes (every pattern is a valid block), with some blocks made of special f16 values."""
    layout = QUANT_LAYOUT[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, blocks_per_row * layout.type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, layout.type_size)
    for i, pattern in enumerate(SPECIAL_F16):
        fill = np.full(layout.type_size // 2 + 1, pattern, "<u2").view(np.uint8)
        blocks[(3 * i + 1) % len(blocks)] = fill[: layout.type_size]
    return raw


def test_registry_covers_the_promised_types() -> None:
    legacy = {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    iq = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS"}
    ggml = legacy | iq | {"TQ1_0", "TQ2_0", "MXFP4", "NVFP4"}
    plain = {"F32", "F64", "I8", "I16", "I32", "I64", "U8"}
    assert {q.name for q in DEQUANT_TYPES} == ggml | plain | {"APR_Q4", "APR_Q8"}
    assert {q.name for q in GGML_BLOCK_TYPES} == ggml


def test_every_type_gguf_dequantizes_is_registered() -> None:
    """A type gguf-py can dequantize and apr cannot is a missing dequantizer (gguf-py asked, not listed)."""
    missing = {name for name in dequantizable() if QuantType[name] not in DEQUANT_TYPES}
    assert not missing, f"gguf-py dequantizes {sorted(missing)}, apr does not"


@pytest.mark.parametrize("qtype", GGML_BLOCK_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_bit_identical_to_gguf(qtype: QuantType, seed: int) -> None:
    layout = QUANT_LAYOUT[qtype]
    blocks_per_row = max(1, 2048 // layout.block_size)
    raw = random_blocks(qtype, 37, blocks_per_row, seed)
    got = dequantize(raw, qtype, (37, blocks_per_row * layout.block_size))
    want = oracle(raw, qtype)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("qtype", GGML_BLOCK_TYPES, ids=lambda q: q.name)
def test_more_blocks_than_one_chunk(qtype: QuantType) -> None:
    layout = QUANT_LAYOUT[qtype]
    n_blocks = (1 << 19) // layout.block_size + 3  # more than one chunk, the last one ragged
    raw = random_blocks(qtype, 1, n_blocks, seed=7)
    got = dequantize(raw, qtype, (n_blocks * layout.block_size,))
    np.testing.assert_array_equal(bits(got), bits(oracle(raw, qtype).reshape(-1)))


SCALED_TYPES: Final = (
    QuantType.Q8_0,
    QuantType.Q4_0,
    QuantType.Q4_1,
    QuantType.Q5_0,
    QuantType.Q5_1,
    QuantType.Q2_K,
    QuantType.Q3_K,
    QuantType.Q4_K,
    QuantType.Q5_K,
    QuantType.Q6_K,
)


@pytest.mark.parametrize("qtype", SCALED_TYPES, ids=lambda q: q.name)
def test_more_blocks_than_one_scale_group(qtype: QuantType) -> None:
    """The `scaled_kernel` types compute their scales `PREPARE_CHUNKS` chunks at a time: a tensor of
    more than one such group, the last one ragged, must still match gguf-py bit for bit."""
    layout = QUANT_LAYOUT[qtype]
    group = quant_blocks.PREPARE_CHUNKS * (quant_blocks.SCALED_CHUNK_ELEMS // layout.block_size)
    n_blocks = group + group // 3 + 5  # the second group ends in a ragged chunk
    raw = random_blocks(qtype, 1, n_blocks, seed=13)
    got = dequantize(raw, qtype, (n_blocks * layout.block_size,))
    np.testing.assert_array_equal(bits(got), bits(oracle(raw, qtype).reshape(-1)))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_block_bytes_bit_identical(data: st.DataObject) -> None:
    qtype = data.draw(st.sampled_from(GGML_BLOCK_TYPES))
    layout = QUANT_LAYOUT[qtype]
    n = data.draw(st.integers(1, 4))
    raw = np.frombuffer(
        data.draw(st.binary(min_size=n * layout.type_size, max_size=n * layout.type_size)), np.uint8
    )
    got = dequantize(raw, qtype, (n * layout.block_size,))
    np.testing.assert_array_equal(bits(got), bits(oracle(raw.reshape(1, -1), qtype).reshape(-1)))


@pytest.mark.parametrize("pattern", SPECIAL_F16, ids=hex)
def test_iq1_m_special_scales(pattern: int) -> None:
    """IQ1_M keeps its f16 d in the top nibbles of its four u16 scales, where `random_blocks` cannot
    put the special values: set them there."""
    raw = random_blocks(QuantType.IQ1_M, 4, 8, seed=pattern).reshape(-1, 56)
    scales = raw[:, 48:56].copy().view("<u2")
    nibbles = (np.uint16(pattern) >> np.arange(0, 16, 4, dtype=np.uint16)) & np.uint16(0xF)
    scales = (scales & np.uint16(0x0FFF)) | (nibbles << np.uint16(12))
    raw[:, 48:56] = scales.view(np.uint8)
    got = dequantize(raw, QuantType.IQ1_M, (len(raw) * 256,))
    assert_bits_equal(got, oracle(raw, QuantType.IQ1_M).reshape(-1))


def test_f16_and_bf16_every_bit_pattern() -> None:
    every = np.arange(1 << 16, dtype=np.uint32).astype("<u2").view(np.uint8)
    for qtype in (QuantType.F16, QuantType.BF16):
        got = dequantize(every, qtype, (1 << 16,))
        np.testing.assert_array_equal(bits(got), bits(oracle(every.reshape(1, -1), qtype).reshape(-1)))


def test_f32_is_a_zero_copy_view() -> None:
    values = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    raw = values.view(np.uint8)
    got = dequantize(raw, QuantType.F32, (3, 8))
    assert np.shares_memory(got, raw)
    np.testing.assert_array_equal(bits(got), bits(values))


@pytest.mark.parametrize("qtype", sorted(PLAIN_TYPES), ids=lambda q: q.name)
def test_plain_types_cast_like_numpy(qtype: QuantType) -> None:
    dtype = np.dtype(PLAIN_TYPES[qtype])
    rng = np.random.default_rng(int(qtype))
    if dtype.kind == "f":
        values = (rng.standard_normal(1000) * 10.0 ** rng.integers(-50, 50, 1000)).astype(dtype)
        values[:4] = [np.inf, -np.inf, np.nan, 1e300]
    else:
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, 1000, dtype=dtype, endpoint=True)
    got = dequantize(values.view(np.uint8), qtype, (10, 100))
    with np.errstate(over="ignore"):
        want = values.astype(np.float32).reshape(10, 100)
    np.testing.assert_array_equal(bits(got), bits(want))


# --- apr's own types, against a transcription of aprender's `dequantize_q4` / `AprQ8` decode ------


def aprender_q4(data: bytes, n: int) -> F32:
    """aprender `format::v2::dequantize_q4`, statement by statement (GH-186 scale clamp included)."""
    out: list[np.float32] = []
    pos, remaining = 0, n
    while remaining > 0 and pos + 2 <= len(data):
        scale = np.frombuffer(data[pos : pos + 2], "<f2")[0].astype(np.float32)
        if np.isnan(scale) or np.isinf(scale) or abs(scale) < np.float32(6.1e-5):
            scale = np.float32(0.0)
        pos += 2
        for i in range(min(remaining, 32)):
            byte = data[pos + i // 2]
            nibble = byte & 0x0F if i % 2 == 0 else byte >> 4
            out.append(np.float32(nibble - 8) * scale)
        pos += 16
        remaining -= 32
    return np.array(out, np.float32)


@pytest.mark.parametrize("n", [32, 64 * 32, 100, 33, 1])
def test_apr_q4_matches_aprender(n: int) -> None:
    raw = random_blocks(QuantType.APR_Q4, 1, -(-n // 32), seed=n)
    np.testing.assert_array_equal(
        bits(dequantize(raw, QuantType.APR_Q4, (n,))), bits(aprender_q4(raw.tobytes(), n))
    )


def test_apr_q4_golden_block() -> None:
    block = np.array([0x00, 0x38] + [0x10, 0x32, 0xF8, 0x8F] + [0x88] * 12, np.uint8)  # scale 0.5
    want = np.array([-4, -3.5, -3, -2.5, 0, 3.5, 3.5, 0] + [0] * 24, np.float32)
    np.testing.assert_array_equal(dequantize(block, QuantType.APR_Q4, (32,)), want)


def test_apr_q4_blocks_span_rows() -> None:
    raw = random_blocks(QuantType.APR_Q4, 1, 2, seed=3)  # 36 elements = 2 blocks, rows of 12
    got = dequantize(raw, QuantType.APR_Q4, (3, 12))
    np.testing.assert_array_equal(bits(got.reshape(-1)), bits(aprender_q4(raw.tobytes(), 36)))


def test_apr_q8_matches_aprender() -> None:
    rng = np.random.default_rng(5)
    q = rng.integers(-128, 128, 600, dtype=np.int8)
    for scale in (np.float32(0.0123), np.float32(-2.5), np.float32(np.inf)):
        raw = np.concatenate([np.array([scale], "<f4").view(np.uint8), q.view(np.uint8)])
        with np.errstate(invalid="ignore"):
            want = q.astype(np.float32) * scale
        np.testing.assert_array_equal(
            bits(dequantize(raw, QuantType.APR_Q8, (20, 30))), bits(want.reshape(20, 30))
        )


# --- errors -------------------------------------------------------------------------------------------


def test_types_without_dequantizer() -> None:
    """The GGML types neither gguf-py nor apr can dequantize (those only apr can: the plain ones)."""
    assert {q.name for q in NO_DEQUANTIZER} == {"Q8_1", "Q8_K", "Q1_0"}
    assert not {q.name for q in NO_DEQUANTIZER} & dequantizable()


@pytest.mark.parametrize("qtype", NO_DEQUANTIZER, ids=lambda q: q.name)
def test_type_without_dequantizer(qtype: QuantType) -> None:
    with pytest.raises(UnsupportedQuantError) as e:
        dequantize(np.zeros(292, np.uint8), qtype, (256,))
    assert str(e.value) == f"no dequantizer for {qtype.name} ({int(qtype)})"
    assert isinstance(e.value, FormatError)


def test_wrong_byte_count() -> None:
    with pytest.raises(FormatError) as e:
        dequantize(np.zeros(100, np.uint8), QuantType.Q4_K, (1, 256))
    assert str(e.value) == "Q4_K tensor of shape [1, 256] needs 144 bytes, got 100"
    with pytest.raises(FormatError) as e:
        dequantize(np.zeros(4 + 5, np.uint8), QuantType.APR_Q8, (2, 3))
    assert str(e.value) == "APR_Q8 tensor of shape [2, 3] needs 10 bytes, got 9"
    with pytest.raises(FormatError) as e:
        dequantize(np.zeros(37, np.uint8), QuantType.APR_Q4, (40,))
    assert str(e.value) == "APR_Q4 tensor of shape [40] needs 36 bytes, got 37"


def test_row_not_whole_blocks() -> None:
    with pytest.raises(FormatError) as e:
        dequantize(np.zeros(144, np.uint8), QuantType.Q4_K, (2, 128))
    assert str(e.value) == "Q4_K rows of 128 elements are not a whole number of 256-element blocks"


def test_shapes_and_layouts() -> None:
    raw = random_blocks(QuantType.Q6_K, 2, 2, seed=9)  # 2 rows × 2 super-blocks
    flat = dequantize(raw.reshape(-1), QuantType.Q6_K, (1024,))
    np.testing.assert_array_equal(bits(dequantize(raw, QuantType.Q6_K, (2, 512))), bits(flat.reshape(2, 512)))
    np.testing.assert_array_equal(
        bits(dequantize(raw, QuantType.Q6_K, (2, 1, 2, 256))), bits(flat.reshape(2, 1, 2, 256))
    )
    assert dequantize(np.zeros(0, np.uint8), QuantType.Q4_K, (0, 256)).shape == (0, 256)
    assert dequantize(np.zeros(0, np.uint8), QuantType.APR_Q4, (0,)).shape == (0,)
    assert dequantize(np.ones(4, np.uint8), QuantType.F32, ()).shape == ()


@pytest.mark.parametrize("qtype", [*GGML_BLOCK_TYPES, QuantType.F32], ids=lambda q: q.name)
def test_unaligned_bytes(qtype: QuantType) -> None:
    """Bytes at an odd address (a sliced buffer, a memmap at an odd offset) decode the same."""
    aligned = random_blocks(qtype, 3, 4, seed=11).reshape(-1)
    buffer = np.zeros(aligned.size + 1, np.uint8)
    buffer[1:] = aligned
    n = 3 * 4 * QUANT_LAYOUT[qtype].block_size
    got, want = dequantize(buffer[1:], qtype, (n,)), dequantize(aligned, qtype, (n,))
    np.testing.assert_array_equal(bits(got), bits(want))
