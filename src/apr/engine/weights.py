"""Lazy weight access for the engine: canonical name → dequantized array, read when used, never cached.

A forward pass touches each weight once, so nothing is kept: peak memory is one row block of a matrix per
thread plus activations. `linear` multiplies a matrix in row blocks of ~`ROW_BLOCK_ELEMS` elements (4 MiB
of f32): each block is dequantized straight from the file's bytes, mapped for that block only, and
multiplied right away, so neither the f32 matrix nor its stored bytes are ever resident whole; a 7B lm_head
(152064 × 3584) is ~500 such blocks. The embedding lookup reads only the prompt's rows, and `expert_linear`
only one expert's rows of a stacked (E, out, in) expert tensor: a MoE layer dequantizes just the experts some
token selects.

Row blocks run on `threads` threads (numpy's heavy calls and BLAS release the GIL), with BLAS itself held to
one thread (below). Each output element is one BLAS dot product over a block that depends only on the
matrix's shape, so results are the same bits whatever the thread count, the file format or the quant type
of the same values.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from apr.errors import InferenceError, ModelLoadError
from apr.formats import names
from apr.formats.base import F32Array, TensorInfo
from apr.quant import dequantize, row_nbytes

Array = npt.NDArray[Any]
# Elements of one row block in `linear`. BLAS packs all of x for every block, so blocks of a few long
# rows (ffn_down: 18944 columns) would repeat that work; 1M elements measured best for 7B shapes.
ROW_BLOCK_ELEMS: Final = 1 << 20
MAX_THREADS: Final = 4  # numpy's per-call overhead holds the GIL; more threads stop paying


class TensorSource(Protocol):
    """What the engine reads: tensors by canonical name (apr.models.Model provides it)."""

    @property
    def path(self) -> Path: ...

    def tensors(self) -> Sequence[TensorInfo]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str) -> F32Array: ...

    def read_rows(self, name: str, rows: npt.NDArray[np.int64] | slice) -> F32Array: ...

    def raw(self, name: str) -> npt.NDArray[np.uint8]: ...


def default_threads() -> int:
    """The CPUs this process may run on, at most MAX_THREADS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


