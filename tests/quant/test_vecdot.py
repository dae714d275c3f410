"""apr.quant.vecdot against ggml-cpu itself (tests/quant/ggml_cpu_ref.py: the build llama.cpp runs): the
vec_dot type table against `ggml_get_type_traits_cpu`, the activation quantizers byte for byte against
`quantize_row_q8_0/q8_1/q8_K`, and the emulated block dot product against `ggml_vec_dot_<w>_<q8>` on real
SmolLM2 weights quantized by ggml (tests/quant/fixtures.py) — within 1e-6 of Σ|x·w| (f32 rounding),
where multiplying by the unquantized activation misses by ~1e-3."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from apr.errors import UnsupportedQuantError
from apr.quant import dequantize
from apr.quant.types import QuantType
from apr.quant.vecdot import ACTIVATION_QUANTIZERS, VEC_DOT_TYPE, activation, block_minimums, quantize_q8_K
from apr.quant.vecdot_k import K_TYPES, kernel
from apr.quant.vecdot_lanes import LANE_TYPES, lane_dot
from tests.quant import ggml_cpu_ref
from tests.quant.fixtures import REAL_ROWS, llamacpp_blocks

pytestmark = pytest.mark.oracle
Q = QuantType
DOT_TOL = 1e-6  # |emulated − ggml| / Σ|x·w|: f32 rounding of the scale products and the accumulation
UNQUANTIZED_MISS = 1e-4  # the same comparison with the activation left in f32 is worse than this
WEIGHT_TYPES = sorted(set(VEC_DOT_TYPE) - {Q.F32, Q.F16, Q.BF16, Q.Q1_0})  # Q1_0: no ggml quantizer here
ROWS = 24  # weight rows per dot test (ctypes calls one row × one activation at a time)


def activations(cols: int, seed: int = 15) -> np.ndarray:
    """Heavy-tailed rows like real activations, one all-zero block, one row of exact ties for rounding."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((5, cols)) * rng.random((5, cols)) ** 3).astype(np.float32)
    x[0, :256] = 0.0
    x[1] = np.float32(0.5) * rng.integers(-254, 255, cols).astype(np.float32) / np.float32(127)
    x[1, ::32] = 2.0  # amax 2 → id 63.5: many x·id land exactly on .5
    return x


