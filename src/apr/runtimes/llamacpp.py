"""The llama.cpp oracle: one prefill `llama_decode` of a GGUF, with every graph node seen by `cb_eval`.

Settings that make it an exact oracle (oracles §4–5): flash attention off (the kq / kq_soft_max nodes exist
only then), an F32 KV cache (F16, llama.cpp's default, with `kv_type="f16"`), fixed n_threads, CPU only,
n_ctx = n_batch = n_ubatch = the next multiple of 256 ≥ S so that the prompt is one ubatch and one graph.

Which node is which stage is the family's table (apr.models: `Family.ggml_nodes`, the names the model
builder gives `cb(tensor, name, il)`; default the llama family's). A name is `name-{il}`, or bare when the
builder passes il = -1: bare whole-model names (`embd`, Gemma's `inp_scaled`, `result_norm`,
`result_output`) are the embedding / final_norm / lm_head; a bare per-layer name (gemma2's and olmo2's
`ffn_post_norm`) belongs to the layer of the last `-{il}` node the callback saw, since the graph runs layer
by layer. When one name sits on several consecutive ops, the last one is the value. What no table says:

    Qcur/Kcur/Vcur (build_qkv): the MUL_MAT → qkv_matmul, the bias ADD → qkv_bias, the ROPE → q/k_post_rope
    attn_scores: the SOFT_MAX's input (a table node: kq, or kq_scaled_2 after Gemma 2's soft-cap) × the
        SOFT_MAX's scale, [:, :S, :S], entries its mask (src[1]) hides set to 0.0
    attn_softmax: kq_soft_max [:, :S, :S]          (both are padded to the KV-cache view, ≥ 256 cells)
    attn_out, post_attn_residual: by structure from kqv_out-i (llamacpp_capture.py); Phi-3's residual unnamed
    ffn_gate, ffn_up of a GLU op with one input (Phi-3's ffn_up is [gate|up]): the halves of that input
    moe_router: input 1 of the node the table maps to it (ffn_moe_weighted = expert outputs × top-k weights;
        the weights' own name differs per variant: ffn_moe_weights_norm, or ffn_moe_weights unnormalised)
    moe_router_indices: ffn_moe_topk, an I32 view of the ARGSORT (first k columns), as float32
    moe_ffn_out: the input of the layer's post_ffn_residual ADD that is not post_attn_residual, in a layer
        with a router (ffn_moe_out in llama and qwen3moe; qwen2moe's ffn_out, routed + shared expert).
        Every ADD after the router is copied as it is computed, since ggml-alloc lets the residual ADD
        overwrite its input in place; the residual ADD then says which copy it was

The hidden entries come from the mask llama.cpp applied, not from apr's reading of the config: the oracle
reports which keys llama.cpp's own sliding-window rules (pattern defaults, Phi-3's disabled SWA) hid, so a
disagreement with apr shows up in the trace instead of being zeroed away. Arrays come out of ggml
innermost-first, so numpy shape = ne reversed. With a NORM-rope (llama) GGUF the Q/K-derived stages are in
llama.cpp's per-head interleaved order (`QKLayout.INTERLEAVED`); with NEOX rope (qwen2/3, gemma, phi3,
olmo2) they are in HF order. A fused GLU op (SWIGLU, GEGLU) never materializes act(gate): `ffn_silu` is
unavailable. Everything else is a copy of a node llama.cpp computed, reshaped, sliced or split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

from apr.errors import AprError, InferenceError, ModelLoadError, NotFoundError, ValidationError
from apr.formats import detect_format
from apr.formats.config import QKLayout
from apr.models.common import LLAMA_NODES
from apr.runtimes.base import (
    ENGINE_LLAMACPP,
    ForwardOrderTap,
    RuntimeRun,
    check_loadable,
    check_token_ids,
    missing_stages,
    model_stages,
)
from apr.runtimes.llamacpp_capture import NodeRecorder, emit_stages
from apr.runtimes.llamacpp_ggml import GGML_TYPE_F16, GGML_TYPE_F32, LogSink, bind
from apr.stages import Stage, Tap

CTX_ALIGN: Final = 256  # llama.cpp pads the KV view to 256 cells anyway
FLASH_ATTN_DISABLED: Final = 0
KV_TYPES: Final = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16}  # the KV cache's element type

# llama_rope_type → (name, layout of Q/K as computed): NORM pairs adjacent entries, on rows that
# convert_hf_to_gguf permuted per head; NEOX pairs i with i + Dh/2, on rows in HF order.
ROPE_TYPES: Final[dict[int, tuple[str, QKLayout]]] = {
    0: ("norm", QKLayout.INTERLEAVED),
    2: ("neox", QKLayout.HF),
}
UNAVAILABLE_REASONS: Final[dict[Stage, str]] = {
    Stage.FFN_SILU: "llama.cpp computes act(gate)·up as one fused GLU op (SWIGLU: ffn_swiglu, GEGLU: "
    "ffn_geglu); act(gate) is never materialized",
}


def run_llamacpp(
    model_path: Path,
    token_ids: Sequence[int],
    tap: Tap,
    *,
    n_threads: int = 2,
    nodes: Mapping[str, Stage] | None = None,
    expected: Sequence[Stage] | None = None,
    partial_ok: bool = False,
    kv_type: str = "f32",
) -> RuntimeRun:
    """Run `token_ids` through llama.cpp (one prefill decode, CPU) and tap every stage it exposes.

    Args:
        model_path: a .gguf file (another format raises ValidationError: `runtimes/base.py` LOADS).
        token_ids: the prompt, already tokenized (no BOS is added).
        tap: called as `tap(StageId, float32 array)` for every stage, in forward order.
        n_threads: llama.cpp threads; fixed so runs repeat bit for bit.
        nodes: graph node name (without "-{layer}") → stage: the model family's `ggml_nodes`; default the
            llama family's.
        expected: the stages the model has (its family's graph); default the dense llama stages. A stage
            llama.cpp exposes outside it is a table error and raises.
        kv_type: the KV cache's type, "f32" (default: attention in f32) or "f16" (llama.cpp's default).

    Example:
        >>> run = run_llamacpp(Path("smollm2-f32.gguf"), [1780, 314, 216], tap)  # doctest: +SKIP
        >>> run.qk_layout, run.unavailable
        (<QKLayout.INTERLEAVED: 'gguf-interleaved'>, (<Stage.FFN_SILU: 'ffn_silu'>,))
    """
    ggml, log = bind()
    llama = ggml.llama_cpp
    path = Path(model_path)
    if not path.exists():
        raise NotFoundError(f"model not found: {path}")
    check_loadable(
        ENGINE_LLAMACPP, path, detect_format(path).name
    )  # a folder or .apr: say so, not "load failed"
    if n_threads < 1:
        raise ValidationError(f"n_threads must be >= 1, got {n_threads}")
    if kv_type not in KV_TYPES:
        raise ValidationError(f"unknown KV cache type {kv_type!r} (choose from {', '.join(KV_TYPES)})")
    recorder = NodeRecorder(ggml, LLAMA_NODES if nodes is None else nodes)
    with log.capture():
        done = _run(llama, recorder, path, token_ids, n_threads, log, kv_type)
    ordered = ForwardOrderTap(tap, ENGINE_LLAMACPP)
    scales = emit_stages(recorder, done.n_layers, len(done.ids), ordered)
    ordered.close()
    qkv_bias = any(sid.stage is Stage.QKV_BIAS for sid in ordered.seen)
    want = model_stages(qkv_bias=qkv_bias) if expected is None else tuple(expected)
    stray = sorted({sid.stage for sid in ordered.seen} - set(want), key=lambda s: s.order)
    if expected is not None and stray:
        raise InferenceError(f"llama.cpp exposed {stray[0]}, which the model's stage graph does not have")
    unavailable = missing_stages(want, ordered.seen, done.n_layers, ENGINE_LLAMACPP, partial_ok=partial_ok)
    rope_name, qk_layout = ROPE_TYPES[done.rope_type]
    settings = {**done.settings, "rope_type": rope_name}
    settings["kq_scale"] = ",".join(f"{s:.9g}" for s in sorted(set(scales)))
    return RuntimeRun(
        engine=ENGINE_LLAMACPP,
        engine_version=ggml.version,
        token_ids=done.ids,
        qk_layout=qk_layout,
        unavailable=unavailable,
        notes=_notes(qkv_bias, bool(recorder.fused_glu), settings, unavailable, recorder.reasons),
        settings=settings,
    )


class _Decoded(NamedTuple):
    ids: tuple[int, ...]
    rope_type: int
    n_layers: int
    settings: dict[str, str]


def _run(
    llama: Any,
    recorder: NodeRecorder,
    path: Path,
    token_ids: Sequence[int],
    n_threads: int,
    log: LogSink,
    kv_type: str = "f32",
) -> _Decoded:
    """Load the model, check the ids, decode once with the recorder, free the model."""
    model = _load_model(llama, path, log)
    try:
        ids = check_token_ids(token_ids, llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model)))
        rope_type = llama.llama_model_rope_type(model)
        if rope_type not in ROPE_TYPES:
            raise ModelLoadError(f"llama.cpp runtime supports NORM and NEOX rope; {path} uses {rope_type}")
        settings = _decode(llama, model, ids, recorder, n_threads, log, kv_type)
        return _Decoded(ids, rope_type, llama.llama_model_n_layer(model), settings)
    finally:
        llama.llama_model_free(model)


def _notes(
    qkv_bias: bool,
    fused_ffn: bool,
    settings: dict[str, str],
    unavailable: tuple[Stage, ...],
    reasons: Mapping[Stage, str],
) -> tuple[str, ...]:
    how = {
        Stage.ATTN_SCORES: f"the SOFT_MAX input (kq = Q·Kᵀ, already × the attention scale where the builder "
        f"scales Q first; kq_scaled_2 after soft-capping) × the SOFT_MAX scale {settings['kq_scale']}, "
        f"sliced to [:, :S, :S] of the {settings['n_ctx']}-cell KV view; entries the SOFT_MAX's mask hides "
        "(future keys, keys outside a sliding window) set to 0.0",
        Stage.ATTN_SOFTMAX: "kq_soft_max sliced to [:, :S, :S]",
        Stage.QKV_MATMUL: "the Qcur/Kcur/Vcur MUL_MAT nodes concatenated per position, or the fused wqkv",
        Stage.ATTN_OUT: "the O-projection on the path from kqv_out into the residual add (by structure)",
    }
    notes = [f"{s}: {text}" for s, text in how.items() if s not in unavailable]
    if fused_ffn:
        notes.append("ffn_gate, ffn_up: the halves of the fused ffn_up node the GLU op splits")
    if not qkv_bias:
        notes.append("qkv_bias: not applicable, the model has no q/k/v bias")
    why: dict[Stage, str] = {**UNAVAILABLE_REASONS, **reasons}
    notes.extend(f"{s}: {why.get(s, 'no such node in the graph')}" for s in unavailable)
    return tuple(notes)


def _load_model(llama: Any, path: Path, log: LogSink) -> Any:
    params = llama.llama_model_default_params()
    params.n_gpu_layers = 0
    log.clear()
    model = llama.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelLoadError(f"llama.cpp could not load {path}: {log.first_error()}")
    return model


def _decode(
    llama: Any,
    model: Any,
    ids: tuple[int, ...],
    recorder: NodeRecorder,
    n_threads: int,
    log: LogSink,
    kv_type: str = "f32",
) -> dict[str, str]:
    """One llama_decode of all `ids` with the recorder as cb_eval; returns the settings used."""
    n_ctx = -(-len(ids) // CTX_ALIGN) * CTX_ALIGN
    params = llama.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = n_threads
    params.flash_attn_type = FLASH_ATTN_DISABLED
    params.type_k = params.type_v = KV_TYPES[kv_type]
    params.no_perf = True
    callback = llama.ggml_backend_sched_eval_callback(recorder)  # alive until this frame returns
    params.cb_eval = callback
    log.clear()
    ctx = llama.llama_init_from_model(model, params)
    if not ctx:
        raise ModelLoadError(f"llama.cpp could not create a context: {log.first_error()}")
    batch = llama.llama_batch_init(len(ids), 0, 1)
    try:
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(ids)
        log.clear()
        status = llama.llama_decode(ctx, batch)
    finally:
        llama.llama_batch_free(batch)
        llama.llama_free(ctx)
    if status != 0:
        raise InferenceError(f"llama_decode failed with status {status}: {log.first_error()}")
    if recorder.error is not None:
        if isinstance(recorder.error, AprError):
            raise recorder.error
        raise InferenceError(f"reading a llama.cpp node failed: {recorder.error!r}")
    return {
        "flash_attn": "off",
        "kv_cache": kv_type,
        "n_threads": str(n_threads),
        "n_ctx": str(n_ctx),
        "n_ubatch": str(n_ctx),
        "n_gpu_layers": "0",
    }
