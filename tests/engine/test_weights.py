"""Weights.linear: blocked, threaded x @ Wᵀ from the file's bytes; the same bits on any thread count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apr.engine import ops
from apr.engine import weights as weights_module
from apr.engine.weights import Weights, single_threaded_blas
from apr.errors import UnsupportedQuantError
from apr.formats.apr import open_apr
from apr.formats.aprwrite import AprTensor, write_apr
from apr.models import open_model
from apr.models.llama import DECODER
from apr.quant import QuantType
from apr.stages import StageId
from tests.formats.test_apr import CFG_FULL, _apr_q8, _with_scales

forward = DECODER.forward

IDS = (1780, 314, 216, 34, 27, 34, 47)


def run(model: Path, threads: int) -> dict[StageId, np.ndarray]:
    got: dict[StageId, np.ndarray] = {}
    ckpt = open_model(model)
    forward(Weights(ckpt, threads=threads), ckpt.config, IDS, lambda sid, v: got.setdefault(sid, np.array(v)))
    return got


def test_every_stage_is_the_same_bits_on_one_two_and_three_threads(smollm2_gguf: Path) -> None:
    one, two, three = (run(smollm2_gguf, n) for n in (1, 2, 3))
    assert one.keys() == two.keys() == three.keys()
    for sid in one:
        assert one[sid].tobytes() == two[sid].tobytes() == three[sid].tobytes(), sid


def test_linear_is_x_times_w_transposed(smollm2_gguf: Path) -> None:
    ckpt = open_model(smollm2_gguf)
    rng = np.random.default_rng(0)
    for name in ("blk.0.attn_k.weight", "blk.3.ffn_down.weight", "token_embd.weight"):
        w = ckpt.read(name)  # (out, in)
        x = rng.standard_normal((5, w.shape[1])).astype(np.float32)
        got = Weights(ckpt, threads=2).linear(x, name)
        want = x.astype(np.float64) @ w.T.astype(np.float64)
        assert got.shape == want.shape and got.flags.c_contiguous
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_linears_are_each_linear_bit_for_bit_on_any_thread_count(smollm2_gguf: Path) -> None:
    """Weights.linears (several matrices on one input, their row blocks in one batch) gives each
    matrix the bits `linear` gives it, on 1, 2 and 3 threads, and in the order the names are given."""
    ckpt = open_model(smollm2_gguf)
    x = np.random.default_rng(5).standard_normal((7, 576)).astype(np.float32)
    names = ["blk.2.attn_q.weight", "blk.2.attn_k.weight", "blk.2.attn_v.weight", "blk.2.ffn_up.weight"]
    want = [Weights(ckpt, threads=1).linear(x, n) for n in names]
    assert [w.shape for w in want] == [(7, 576), (7, 192), (7, 192), (7, 1536)]
    for threads in (1, 2, 3):
        got = Weights(ckpt, threads=threads).linears(x, names)
        assert [g.tobytes() for g in got] == [w.tobytes() for w in want], threads


def test_blas_threads_are_restored_and_errors_stop_every_thread(
    smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    libs = weights_module._openblas_libs()
    before = [get() for get, _ in libs]
    with single_threaded_blas():
        assert all(get() == 1 for get, _ in libs)
    assert [get() for get, _ in libs] == before

    calls = []
    real = weights_module.dequantize

    def failing(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        if len(calls) == 3:
            raise UnsupportedQuantError("boom")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(weights_module, "dequantize", failing)
    with pytest.raises(UnsupportedQuantError, match="boom"):
        Weights(open_model(smollm2_gguf), threads=2).linear(
            np.ones((1, 576), np.float32), "token_embd.weight"
        )
    assert len(calls) <= 4  # token_embd has 28 blocks: the other thread stopped after at most one more
    assert [get() for get, _ in libs] == before


def test_rows_stored_whole_or_not_give_the_same_product(tmp_path: Path) -> None:
    """Q4_K / F16 rows are sliced from the mapped bytes; APR_Q8 (one scale for the whole tensor) and
    APR_Q4 with rows of 40 (blocks run across rows) go through read_rows. All equal x @ read(name)ᵀ."""
    rng = np.random.default_rng(1)
    q4_k = _with_scales(rng.integers(0, 256, (600, 144), np.uint8), 144, (0, 2))  # 300 rows of 2 blocks
    apr_q4 = _with_scales(rng.integers(0, 256, 375 * 18, np.uint8), 18, (0,))  # 12000 / 32 blocks
    stored = {
        "a.weight": (QuantType.Q4_K, (300, 512), q4_k),
        "b.weight": (QuantType.F16, (300, 64), rng.standard_normal((300, 64)).astype(np.float16)),
        "c.weight": (QuantType.APR_Q8, (300, 64), _apr_q8(rng.standard_normal((300, 64)).astype(np.float32))),
        "d.weight": (QuantType.APR_Q4, (300, 40), apr_q4),
    }
    write_apr(tmp_path / "m.apr", [AprTensor(n, *t) for n, t in stored.items()], CFG_FULL)
    ckpt = open_apr(tmp_path / "m.apr")
    for name in stored:
        w = ckpt.read(name)
        x = rng.standard_normal((3, w.shape[1])).astype(np.float32)
        want = x.astype(np.float64) @ w.T.astype(np.float64)
        for threads in (1, 2):
            got = Weights(ckpt, threads=threads).linear(x, name)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_the_activation_in_pieces_is_the_same_bits_as_one_call_on_any_thread_count(
    smollm2_gguf: Path, act: str
) -> None:
    """Weights.elementwise (the FFN activation on the threads) against the activation called once, on
    a (T, I) large enough to be split (8 pieces here), values spanning every exponent the model sees."""
    fn = getattr(ops, act)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((131, 4099)) * np.exp2(rng.integers(-12, 6, (131, 4099)))).astype(np.float32)
    want = fn(x)
    ckpt = open_model(smollm2_gguf)
    for threads in (1, 2, 3):
        got = Weights(ckpt, threads=threads).elementwise(fn, x)
        assert got.shape == x.shape and got.dtype == want.dtype
        assert got.tobytes() == want.tobytes(), threads
