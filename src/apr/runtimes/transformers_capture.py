"""The transformers runtime's capture: forward hooks on a model's modules and the "apr_eager" attention
function, which turn what the model computes into tapped stages (where each stage comes from: the
docstring of runtimes/transformers.py)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Final

import numpy as np

from apr.errors import InferenceError
from apr.models.base import HookMap
from apr.models.common import ITEM
from apr.runtimes.base import ENGINE_TRANSFORMERS, Array, ForwardOrderTap
from apr.runtimes.transformers_f64 import softmax_probe
from apr.stages import Stage, StageId, Tap

_OUT: Final = "out"  # hook the module's output
_IN: Final = "in"  # hook the module's first positional input
_LOGITS: Final = "logits"  # hook the `logits` field of the module's output

# (submodule of a decoder layer, which side, stage); "" is the decoder layer itself. The embedding is the
# input of the first layer (after Gemma's / Granite's scaling) and lm_head the model's own logits output
# (after Granite's division, Gemma 2's soft-cap): the same values the reference engine emits.
MODEL_HOOKS: Final[tuple[tuple[str, str, StageId], ...]] = (
    ("model.layers.0", _IN, StageId(Stage.EMBEDDING, 0)),
    ("model.norm", _OUT, StageId(Stage.FINAL_NORM)),
    ("", _LOGITS, StageId(Stage.LM_HEAD)),
)
QKV_PROJECTIONS: Final = ("q_proj", "k_proj", "v_proj")
_GATED_PARTS: Final = ("x", "gate")  # HookMap.gated: (submodule, gate submodule)


def has_qkv_bias(model: Any) -> bool:
    attn = model.model.layers[0].self_attn
    return any(getattr(getattr(attn, p, None), "bias", None) is not None for p in QKV_PROJECTIONS)


@contextlib.contextmanager
def tapped(
    model: Any, torch: Any, tap: Tap, hooks: HookMap, exact64: bool = False
) -> Iterator[ForwardOrderTap]:
    """Inside: every forward pass of `model` taps its stages (in forward order, on exit) as described in
    the module docstring."""
    ordered = ForwardOrderTap(tap, ENGINE_TRANSFORMERS)
    capture = _Capture(ordered, torch, has_qkv_bias(model), exact64)
    with _hooks(model, capture, hooks), torch.no_grad():
        token = _ACTIVE.set(capture)
        try:
            yield ordered
        finally:
            _ACTIVE.reset(token)
    ordered.close()


class _Capture:
    """Turns hook payloads (batch-1 torch tensors) into canonical float32 arrays for the ordered tap."""

    def __init__(self, tap: ForwardOrderTap, torch: Any, qkv_bias: bool, exact64: bool = False) -> None:
        self.tap = tap
        self.torch = torch
        self.qkv_bias = qkv_bias
        self.exact64 = exact64
        self._qkv: dict[int, dict[str, tuple[Array, Array]]] = {}
        self._gated: dict[StageId, dict[str, Any]] = {}

    def array(self, t: Any) -> Array:
        if self.exact64:
            return np.array(t.detach().to(self.torch.float64).cpu().numpy(), dtype=np.float64)
        return np.array(t.detach().to(self.torch.float32).cpu().numpy(), dtype=np.float32)

    def emit(self, sid: StageId, t: Any) -> None:
        self.tap(sid, self.array(t[0]))  # drop the batch axis

    def projection(self, layer: int, name: str, module: Any, x: Any, out: Any) -> None:
        """One of q/k/v_proj ran; once all three have, emit [Q|K|V] (and the biased version)."""
        biased = self.array(out[0])
        if module.bias is None:
            plain = biased
        else:
            plain = self.array(self.torch.nn.functional.linear(x[0], module.weight))
        parts = self._qkv.setdefault(layer, {})
        parts[name] = (plain, biased)
        if len(parts) < len(QKV_PROJECTIONS):
            return
        ordered = [parts.pop(p) for p in QKV_PROJECTIONS]
        self.tap(StageId(Stage.QKV_MATMUL, layer), np.concatenate([p[0] for p in ordered], axis=-1))
        if self.qkv_bias:
            self.tap(StageId(Stage.QKV_BIAS, layer), np.concatenate([p[1] for p in ordered], -1))

    def gated(self, sid: StageId, part: str, t: Any) -> None:
        """One factor of a gated product ran (flat (batch·S, …)); once both have, emit sigmoid(gate) · x."""
        parts = self._gated.setdefault(sid, {})
        parts[part] = t
        if len(parts) == len(_GATED_PARTS):
            del self._gated[sid]
            self.tap(sid, self.array(self.torch.sigmoid(parts["gate"]) * parts["x"]))

    def attention(self, layer: int, query: Any, key: Any, scores: Any, probs: Any, mask: Any) -> None:
        """Post-rope Q (1,H,S,Dh) and K (1,Hkv,S,Dh); softmax input and output (1,H,S,S); the additive
        mask (1,1,S,S) or None. attn_scores keeps what the mask lets through (0 elsewhere: the future,
        and keys outside a sliding window)."""
        for stage, t in ((Stage.Q_POST_ROPE, query), (Stage.K_POST_ROPE, key)):
            heads = self.array(t[0])  # (heads, S, Dh)
            self.tap(StageId(stage, layer), heads.transpose(1, 0, 2).reshape(heads.shape[1], -1))
        x = self.array(scores[0])  # (H, S, S)
        if mask is None:
            kept = np.tril(np.ones(x.shape[-2:], dtype=bool))
        else:
            m = mask.detach().cpu().numpy()[0, 0, :, : x.shape[-1]]
            kept = m if m.dtype == np.bool_ else m == 0
        self.tap(StageId(Stage.ATTN_SCORES, layer), np.where(kept, x, x.dtype.type(0)))
        self.tap(StageId(Stage.ATTN_SOFTMAX, layer), self.array(probs[0]))


_ACTIVE: ContextVar[_Capture | None] = ContextVar("apr_transformers_capture", default=None)


def capturing_attention(module: Any, query: Any, key: Any, *args: Any, **kwargs: Any) -> Any:
    """The "apr_eager" attention function: the model's own eager attention, observed."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    capture = _ACTIVE.get()
    if capture is None:
        return eager(module, query, key, *args, **kwargs)
    probe = softmax_probe(capture.torch, capture.exact64)
    with probe:
        out, probs = eager(module, query, key, *args, **kwargs)
    if len(probe.inputs) != 1:
        raise InferenceError(f"eager attention ran {len(probe.inputs)} softmaxes, expected 1")
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    capture.attention(module.layer_idx, query, key, probe.inputs[0], probs, mask)
    return out, probs


