"""Lazy weight access for the engine: canonical name → dequantized array, read when used, never cached.

A forward pass touches each weight once, so nothing is kept: peak memory is one weight (or one row block of
it) plus activations. Large matrices are multiplied in row blocks (`linear`), each block read and dequantized
on its own, so a 7B lm_head (152064 × 3584) never exists whole in f32. The embedding lookup reads only the
prompt's rows.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.errors import InferenceError, ModelLoadError
from apr.formats import names
from apr.formats.base import Checkpoint

Array = npt.NDArray[Any]
BLOCK_BYTES: Final = 64 << 20  # f32 bytes of one row block of a matrix in `linear`


class Weights:
    def __init__(self, ckpt: Checkpoint, dtype: type[np.floating[Any]] = np.float32) -> None:
        self.ckpt = ckpt
        self.dtype = np.dtype(dtype)
        self._names = {t.name for t in ckpt.tensors()}

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
        """x @ Wᵀ for W of shape (out, in), in row blocks of ≤ BLOCK_BYTES f32. (T, in) → (T, out)"""
        self._need(name)
        rows, cols = self.ckpt.info(name).shape
        step = max(1, BLOCK_BYTES // (4 * cols))
        if step >= rows:
            whole: Array = x @ self.ckpt.read(name).astype(self.dtype, copy=False).T
            return whole
        out = np.empty((x.shape[0], rows), dtype=self.dtype)  # (T, out)
        for r0 in range(0, rows, step):
            block = self.ckpt.read_rows(name, slice(r0, min(rows, r0 + step)))  # (step, in)
            out[:, r0 : r0 + block.shape[0]] = x @ block.astype(self.dtype, copy=False).T
        return out
