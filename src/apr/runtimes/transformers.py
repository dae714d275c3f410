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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from apr.errors import (
    FeatureDisabledError,
    ModelLoadError,
    NotFoundError,
    ValidationError,
)
from apr.formats import detect_format
from apr.formats.config import QKLayout
from apr.formats.safetensors import check_weight_files
from apr.models.base import HookMap
from apr.models.common import LLAMA_LAYER_HOOKS
from apr.panics import HeldStderr, is_panic
from apr.runtimes.base import (
    ENGINE_TRANSFORMERS,
    RuntimeRun,
    check_loadable,
    check_token_ids,
    missing_stages,
    model_stages,
)
from apr.runtimes.transformers_capture import capturing_attention, has_qkv_bias, tapped
from apr.runtimes.transformers_f64 import lift_float32_islands
from apr.stages import Stage, Tap

DTYPES: Final = ("float32", "float64")
ATTN_IMPLEMENTATION: Final = "apr_eager"


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
    modeling_utils.AttentionInterface.register(ATTN_IMPLEMENTATION, capturing_attention)
    masking_utils.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, masking_utils.eager_mask)


def _load(transformers: Any, torch: Any, path: Path, dtype: Any) -> Any:
    if not path.exists():
        raise NotFoundError(f"model not found: {path}")
    check_loadable(ENGINE_TRANSFORMERS, path, detect_format(path).name)
    if path.is_dir():
        check_weight_files(path)  # transformers and apr would load different weights: refused
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
