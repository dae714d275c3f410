"""`dequantize` sharing a tensor's blocks among threads: the bits never depend on the thread count (each
block's outputs depend on that block alone), every range is written (a gap would show np.empty's
garbage), a worker's failure reaches the caller, and `parallel_dequant` scopes the default to its block
and its thread (the engine's own threads keep 1)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import numpy as np
import pytest

from apr.quant import DEQUANT_TYPES, QuantType, dequant_threads, dequantize, parallel_dequant
from apr.quant import blocks as quant_blocks
from apr.quant.types import QUANT_LAYOUT
from tests.quant.gguf_ref import bits, dequantizable
from tests.quant.gguf_ref import gguf_dequantize as oracle
from tests.quant.test_dequant import random_blocks

BLOCK_TYPES: Final = sorted(q for q in DEQUANT_TYPES if q.name in dequantizable() - {"F32", "F16", "BF16"})


def _big(qtype: QuantType) -> tuple[np.ndarray, int]:
    """Raw blocks of a tensor large enough for three threads, its block count odd (ragged shares)."""
    n_blocks = 3 * quant_blocks.THREAD_MIN_ELEMS // QUANT_LAYOUT[qtype].block_size + 7
    return random_blocks(qtype, 1, n_blocks, seed=5), n_blocks * QUANT_LAYOUT[qtype].block_size


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_bits_do_not_depend_on_threads(qtype: QuantType, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, n = _big(qtype)
    parts: list[int] = []
    share = quant_blocks.share
    monkeypatch.setattr(quant_blocks, "share", lambda count, k, run: (parts.append(k), share(count, k, run)))
    want = bits(oracle(raw, qtype).reshape(-1))
    kept = []  # each result kept alive, so the next one cannot reuse its memory (and its bits)
    for threads in (1, 2, 3):
        kept.append(dequantize(raw, qtype, (n,), threads))
        np.testing.assert_array_equal(bits(kept[-1]), want, f"{threads} threads")
    assert parts == [1, 2, 3]  # the tensor was really split that many ways


def test_small_tensors_stay_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    parts: list[int] = []
    share = quant_blocks.share
    monkeypatch.setattr(quant_blocks, "share", lambda count, k, run: (parts.append(k), share(count, k, run)))
    raw = random_blocks(QuantType.Q8_0, 4, 64, seed=1)  # 8192 elements
    dequantize(raw, QuantType.Q8_0, (4, 2048), threads=4)
    assert parts == [1]


def test_a_failing_share_reaches_the_caller_after_the_others_finish() -> None:
    done: list[tuple[int, int]] = []

    def run(start: int, stop: int) -> None:
        if start:
            raise ValueError(f"share {start}")
        threading.Event().wait(0.05)  # the caller's own share ends after the worker's failure
        done.append((start, stop))

    with pytest.raises(ValueError, match="share 50"):
        quant_blocks.share(100, 2, run)
    assert done == [(0, 50)]


def test_parallel_dequant_scopes_the_default() -> None:
    assert dequant_threads() == 1
    with parallel_dequant(3):
        assert dequant_threads() == 3
        with ThreadPoolExecutor(1) as pool:  # a thread started elsewhere (the engine's) keeps 1
            assert pool.submit(dequant_threads).result() == 1
        with parallel_dequant(0):
            assert dequant_threads() == 1
    assert dequant_threads() == 1
