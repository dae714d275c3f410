"""ModelConfig: everything the engine needs to know about a decoder, whatever file it came from.

One frozen record for the LLaMA / Qwen2 / Qwen3 family; their differences are flags (`qkv_bias`, `qk_norm`,
`tied_embeddings`, `rope_theta`), not separate classes. Each format module builds it from its own metadata.
`qk_layout` records how the checkpoint stores the rows of attn_q / attn_k: LLaMA GGUFs (and .apr files
imported from them) keep llama.cpp's per-head interleaved order, which pairs with adjacent-pair RoPE; Hugging
Face weights pair with half-split (rotate_half) RoPE. The two are the same model up to that row permutation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt


class QKLayout(StrEnum):
    HF = "hf"  # rotate_half RoPE: element i pairs with i + head_dim/2 (NEOX)
    INTERLEAVED = "gguf-interleaved"  # llama.cpp NORM RoPE: element 2i pairs with 2i+1

    @property
    def rope_pairing(self) -> str:
        return "half-split" if self is QKLayout.HF else "adjacent"


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str  # "llama", "qwen2", "qwen3" (lower case, GGUF spelling)
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tied_embeddings: bool = False
    qk_layout: QKLayout = QKLayout.HF
    max_position: int = 2048
    n_experts: int = 0

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["qk_layout"] = self.qk_layout.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are ignored so older/newer manifests still load."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "qk_layout" in known:
            known["qk_layout"] = QKLayout(known["qk_layout"])
        return cls(**known)


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
