"""Q/K row layouts: how a checkpoint stores the rows of attn_q / attn_k, and the permutation between them.

LLaMA-style GGUFs (and .apr files imported from them) keep llama.cpp's per-head interleaved order, which
pairs with adjacent-pair RoPE; Hugging Face weights pair with half-split (rotate_half) RoPE. The two are the
same model up to that row permutation. (The model config itself is apr.models.config.ModelConfig.)
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Final

import numpy as np
import numpy.typing as npt


class QKLayout(StrEnum):
    HF = "hf"  # rotate_half RoPE: element i pairs with i + head_dim/2 (NEOX)
    INTERLEAVED = "gguf-interleaved"  # llama.cpp NORM RoPE: element 2i pairs with 2i+1

    @property
    def rope_pairing(self) -> str:
        return "half-split" if self is QKLayout.HF else "adjacent"


# the tensors whose rows are Q/K heads (the ones llama.cpp permutes), by their name after "blk.N."
QK_HEAD_TENSORS: Final = {"attn_q.weight": "q", "attn_q.bias": "q", "attn_k.weight": "k", "attn_k.bias": "k"}


def qk_heads(name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """The number of heads whose rows tensor `name` (canonical, "blk.N.attn_q.weight" or the template
    "blk.{i}.attn_q.weight") holds when it is one of QK_HEAD_TENSORS; None for any other tensor."""
    if not name.startswith("blk."):
        return None
    kind = QK_HEAD_TENSORS.get(name.split(".", 2)[-1])
    return None if kind is None else n_heads if kind == "q" else n_kv_heads


def interleaved_to_hf(x: npt.NDArray[Any], n_heads: int, axis: int = -1) -> npt.NDArray[Any]:
    """Undo llama.cpp's per-head Q/K row permutation along `axis` (GGUF-interleaved → HF order).

    Within each head of `head_dim` entries, entry 2i+j (j ∈ {0,1}) moves to j·head_dim/2 + i. Works for
    weight rows (axis=0) and for activations (axis=-1).
    """
    x = np.moveaxis(x, axis, -1)
    lead, d = x.shape[:-1], x.shape[-1]
    hd = d // n_heads
    y = x.reshape(*lead, n_heads, hd // 2, 2).swapaxes(-1, -2).reshape(*lead, d)
    return np.moveaxis(y, -1, axis)


def hf_to_interleaved(x: npt.NDArray[Any], n_heads: int, axis: int = -1) -> npt.NDArray[Any]:
    """Inverse of `interleaved_to_hf` (HF order → GGUF-interleaved), as convert_hf_to_gguf permutes."""
    x = np.moveaxis(x, axis, -1)
    lead, d = x.shape[:-1], x.shape[-1]
    hd = d // n_heads
    y = x.reshape(*lead, n_heads, 2, hd // 2).swapaxes(-1, -2).reshape(*lead, d)
    return np.moveaxis(y, -1, axis)