class Weights:
    def __init__(
        self, ckpt: TensorSource, dtype: type[np.floating[Any]] = np.float32, threads: int | None = None
    ) -> None:
        self.ckpt = ckpt
        self.dtype = np.dtype(dtype)
        # our own threads only where BLAS can be held to one (below); elsewhere BLAS does the threading
        self.threads = threads or (default_threads() if _openblas_libs() else 1)
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
        return self._blocked(x, rows, cols, self._row_reader(info))

    def expert_linear(self, x: Array, name: str, expert: int) -> Array:
        """x @ W[expert]ᵀ for a stack of expert matrices W (E, out, in), reading only that expert's bytes:
        rows [e·out, (e+1)·out) of W viewed as (E·out, in), in row blocks as `linear`. (T, in) → (T, out)

        A stack the file does not hold as one tensor (HF per-expert tensors) is read one expert at a time."""
        self._need(name)
        info = self.ckpt.info(name)
        n, rows, cols = info.shape
        if not 0 <= expert < n:
            raise InferenceError(f"expert {expert} is outside {name} ({n} experts)")
        size = row_nbytes(info.qtype, cols)
        if info.parts or size is None or size * n * rows != info.nbytes:
            w = self.ckpt.read_rows(name, slice(expert, expert + 1))[0].astype(self.dtype, copy=False)
            return self._blocked(x, rows, cols, lambda r0, r1: w[r0:r1])
        return self._blocked(x, rows, cols, self._raw_rows(info, size, cols, expert * rows))

    def _blocked(self, x: Array, rows: int, cols: int, read: Callable[[int, int], Array]) -> Array:
        """x @ Wᵀ with W (rows, cols) read as row blocks [r0, r1) by `read`. (T, cols) → (T, rows)"""
        step = max(1, min(ROW_BLOCK_ELEMS // cols, -(-rows // 2)))  # ≥ 2 blocks to share
        out = np.empty((rows, x.shape[0]), dtype=self.dtype)  # (out, T): blocks of rows are contiguous

        def block(r0: int) -> None:
            w = read(r0, min(rows, r0 + step))  # (≤ step, in)
            np.matmul(w, x.T, out=out[r0 : r0 + w.shape[0]])

        self._each(block, range(0, rows, step))
        return np.ascontiguousarray(out.T)

    def _row_reader(self, info: TensorInfo) -> Callable[[int, int], Array]:
        """rows [r0, r1) of a matrix as `dtype`: dequantized from a slice of its mapped bytes when the
        format stores rows whole (GGUF, safetensors, most .apr types), else through `read_rows`."""
        rows, cols = info.shape
        size = row_nbytes(info.qtype, cols)
        if size is None or size * rows != info.nbytes:
            return lambda r0, r1: self.ckpt.read_rows(info.name, slice(r0, r1)).astype(self.dtype, copy=False)
        return self._raw_rows(info, size, cols)

    def _raw_rows(self, info: TensorInfo, size: int, cols: int, base: int = 0) -> Callable[[int, int], Array]:
        """Rows [base + r0, base + r1) of `info` viewed as (rows, cols), dequantized from their bytes only."""

        def read(r0: int, r1: int) -> Array:
            raw = self.ckpt.raw(info.name)[(base + r0) * size : (base + r1) * size]  # mapped for this block
            return dequantize(raw, info.qtype, (r1 - r0, cols)).astype(self.dtype, copy=False)

        return read

    def _each(self, fn: Callable[[int], None], items: Iterable[int]) -> None:
        """fn(item) for every item, on `threads` threads that take the next item as they finish one."""
        shared = iter(items)  # next() on a range iterator is atomic under the GIL
        failed = threading.Event()

        def work() -> None:
            for item in shared:
                if failed.is_set():
                    return
                try:
                    fn(item)
                except BaseException:
                    failed.set()  # the other threads stop at their next item
                    raise

        if self.threads > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="apr-linear")
        with single_threaded_blas():  # see below: also makes the bits independent of BLAS's threads
            helpers = [self._pool.submit(work) for _ in range(self.threads - 1)] if self._pool else []
            try:
                work()
            finally:
                for h in helpers:
                    h.result()  # waits for the helpers, and re-raises their first error


# ---- BLAS threads -------------------------------------------------------------------------------
# OpenBLAS runs each matmul on all cores, then spins waiting for the next one: beside our own threads
# that made `linear` 2.5× slower on 2 cores. Its thread count also changes the bits of a product. So
# `linear` holds every OpenBLAS the process has loaded (numpy's) to one thread, through OpenBLAS's C API
# (as threadpoolctl does), and restores the count after. Without OpenBLAS or /proc this is a no-op.
OPENBLAS_SYMBOLS: Final = tuple(
    (f"{prefix}_get_num_threads{suffix}", f"{prefix}_set_num_threads{suffix}")
    for prefix in ("openblas", "scipy_openblas")
    for suffix in ("", "64_")
)
ThreadCount = tuple[Callable[[], int], Callable[[int], None]]


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    libs = _openblas_libs()
    before = [get() for get, _ in libs]
    for _, set_ in libs:
        set_(1)
    try:
        yield
    finally:
        for (_, set_), n in zip(libs, before, strict=True):
            set_(n)


@functools.cache
def _openblas_libs() -> tuple[ThreadCount, ...]:
    """(get, set) of the thread count of each OpenBLAS loaded in this process."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ()
    fields = (line.split(maxsplit=5) for line in maps.splitlines())
    paths = sorted({f[5] for f in fields if len(f) == 6 and "openblas" in Path(f[5]).name.lower()})
    found = []
    for path in paths:
        lib = ctypes.CDLL(path)
        for get, set_ in OPENBLAS_SYMBOLS:
            if hasattr(lib, get) and hasattr(lib, set_):
                found.append((getattr(lib, get), getattr(lib, set_)))
                break
    return tuple(found)
