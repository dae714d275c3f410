"""Lazy weight access for the engine: canonical name → dequantized array, read when used, never cached.

A forward pass touches each weight once, so nothing is kept: peak memory is one row block of a matrix per
thread plus activations. `linear` multiplies a matrix in row blocks of ~`ROW_BLOCK_ELEMS` elements (4 MiB
of f32): each block is dequantized straight from the file's bytes, read (pread, apr.formats.tensorio) for
that block only, and multiplied right away, so neither the f32 matrix nor its stored bytes are ever
resident whole, and a model file truncated during the run is a clean error rather than SIGBUS; a 7B lm_head
(152064 × 3584) is ~500 such blocks. The embedding lookup reads only the prompt's rows, and `expert_linear`
only one expert's rows of a stacked (E, out, in) expert tensor: a MoE layer dequantizes just the experts some
token selects.

Row blocks run on `threads` threads (numpy's heavy calls and BLAS release the GIL), with BLAS itself held to
one thread (below). Each output element is one BLAS dot product over a block that depends only on the
matrix's shape, so results are the same bits whatever the thread count, the file format or the quant type
of the same values.

`ggml=True` (`--precision ggml`) multiplies as ggml-cpu does instead (apr.quant.vecdot): the activation is
converted to the weight type's vec_dot type first (quantized to Q8_0 / Q8_1 / Q8_K blocks, or rounded to
f16 / bf16); Q4_1 / Q5_1 / Q5_0 / Q8_0 rows then go through the kernels' own f32 order (bit for bit,
apr.quant.vecdot_lanes), the other types through the BLAS product of the dequantized values (plus Q8_1's
rounded-sum term), on the same row blocks and threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from apr.atomicfile import held_signals
from apr.cpus import default_threads
from apr.errors import InferenceError, ModelLoadError, ValidationError
from apr.formats import names
from apr.formats.base import F32Array, TensorInfo
from apr.quant import dequantize, row_nbytes

if TYPE_CHECKING:
    from apr.quant.vecdot import Activation, Q8Blocks

Array = npt.NDArray[Any]
T_ = TypeVar("T_")
# Elements of one row block in `linear`. BLAS packs all of x for every block, so blocks of a few long
# rows (ffn_down: 18944 columns) would repeat that work; 1M elements measured best for 7B shapes.
ROW_BLOCK_ELEMS: Final = 1 << 20
ELEMENTWISE_MIN: Final = 1 << 16  # values per piece of `elementwise` at least (smaller ones run in one call)
ELEMENTWISE_PIECES: Final = 8  # pieces of a larger one, shared by however many threads there are


class TensorSource(Protocol):
    """What the engine reads: tensors by canonical name (apr.models.Model provides it)."""

    @property
    def path(self) -> Path: ...

    def tensors(self) -> Sequence[TensorInfo]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str) -> F32Array: ...

    def read_rows(self, name: str, rows: npt.NDArray[np.int64] | slice) -> F32Array: ...

    def raw(self, name: str) -> npt.NDArray[np.uint8]: ...

    def raw_range(self, name: str, start: int, stop: int) -> npt.NDArray[np.uint8]: ...


class Weights:
    def __init__(
        self,
        ckpt: TensorSource,
        dtype: type[np.floating[Any]] = np.float32,
        threads: int | None = None,
        ggml: bool = False,
        kv_f16: bool = False,
    ) -> None:
        self.ckpt = ckpt
        self.dtype = np.dtype(dtype)
        if ggml and self.dtype != np.float32:
            raise ValidationError("ggml's matmul arithmetic is float32 (--precision ggml)")
        self.ggml = ggml  # multiply as ggml-cpu does (module docstring)
        self.kv_f16 = kv_f16  # attention reads K and V back from an f16 cache (apr.models.decoder)
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
        if self.ggml:
            return self._ggml_blocked(x, info, rows, cols, self._row_reader(info))
        return self._blocked(x, rows, cols, self._row_reader(info))

    def linears(self, x: Array, names: Sequence[str]) -> list[Array]:
        """[x @ Wᵀ for each named W]: matrices that read the same input (q, k, v; gate and up), their row
        blocks run as one batch on the `linear` threads, so a small matrix's blocks share the threads with
        the others' instead of waiting for its own hand-off. Each matrix is cut into the blocks `linear`
        cuts it into, so the bits are `linear`'s. (T, in) → [(T, out_i)]"""
        if self.ggml:
            return [self.linear(x, name) for name in names]
        outs, blocks = [], []
        for name in names:
            self._need(name)
            info = self.ckpt.info(name)
            rows, cols = info.shape
            out, jobs = self._row_blocks(rows, cols, x.shape[0], self._product(x, self._row_reader(info)))
            outs.append(out)
            blocks += jobs
        self._each(lambda job: job(), blocks)
        return outs

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
            read: Callable[[int, int], Array] = lambda r0, r1: w[r0:r1]  # noqa: E731
        else:
            read = self._raw_rows(info, size, cols, expert * rows)
        if self.ggml:
            return self._ggml_blocked(x, info, rows, cols, read, expert * rows)
        return self._blocked(x, rows, cols, read)

    def _ggml_blocked(
        self,
        x: Array,
        info: TensorInfo,
        rows: int,
        cols: int,
        read: Callable[[int, int], Array],
        base: int = 0,
    ) -> Array:
        """x @ Wᵀ as ggml-cpu computes it (module docstring): x converted for W's type, rows [base, base +
        rows) of `info` read by `read`, plus Q8_1's minimum term for Q4_1/Q5_1."""
        from apr.quant.vecdot import activation  # the emulation's modules load only for --precision ggml
        from apr.quant.vecdot_lanes import LANE_TYPES

        act = activation(x, info.qtype)
        size = row_nbytes(info.qtype, cols)
        if info.qtype in LANE_TYPES and act.blocks is not None and size is not None and not info.parts:
            return self._lane_blocked(act.blocks, info, rows, cols, size, base)
        return self._blocked(act.values, rows, cols, read, self._minimum_term(act, info, cols, base))

    def _lane_blocked(
        self, blocks: Q8Blocks, info: TensorInfo, rows: int, cols: int, size: int, base: int
    ) -> Array:
        """x @ Wᵀ in the order of ggml's own kernel for W's type (apr.quant.vecdot_lanes), in row blocks."""
        from apr.quant.vecdot_lanes import lane_dot

        def compute(r0: int, r1: int, dst: Array) -> None:
            raw = self.ckpt.raw_range(info.name, (base + r0) * size, (base + r1) * size)
            dst[...] = lane_dot(raw, info.qtype, r1 - r0, blocks, rows)

        return self._rows(rows, cols, blocks.d.shape[0], compute)

    def _minimum_term(
        self, act: Activation, info: TensorInfo, cols: int, base: int
    ) -> Callable[[int, int], Array] | None:
        """rows [r0, r1) of m_w · (s − d·Σq)ᵀ (r1 − r0, T): what Q8_1's f16-rounded s adds for Q4_1/Q5_1."""
        from apr.quant.vecdot import block_minimums

        offset = act.offset
        if offset is None:
            return None
        size = row_nbytes(info.qtype, cols)
        if info.parts or size is None:
            raise InferenceError(f"{info.name}: ggml emulation of {info.qtype.name} needs its stored blocks")

        def term(r0: int, r1: int) -> Array:
            raw = self.ckpt.raw_range(info.name, (base + r0) * size, (base + r1) * size)
            m = block_minimums(raw, info.qtype, r1 - r0)  # (r1 - r0, nb)
            assert m is not None
            return m @ offset.T

        return term

    def _blocked(
        self,
        x: Array,
        rows: int,
        cols: int,
        read: Callable[[int, int], Array],
        extra: Callable[[int, int], Array] | None = None,
    ) -> Array:
        """x @ Wᵀ (+ extra(r0, r1) per row block) with W (rows, cols) read as row blocks [r0, r1) by `read`.
        (T, cols) → (T, rows)"""
        return self._rows(rows, cols, x.shape[0], self._product(x, read, extra))

    @staticmethod
    def _product(
        x: Array, read: Callable[[int, int], Array], extra: Callable[[int, int], Array] | None = None
    ) -> Callable[[int, int, Array], None]:
        """compute(r0, r1, dst): rows [r0, r1) of W (read by `read`) times xᵀ (+ extra(r0, r1)) into dst."""

        def compute(r0: int, r1: int, dst: Array) -> None:
            np.matmul(read(r0, r1), x.T, out=dst)  # (r1 - r0, in) @ (in, T)
            if extra is not None:
                dst += extra(r0, r1)

        return compute

    def _rows(self, rows: int, cols: int, t: int, compute: Callable[[int, int, Array], None]) -> Array:
        """The (T, rows) result of compute(r0, r1, out) filling rows [r0, r1) of out (rows, T), run in row
        blocks of ~ROW_BLOCK_ELEMS weights on the `linear` threads."""
        out, blocks = self._row_blocks(rows, cols, t, compute)
        self._each(lambda job: job(), blocks)
        return out

    def _row_blocks(
        self, rows: int, cols: int, t: int, compute: Callable[[int, int, Array], None]
    ) -> tuple[Array, list[Callable[[], None]]]:
        """The (T, rows) result array and the jobs that fill it: compute(r0, r1, part) per row block of
        ~ROW_BLOCK_ELEMS weights (the cut depends on the shape alone), part (r1 - r0, T) then transposed
        into its columns."""
        step = max(1, min(ROW_BLOCK_ELEMS // cols, -(-rows // 2)))  # ≥ 2 blocks to share
        out = np.empty((t, rows), dtype=self.dtype)

        def block(r0: int) -> None:
            r1 = min(rows, r0 + step)
            part = np.empty((r1 - r0, t), dtype=self.dtype)  # (out, T): what compute fills
            compute(r0, r1, part)
            out[:, r0:r1] = part.T  # transposed block by block, on the threads (one whole-matrix
            # transpose after them was 7.6 s of a 512-token 7B trace: it walks memory column by column)

        return out, [functools.partial(block, r0) for r0 in range(0, rows, step)]

    def _row_reader(self, info: TensorInfo) -> Callable[[int, int], Array]:
        """rows [r0, r1) of a matrix as `dtype`: dequantized from just those rows' bytes when the
        format stores rows whole (GGUF, safetensors, most .apr types), else through `read_rows`."""
        rows, cols = info.shape
        size = row_nbytes(info.qtype, cols)
        if size is None or size * rows != info.nbytes:
            return lambda r0, r1: self.ckpt.read_rows(info.name, slice(r0, r1)).astype(self.dtype, copy=False)
        return self._raw_rows(info, size, cols)

    def _raw_rows(self, info: TensorInfo, size: int, cols: int, base: int = 0) -> Callable[[int, int], Array]:
        """Rows [base + r0, base + r1) of `info` viewed as (rows, cols), dequantized from their bytes only."""

        def read(r0: int, r1: int) -> Array:
            raw = self.ckpt.raw_range(info.name, (base + r0) * size, (base + r1) * size)  # this block only
            return dequantize(raw, info.qtype, (r1 - r0, cols), threads=1).astype(self.dtype, copy=False)

        return read

    def elementwise(self, fn: Callable[[Array], Array], x: Array) -> Array:
        """fn(x) for an elementwise `fn` (the activation), in flat pieces on the `linear` threads. The pieces
        do not depend on the thread count, so neither do the bits (even if a vectorized loop treated a
        piece's edges differently). (…) → (…)"""
        flat = np.ascontiguousarray(x).reshape(-1)
        step = max(ELEMENTWISE_MIN, -(-flat.size // ELEMENTWISE_PIECES))
        if flat.size <= step:
            return fn(x)
        first = fn(flat[:step])
        out = np.empty(flat.shape, first.dtype)
        out[:step] = first

        def piece(start: int) -> None:
            out[start : start + step] = fn(flat[start : start + step])

        self._each(piece, range(step, flat.size, step))
        return out.reshape(x.shape)

    def each(self, fn: Callable[[T_], None], items: Iterable[T_]) -> None:
        """fn(item) for every item on the `linear` threads, BLAS held to one thread (attention's blocks)."""
        self._each(fn, items)

    def _each(self, fn: Callable[[T_], None], items: Iterable[T_]) -> None:
        """fn(item) for every item, on `threads` threads that take the next item as they finish one."""
        shared = iter(items)  # next() on a range or list iterator is atomic under the GIL
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
            with held_signals():  # Ctrl-C lands in our work, never inside the pool's locks (atomicfile)
                helpers = [self._pool.submit(work) for _ in range(self.threads - 1)] if self._pool else []
            try:
                work()
            finally:
                with held_signals():
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
