"""The transformers oracle: one eager forward pass of a LLaMA / Qwen2 / Qwen3 model, tapped stage by stage.

Where each stage comes from (all from the model's own computation, nothing re-derived in numpy):
- module forward hooks: embed_tokens, input_layernorm, q/k/v_proj, o_proj, post_attention_layernorm,
  gate/up/down_proj, act_fn, the decoder layer, model.norm, lm_head; forward pre-hooks for the inputs of
  o_proj (`attention`), post_attention_layernorm (`post_attn_residual`) and down_proj (`ffn_swigl`).
- an attention function registered in transformers' AttentionInterface as "apr_eager": it receives Q and K
  after q_norm and RoPE (`q_post_rope`, `k_post_rope`) and calls the model's own `eager_attention_forward`,
  whose softmax input (scores·scale + causal mask) is caught with a TorchFunctionMode; `attn_scores` is
  that input with the above-diagonal part set to 0.0, `attn_softmax` is eager's returned probabilities.
- one exception: with a q/k/v bias, HF adds the bias inside the projection (addmm), so the pre-bias
  `qkv_matmul` is x·Wᵀ recomputed by torch from the projection's own input and weight (said in `notes`).
- mixture of experts (eager experts implementation): the router module's own outputs (logits, top-k
  weights, top-k ids: `item:k` hooks), the MoE block's output; Qwen2-MoE's gated shared expert is
  sigmoid(gate output) · shared-expert output, multiplied by torch as the block does (`HookMap.gated`).

transformers is imported on first use; without it, `FeatureDisabledError`. Never downloads
(`local_files_only=True`); a .gguf path is loaded with `gguf_file=` (needs accelerate).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Final

import numpy as np

from apr.errors import (
    FeatureDisabledError,
    InferenceError,
    ModelLoadError,
    NotFoundError,
    ValidationError,
)
from apr.formats.config import QKLayout
from apr.models.base import HookMap
from apr.models.common import ITEM, LLAMA_LAYER_HOOKS
from apr.panics import HeldStderr, is_panic
from apr.runtimes.base import (
    ENGINE_TRANSFORMERS,
    Array,
    ForwardOrderTap,
    RuntimeRun,
    check_token_ids,
    missing_stages,
    model_stages,
)
from apr.runtimes.transformers_f64 import lift_float32_islands, softmax_probe
from apr.stages import Stage, StageId, Tap

DTYPES: Final = ("float32", "float64")
ATTN_IMPLEMENTATION: Final = "apr_eager"

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


def run_transformers(
    model_path: Path,
    token_ids: Sequence[int],
    tap: Tap,
    *,
    dtype: str = "float32",
    hooks: HookMap | None = None,
    expected: Sequence[Stage] | None = None,
    partial_ok: bool = False,
) -> RuntimeRun:
    """Run `token_ids` through transformers (eager attention, no KV cache) and tap every stage.

    Args:
        model_path: a Hugging Face folder (config.json + safetensors) or a .gguf file.
        token_ids: the prompt, already tokenized; one prefill pass over all of it.
        tap: called as `tap(StageId, float32 array)` for every stage, in forward order.
        dtype: "float32", or "float64": the model is cast after loading and the float32 islands transformers
            keeps for half precision (RMSNorm, RoPE angles, eager softmax) are lifted to float64, so the
            run is a true float64 reference; taps then get float64 arrays.
        hooks: where the model's family exposes each stage (apr.models: `Family.hooks`); default the llama
            family's module names. A hooked submodule the model lacks makes that stage unavailable.
        expected: the stages the model has (its family's graph); default the dense llama stages.

    Example:
        >>> run = run_transformers(Path("smollm2.gguf"), [1780, 314, 216], tap)  # doctest: +SKIP
        >>> run.qk_layout, run.unavailable
        (<QKLayout.HF: 'hf'>, ())
    """
    hooks = hooks or HookMap(LLAMA_LAYER_HOOKS, ())
    torch, transformers, model = open_transformers(Path(model_path), dtype, hooks)
    ids = check_token_ids(token_ids, int(model.config.vocab_size))
    qkv_bias = has_qkv_bias(model)
    with tapped(model, torch, tap, hooks, dtype == "float64") as ordered:
        model(input_ids=torch.tensor([ids]), use_cache=False)
    n_layers = len(model.model.layers)
    want = (
        [s for s in expected if qkv_bias or s is not Stage.QKV_BIAS]
        if expected
        else model_stages(qkv_bias=qkv_bias)
    )
    unavailable = missing_stages(want, ordered.seen, n_layers, ENGINE_TRANSFORMERS, partial_ok=partial_ok)
    return RuntimeRun(
        engine=ENGINE_TRANSFORMERS,
        engine_version=f"transformers {transformers.__version__} / torch {torch.__version__}",
        token_ids=ids,
        qk_layout=QKLayout.HF,
        unavailable=unavailable,
        notes=_notes(qkv_bias, dtype, unavailable, moe=bool(hooks.gated) or any(s.moe for s in want)),
        settings={
            "architecture": type(model).__name__,
            "dtype": dtype,
            "attn_implementation": f"{ATTN_IMPLEMENTATION} (the model's eager_attention_forward)",
            "use_cache": "false",
            "device": "cpu",
            "torch_threads": str(torch.get_num_threads()),
        },
    )


def open_transformers(path: Path, dtype: str, hooks: HookMap) -> tuple[Any, Any, Any]:
    """(torch, transformers, the model) loaded as `run_transformers` runs it (eager attention, `dtype`;
    float64: the float32 islands lifted)."""
    torch, transformers = _import_transformers()
    if dtype not in DTYPES:
        raise ValidationError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model = _load(transformers, torch, path, getattr(torch, dtype))
    if dtype == "float64":
        lift_float32_islands(model, torch, hooks.rms_norm_offset)
    return torch, transformers, model


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


def _notes(qkv_bias: bool, dtype: str, unavailable: tuple[Stage, ...], moe: bool = False) -> tuple[str, ...]:
    notes = [
        "q_post_rope/k_post_rope: the query/key handed to the attention function (after q_norm and "
        "apply_rotary_pos_emb)",
        "attn_scores: the softmax input of eager_attention_forward (QKᵀ·scaling + causal mask) with the "
        "above-diagonal entries set to 0.0",
    ]
    if qkv_bias:
        notes.append(
            "qkv_matmul: x·Wᵀ recomputed by torch from each projection's input and weight (HF fuses the "
            "bias into the projection); qkv_bias is the projections' own output"
        )
    else:
        notes.append("qkv_bias: not applicable, the model has no q/k/v bias")
    if moe:
        notes.append(
            "moe_router/moe_router_indices: the router module's own top-k weights and expert ids "
            "(torch.topk: the order of tied probabilities is unspecified); moe_shared_out: "
            "sigmoid(shared_expert_gate output) · shared_expert output, multiplied by torch as the MoE "
            "block does"
        )
    if dtype == "float64":
        notes.append(
            "float64: RMSNorm, RoPE angles and the eager softmax run in float64 (transformers computes "
            "them in float32 even in a float64 model; lifted so the run is a true float64 reference)"
            + ("; so do the MoE routers (softmax, top-k, renormalisation)" if moe else "")
        )
    notes.extend(f"{s}: no hook produced it" for s in unavailable)
    return tuple(notes)


# -- loading ---------------------------------------------------------------------------------------


def _import_transformers() -> tuple[Any, Any]:
    try:
        torch = importlib.import_module("torch")
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise FeatureDisabledError("--engine transformers", "transformers") from None
    _register_attention(transformers)
    return torch, transformers


def _register_attention(transformers: Any) -> None:
    """Make "apr_eager" a valid attn_implementation (idempotent; uses eager's causal mask)."""
    modeling_utils = importlib.import_module("transformers.modeling_utils")
    masking_utils = importlib.import_module("transformers.masking_utils")
    modeling_utils.AttentionInterface.register(ATTN_IMPLEMENTATION, _capturing_attention)
    masking_utils.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, masking_utils.eager_mask)


def _load(transformers: Any, torch: Any, path: Path, dtype: Any) -> Any:
    if not path.exists():
        raise NotFoundError(f"model not found: {path}")
    kwargs: dict[str, Any] = {
        "dtype": torch.float32,
        "attn_implementation": ATTN_IMPLEMENTATION,
        "experts_implementation": "eager",  # the modeling file's own loop over experts (not grouped_mm)
        "local_files_only": True,
    }
    source = path
    if path.is_file():
        source, kwargs["gguf_file"] = path.parent, path.name
    with _quiet(transformers), HeldStderr() as held:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
        except Exception as e:  # transformers raises anything from OSError to KeyError here
            raise ModelLoadError(f"transformers could not load {path}: {_first_line(e)}") from None
        except BaseException as e:  # a Rust panic in safetensors / tokenizers (pyo3's PanicException)
            if not is_panic(e):
                raise
            if hook_text := held.take():  # Rust's panic banner: shown only by --debug's traceback
                e.add_note(hook_text)
            raise ModelLoadError(f"transformers could not load {path}: {_first_line(e)}") from e
    if not hasattr(getattr(model, "model", None), "layers"):
        raise ModelLoadError(f"transformers runtime traces decoder models (model.layers); {path} is a "
                             f"{type(model).__name__}")  # fmt: skip
    return model.to(dtype).eval()


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No progress bars or warnings from transformers while loading (the library never prints).

    The GGUF loader draws its own `tqdm` bar, which no transformers switch turns off: stderr is redirected.
    """
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# -- capture ---------------------------------------------------------------------------------------


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


def _capturing_attention(module: Any, query: Any, key: Any, *args: Any, **kwargs: Any) -> Any:
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
