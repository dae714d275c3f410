"""transformers in true float64: the float32 islands it keeps for half precision, lifted per instance.

transformers computes RMSNorm, the RoPE angles, the eager softmax and the MoE routers' softmax in float32
even in a float64 model. For a float64 oracle run (`run_transformers(dtype="float64")`) each is replaced, on
this model instance only, by the same math in the model's dtype; the softmax through a TorchFunctionMode that
also records every softmax input (the attention scores apr captures).
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Sequence
from typing import Any, Final

from apr.errors import ValidationError

TOPK_ROUTERS: Final = frozenset({"MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter"})


def softmax_probe(torch: Any, exact64: bool = False) -> Any:
    """A TorchFunctionMode that records the input of every softmax call made inside it.

    With `exact64`, a softmax asked to run in float32 on a float64 input runs in float64 instead.
    """
    mode: Any = importlib.import_module("torch.overrides").TorchFunctionMode
    softmaxes = (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax)

    class SoftmaxProbe(mode):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.inputs: list[Any] = []

        def __torch_function__(
            self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
        ) -> Any:
            kwargs = dict(kwargs or {})
            if func in softmaxes:
                self.inputs.append(args[0])
                if exact64 and args[0].dtype == torch.float64 and kwargs.get("dtype") == torch.float32:
                    kwargs["dtype"] = torch.float64
            return func(*args, **kwargs)

    return SoftmaxProbe()


def lift_float32_islands(model: Any, torch: Any, norm_offset: float = 0.0) -> None:
    """Make RMSNorm and the rotary embedding compute in the model's float64 (per instance, this run only).

    `norm_offset` is what the family's RMSNorm adds to its weight (Gemma: 1)."""

    def rms_norm(self: Any, x: Any) -> Any:
        variance = x.pow(2).mean(-1, keepdim=True)
        eps = getattr(self, "variance_epsilon", None) or self.eps
        return (self.weight + norm_offset) * (x * torch.rsqrt(variance + eps))

    def rotary(self: Any, x: Any, position_ids: Any, layer_type: str | None = None) -> Any:
        theta = self.apr_theta if layer_type is None else self.apr_thetas[layer_type]
        dim = model.config.head_dim or model.config.hidden_size // model.config.num_attention_heads
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def router(self: Any, hidden_states: Any) -> Any:  # the routers' forward, minus their float32 casts
        logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        top, ids = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):  # Mixtral's router has no flag: it always renormalises
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top, ids

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm, module)
        if type(module).__name__ in TOPK_ROUTERS:
            module.forward = types.MethodType(router, module)
    rope = model.model.rotary_emb
    params = getattr(model.config, "rope_parameters", None) or {}
    kinds = (
        rope.rope_type if isinstance(rope.rope_type, dict) else {None: getattr(rope, "rope_type", "default")}
    )
    if any(k != "default" for k in kinds.values()):
        bad = next(k for k in kinds.values() if k != "default")
        raise ValidationError(f"float64 oracle supports default RoPE only, not {bad!r}")
    if isinstance(rope.rope_type, dict):  # per layer type (Gemma 3)
        rope.apr_thetas = {t: float(params[t]["rope_theta"]) for t in rope.rope_type}
    else:
        rope.apr_theta = float(params.get("rope_theta") or model.config.rope_theta)
    rope.forward = types.MethodType(rotary, rope)