@contextlib.contextmanager
def _hooks(model: Any, capture: _Capture, hooks: HookMap) -> Iterator[None]:
    handles = []
    for i, layer in enumerate(model.model.layers):
        for sub, side, stage in hooks.layer:
            module = _submodule(layer, sub)
            if module is not None:  # a module this model lacks: the stage is reported unavailable
                handles.append(_hook(module, side, StageId(stage, i), capture))
        for sub, gate, stage in hooks.gated:
            modules = (_submodule(layer, sub), _submodule(layer, gate))
            if None in modules:
                continue  # a module this model lacks: the stage is reported unavailable
            for module, part in zip(modules, _GATED_PARTS, strict=True):
                handles.append(module.register_forward_hook(_gated_hook(capture, StageId(stage, i), part)))
        for p in QKV_PROJECTIONS if hooks.qkv else ():  # a fused qkv projection is hooked as a layer stage
            proj = getattr(layer.self_attn, p)
            handles.append(proj.register_forward_hook(_projection_hook(capture, i, p)))
    for sub, side, sid in MODEL_HOOKS:
        handles.append(_hook(model.get_submodule(sub), side, sid, capture))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _submodule(parent: Any, name: str) -> Any:
    try:
        return parent.get_submodule(name)
    except AttributeError:
        return None


def _hook(module: Any, side: str, sid: StageId, capture: _Capture) -> Any:
    if side == _LOGITS:

        def logits(_m: Any, _args: tuple[Any, ...], out: Any) -> None:
            capture.emit(sid, out.logits)

        return module.register_forward_hook(logits)
    if side == _IN:

        def pre(_m: Any, args: tuple[Any, ...]) -> None:
            capture.emit(sid, args[0])

        return module.register_forward_pre_hook(pre)

    if side.startswith(ITEM):  # "item:k": item k of a tuple of flat (batch·S, …) tensors (a router's)
        k = int(side[len(ITEM) :])

        def item(_m: Any, _args: tuple[Any, ...], out: Any) -> None:
            capture.tap(sid, capture.array(out[k]))  # batch 1: already (S, …)

        return module.register_forward_hook(item)

    if side.startswith(_OUT + ":"):  # "out:k/n": the k-th of n equal chunks of the last axis (fused)
        k, n = (int(x) for x in side.split(":")[1].split("/"))

        def chunk(_m: Any, _args: tuple[Any, ...], out: Any) -> None:
            capture.emit(sid, out.chunk(n, dim=-1)[k])

        return module.register_forward_hook(chunk)

    def post(_m: Any, _args: tuple[Any, ...], out: Any) -> None:
        capture.emit(sid, out[0] if isinstance(out, tuple) else out)

    return module.register_forward_hook(post)


def _gated_hook(capture: _Capture, sid: StageId, part: str) -> Callable[..., None]:
    def post(_m: Any, _args: tuple[Any, ...], out: Any) -> None:
        capture.gated(sid, part, out)

    return post


def _projection_hook(capture: _Capture, layer: int, name: str) -> Callable[..., None]:
    def post(module: Any, args: tuple[Any, ...], out: Any) -> None:
        capture.projection(layer, name, module, args[0], out)

    return post