class _Traits(ctypes.Structure):  # ggml-cpu.h struct ggml_type_traits_cpu
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p)]
    _fields_ += [("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


def test_vec_dot_types_are_ggml_cpus() -> None:
    lib = ggml_cpu_ref._lib()
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_Traits)
    theirs = {t: Q(lib.ggml_get_type_traits_cpu(int(t)).contents.vec_dot_type) for t in VEC_DOT_TYPE}
    assert theirs == VEC_DOT_TYPE


@pytest.mark.parametrize("qtype", ACTIVATION_QUANTIZERS, ids=lambda q: q.name)
def test_activation_quantizers_are_byte_identical_to_ggml_cpu(qtype: QuantType) -> None:
    x = activations(1536)
    ours = ACTIVATION_QUANTIZERS[qtype](x).to_bytes()
    theirs = ggml_cpu_ref.quantize_row(x, qtype)
    assert ours.shape == theirs.shape
    assert (ours == theirs).all(), np.argwhere(ours != theirs)[:5]


def test_ties_round_half_to_even_as_avx2_does() -> None:
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [127.0, 0.5, 1.5, -2.5]  # amax 127: id = 1, so x·id is the value itself
    q = ACTIVATION_QUANTIZERS[Q.Q8_0](x).q[0, 0, :4]
    assert q.tolist() == [127, 0, 2, -2]  # the generic C's roundf would give 1, 2, -3
    assert (ACTIVATION_QUANTIZERS[Q.Q8_0](x).to_bytes() == ggml_cpu_ref.quantize_row(x, Q.Q8_0)).all()


@pytest.mark.parametrize("wtype", WEIGHT_TYPES, ids=lambda q: q.name)
def test_emulated_dot_matches_ggml_vec_dot(wtype: QuantType) -> None:
    raw = llamacpp_blocks(wtype)[:ROWS]
    cols = 1536
    x = activations(cols)
    vdt = VEC_DOT_TYPE[wtype]
    theirs = ggml_cpu_ref.vec_dot(wtype, vdt, raw, ggml_cpu_ref.quantize_row(x, vdt), cols)  # (T, rows)
    w = dequantize(raw, wtype, (ROWS, cols))
    act = activation(x, wtype)
    ours = act.values @ w.T
    minimums = block_minimums(raw, wtype, ROWS)
    assert (act.offset is None) == (minimums is None)
    if act.offset is not None and minimums is not None:
        ours = ours + act.offset @ minimums.T
    scale = np.abs(act.values) @ np.abs(w).T  # Σ|x·w|: what f32 rounding of the products scales with
    print(f"{wtype.name}: {(np.abs(ours - theirs) / scale).max():.1e}")
    assert (np.abs(ours - theirs) <= DOT_TOL * scale).all()
    assert (np.abs(x @ w.T - theirs) / scale).max() > UNQUANTIZED_MISS  # the quantization is what matters


def test_float_weights_see_a_rounded_activation() -> None:
    x = np.array([[1 + 2**-12, 1 + 2**-9, 3.0, -(2**-20)]], np.float32)
    assert activation(x, Q.F32).values.tolist() == x.tolist()
    assert activation(x, Q.F16).values.tolist() == [[1.0, 1 + 2**-9, 3.0, -(2**-20)]]
    assert activation(x, Q.BF16).values.tolist() == [[1.0, 1.0, 3.0, -(2**-20)]]


def test_a_type_without_a_ggml_matmul_is_refused() -> None:
    with pytest.raises(UnsupportedQuantError, match="ggml-cpu has no matmul for APR_Q4 weights"):
        activation(np.zeros((1, 32), np.float32), Q.APR_Q4)


def test_rows_must_be_whole_blocks() -> None:
    with pytest.raises(ValueError, match="rows of 48 elements are not a whole number of 32-element blocks"):
        ACTIVATION_QUANTIZERS[Q.Q8_0](np.zeros((1, 48), np.float32))


assert REAL_ROWS >= ROWS


# the weight types whose emulated kernel is ggml_vec_dot itself for these 24 rows × 5 activation rows (the
# repacked Q4_K / IQ4_NL and the tiled path are checked against llama.cpp's own stage captures instead,
# tests/engine/test_ggml_precision.py)
VEC_DOT_LANES = sorted(
    t for t in LANE_TYPES | {Q.Q4_0} if t not in K_TYPES or kernel(t, ROWS, 5) == "vec_dot"
)


@pytest.mark.parametrize("wtype", VEC_DOT_LANES, ids=lambda q: q.name)
def test_lane_order_is_ggml_vec_dot_bit_for_bit(wtype: QuantType) -> None:
    raw = llamacpp_blocks(wtype)[:ROWS]
    x = activations(1536)
    vdt = VEC_DOT_TYPE[wtype]
    theirs = ggml_cpu_ref.vec_dot(wtype, vdt, raw, ggml_cpu_ref.quantize_row(x, vdt), 1536)
    ours = lane_dot(raw, wtype, ROWS, ACTIVATION_QUANTIZERS[vdt](x)).T
    assert ours.tobytes() == theirs.tobytes()


def test_the_repacked_gemms_4_row_q8_K_is_the_reference() -> None:
    """ggml_quantize_mat_t<4, Q8_K> (what a repacked Q4_K weight's gemm reads, 4 rows at a time) gives the
    scales of `quantize_q8_K` (the reference, ggml's quantize_row_q8_K), also when a super-block's largest
    magnitude occurs with both signs: the first one sets the sign of d."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    x[0, 3], x[0, 200] = -4.0, 4.0  # tie, negative first
    x[1, 10], x[1, 11] = 5.0, -5.0  # tie, positive first
    x[2, 300], x[2, 400] = -6.0, 6.0  # tie in the second super-block
    lib = ggml_cpu_ref._lib()
    fn = lib["_Z19ggml_quantize_mat_tILl4EL9ggml_type15EEvPKfPvll"]  # ggml_quantize_mat_t<4, GGML_TYPE_Q8_K>
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    out = np.zeros((2, 4 * 4 + 4 * 256 + 4 * 16 * 2), np.uint8)  # block_q8_Kx4: d[4], qs[1024], bsums[64]
    fn(x.ctypes.data, out.ctypes.data, 4, 512)
    theirs = out[:, :16].copy().view("<f4")  # (super-block, row)
    ours = quantize_q8_K(x).d.T
    assert ours.tobytes() == theirs.tobytes()
    assert (np.sign(ours[:, :3]) == [[1, -1, 1], [1, -1, 1]]).all()  # d = 1/(−127/max): the sign flips
