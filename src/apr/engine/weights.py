"""Lazy weight access for the engine: canonical name → dequantized array, read when used, never cached.

A forward pass touches each weight once, so nothing is kept: peak memory is one row block of a matrix per
thread plus activations. `linear` multiplies a matrix in row blocks of ~`ROW_BLOCK_ELEMS` elements (1 MiB
of f32, about the size of a core's L2): each block is dequantized straight from the file's bytes and
multiplied while it is still in cache, so neither the f32 matrix nor a copy of its stored bytes ever exists
whole; a 7B lm_head (152064 × 3584) is ~2000 such blocks. The embedding lookup reads only the prompt's rows.

Row blocks run on `threads` threads (numpy and BLAS release the GIL). Each output element is one BLAS dot
product over a block that depends only on the matrix's shape, so results are the same bits whatever the
thread count, the file format or the quant type of the same values.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.errors import InferenceError, ModelLoadError
from apr.formats import names
from apr.formats.base import Checkpoint, TensorInfo
from apr.quant import dequantize, row_nbytes

Array = npt.NDArray[Any]
ROW_BLOCK_ELEMS: Final = 1 << 18  # elements of one row block in `linear`: 1 MiB of f32
MAX_THREADS: Final = 4  # numpy's per-call overhead holds the GIL; more threads stop paying


def default_threads() -> int:
    """The CPUs this process may run on, at most MAX_THREADS."""
    return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0))))


class Weights:
    def __init__(
        self, ckpt: Checkpoint, dtype: type[np.floating[Any]] = np.float32, threads: int | None = None
    ) -> None:
        self.ckpt = ckpt
        self.dtype = np.dtype(dtype)
        self.threads = threads or default_threads()
        self._names = {t.name for t in ckpt.tensors()}
        self._pool: ThreadPoolExecutor | None = None

    def has(self, name: str) -> bool:
        return name in self._names

    def _need(self, name: str) -> None:
        if name not in self._names:
            raise ModelLoadError(f"{self.ckpt.path}: tensor {name} is missing")

    def vector(self, name: str) -> Array:
        self._need(name)
        return self.ckpt.read(name).astype(self.dtype, copy=False)

    def embed(self, token_ids: npt.NDArray[np.int64]) -> Array:
        """Rows of token_embd for the prompt only. (T, D)"""
        self._need(names.TOKEN_EMBD)
        vocab = self.ckpt.info(names.TOKEN_EMBD).shape[0]
        bad = [int(t) for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InferenceError(f"token id {bad[0]} is outside the embedding table (vocab {vocab})")
        return self.ckpt.read_rows(names.TOKEN_EMBD, token_ids).astype(self.dtype, copy=False)

    def lm_head_name(self) -> str:
        return names.OUTPUT if self.has(names.OUTPUT) else names.TOKEN_EMBD

    def linear(self, x: Array, name: str) -> Array:
        """x @ Wᵀ for W of shape (out, in), in row blocks of ~ROW_BLOCK_ELEMS. (T, in) → (T, out)"""
        self._need(name)
        info = self.ckpt.info(name)
        rows, cols = info.shape
        step = max(1, ROW_BLOCK_ELEMS // cols)
        read = self._row_reader(info)
        out = np.empty((x.shape[0], rows), dtype=self.dtype)  # (T, out)

        def block(r0: int) -> None:
            w = read(r0, min(rows, r0 + step))  # (≤ step, in)
            np.matmul(x, w.T, out=out[:, r0 : r0 + w.shape[0]])

        self._each(block, range(0, rows, step))
        return out

    def _row_reader(self, info: TensorInfo) -> Callable[[int, int], Array]:
        """rows [r0, r1) of a matrix as `dtype`: dequantized from a slice of its mapped bytes when the
        format stores rows whole (GGUF, safetensors, most .apr types), else through `read_rows`."""
        rows, cols = info.shape
        size = row_nbytes(info.qtype, cols)
        if size is None or size * rows != info.nbytes:
            return lambda r0, r1: self.ckpt.read_rows(info.name, slice(r0, r1)).astype(self.dtype, copy=False)
        raw = self.ckpt.raw(info.name).reshape(rows, size)  # mapped; unmapped when `linear` returns

        def read(r0: int, r1: int) -> Array:
            return dequantize(raw[r0:r1], info.qtype, (r1 - r0, cols)).astype(self.dtype, copy=False)

        return read

    def _each(self, fn: Callable[[int], None], items: Iterable[int]) -> None:
        """fn(item) for every item, on `threads` threads that take the next item as they finish one."""
        shared = iter(items)  # next() on a range iterator is atomic under the GIL

        def work() -> None:
            for item in shared:
                fn(item)

        if self.threads == 1:
            return work()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="apr-linear")
        helpers = [self._pool.submit(work) for _ in range(self.threads - 1)]
        try:
            work()
        finally:
            for h in helpers:
                h.result()  # waits for the helpers, and re-raises their first error
