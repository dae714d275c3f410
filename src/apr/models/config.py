"""ModelConfig: everything a family's forward pass needs to know, whatever file it came from.

One frozen record for every family; a family uses the fields its math has and leaves the rest at their
neutral defaults (a multiplier of 1, no window, no cap). Families build it from GGUF metadata, HF
`config.json` or `.apr` metadata through their parameter table (models/params.py), never by hand per format.

`qk_layout` records how the checkpoint stores the rows of attn_q / attn_k: llama-style GGUFs (and .apr files
imported from them) keep llama.cpp's per-head interleaved order, which pairs with adjacent-pair RoPE; Hugging
Face weights pair with half-split (rotate_half) RoPE. `norm_offset` is what the forward adds to every norm
weight: Gemma's HF weights store w for a (1 + w) norm, its GGUFs store 1 + w already (the converter adds it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

from apr.formats.config import QKLayout

ROPE_KINDS: Final = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling as transformers' `rope_scaling` / llama.cpp's `rope.scaling.*` describe it."""

    kind: str = "default"  # one of ROPE_KINDS
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int = 0  # llama3, yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float = 0.0  # yarn: cos/sin multiplier; 0 = 0.1·ln(factor) + 1
    freq_factors: bool = False  # the checkpoint carries per-frequency divisors (GGUF rope_freqs.weight)

    def hf_dict(self) -> dict[str, Any] | None:
        """HF's `rope_scaling` for a scaling apr implements (None for the default)."""
        if self.kind == "default" or self.freq_factors:
            return None
        d: dict[str, Any] = {"rope_type": self.kind, "factor": self.factor}
        if self.kind == "llama3":
            d |= {"low_freq_factor": self.low_freq_factor, "high_freq_factor": self.high_freq_factor}
        if self.kind in ("llama3", "yarn"):
            d["original_max_position_embeddings"] = self.original_max_position
        if self.kind == "yarn":
            d |= {"beta_fast": self.beta_fast, "beta_slow": self.beta_slow}
            if self.attention_factor:
                d["attention_factor"] = self.attention_factor
        return d


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str  # the family member: "llama", "mistral", "qwen2", "gemma2", … (GGUF spelling)
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    family: str = "llama"  # the family module that runs it (apr.models.<family>)
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tied_embeddings: bool = False
    qk_layout: QKLayout = QKLayout.HF
    max_position: int = 2048
    n_experts: int = 0  # mixture of experts: experts per layer (0: a dense FFN)
    n_experts_used: int = 0  # experts each token is routed to (top-k)
    expert_ffn: int = 0  # an expert's FFN width
    shared_expert_ffn: int = 0  # the shared expert's FFN width (Qwen2-MoE; 0: none)
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    sliding_window: int = 0  # 0: none; else a key j is seen by query i when i - j < window
    sliding_layers: tuple[int, ...] = ()  # layers with the window (all layers when empty and window > 0)
    rope_local_theta: float = 0.0  # Gemma 3: the RoPE base of the sliding-window layers (0: rope_theta)
    attn_scale: float = 0.0  # scores = Q·Kᵀ·attn_scale; 0 means 1/sqrt(head_dim)
    attn_softcap: float = 0.0  # Gemma 2: scores = cap·tanh(scores/cap); 0 = none
    final_softcap: float = 0.0  # Gemma 2: logits = cap·tanh(logits/cap); 0 = none
    embed_scale: float = 1.0  # Gemma: sqrt(hidden); Granite: embedding_multiplier
    residual_scale: float = 1.0  # Granite: x + residual_scale · sublayer(x)
    logit_divisor: float = 1.0  # Granite: logits / logits_scaling
    norm_offset: float = 0.0  # added to every norm weight (Gemma HF: 1.0)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    def layer_window(self, layer: int) -> int:
        """The sliding window of `layer` (0: full causal attention)."""
        if not self.sliding_window or (self.sliding_layers and layer not in self.sliding_layers):
            return 0
        return self.sliding_window

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["qk_layout"] = self.qk_layout.value
        d["sliding_layers"] = list(self.sliding_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are ignored so older/newer manifests still load."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "qk_layout" in known:
            known["qk_layout"] = QKLayout(known["qk_layout"])
        if isinstance(known.get("rope_scaling"), dict):
            names = {f.name for f in fields(RopeScaling)}
            known["rope_scaling"] = RopeScaling(
                **{k: v for k, v in known["rope_scaling"].items() if k in names}
            )
        if "sliding_layers" in known:
            known["sliding_layers"] = tuple(known["sliding_layers"])
        return cls(**known)
