"""The llama.cpp oracle: one prefill `llama_decode` of a GGUF, with every graph node seen by `cb_eval`.

Settings that make it an exact oracle (oracles §4–5): flash attention off (the kq / kq_soft_max nodes exist
only then), an F32 KV cache, fixed n_threads, CPU only, n_ctx = n_batch = n_ubatch = the next multiple of
256 ≥ S so that the prompt is one ubatch and one graph.

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
    attn_out, post_attn_residual: by structure from kqv_out-i (`_AttnOutPath`); Phi-3's residual has no name
    ffn_gate, ffn_up of a GLU op with one input (Phi-3's ffn_up is [gate|up]): the halves of that input

The hidden entries come from the mask llama.cpp applied, not from apr's reading of the config: the oracle
reports which keys llama.cpp's own sliding-window rules (pattern defaults, Phi-3's disabled SWA) hid, so a
disagreement with apr shows up in the trace instead of being zeroed away. Arrays come out of ggml
innermost-first, so numpy shape = ne reversed. With a NORM-rope (llama) GGUF the Q/K-derived stages are in
llama.cpp's per-head interleaved order (`QKLayout.INTERLEAVED`); with NEOX rope (qwen2/3, gemma, phi3,
olmo2) they are in HF order. A fused GLU op (SWIGLU, GEGLU) never materializes act(gate): `ffn_silu` is
unavailable. Everything else is a copy of a node llama.cpp computed, reshaped, sliced or split.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np

from apr.errors import AprError, InferenceError, ModelLoadError, NotFoundError, ValidationError
from apr.formats.config import QKLayout
from apr.runtimes.base import (
    ENGINE_LLAMACPP,
    Array,
    ForwardOrderTap,
    RuntimeRun,
    check_token_ids,
    missing_stages,
    model_stages,
)
from apr.runtimes.llamacpp_ggml import GGML_TYPE_F32, Ggml, LogSink, Node, bind
from apr.stages import Stage, StageId, Tap

CTX_ALIGN: Final = 256  # llama.cpp pads the KV view to 256 cells anyway
FLASH_ATTN_DISABLED: Final = 0

WHOLE_MODEL_NODES: Final[dict[str, StageId]] = {
    "embd": StageId(Stage.EMBEDDING, 0),
    "result_norm": StageId(Stage.FINAL_NORM),
    "result_output": StageId(Stage.LM_HEAD),
}
LAYER_NODES: Final[dict[str, Stage]] = {
    "attn_norm": Stage.ATTN_NORM,
    "kq": Stage.ATTN_SCORES,
    "kq_soft_max": Stage.ATTN_SOFTMAX,
    "kqv_out": Stage.ATTENTION,
    "attn_out": Stage.ATTN_OUT,
    "ffn_inp": Stage.POST_ATTN_RESIDUAL,
    "ffn_norm": Stage.FFN_NORM,
    "ffn_gate": Stage.FFN_GATE,
    "ffn_up": Stage.FFN_UP,
    "ffn_swiglu": Stage.FFN_SWIGL,
    "ffn_out": Stage.FFN_OUT,
    "l_out": Stage.POST_FFN_RESIDUAL,
}
QKV_NODES: Final = ("Qcur", "Kcur", "Vcur")  # per position [Q|K|V]
ATTENTION_NODE: Final = "kqv_out"  # attn_out is whatever leads from here into the residual add
ATTN_OUT_NODE: Final = "attn_out"
RESIDUAL_NODE: Final = "ffn_inp"
OP_MATMUL: Final = "MUL_MAT"
OP_BIAS: Final = "ADD"
OP_ROPE: Final = "ROPE"
OP_SOFTMAX: Final = "SOFT_MAX"
ROPE_STAGES: Final = {"Qcur": Stage.Q_POST_ROPE, "Kcur": Stage.K_POST_ROPE}
# llama_rope_type → (name, layout of Q/K as computed): NORM pairs adjacent entries, on rows that
# convert_hf_to_gguf permuted per head; NEOX pairs i with i + Dh/2, on rows in HF order.
ROPE_TYPES: Final[dict[int, tuple[str, QKLayout]]] = {
    0: ("norm", QKLayout.INTERLEAVED),
    2: ("neox", QKLayout.HF),
}
UNAVAILABLE_REASONS: Final[dict[Stage, str]] = {
    Stage.FFN_SILU: "llama.cpp computes silu(gate)·up as one fused SWIGLU op (ffn_swiglu); silu(gate) "
    "is never materialized",
}
_NODE_NAME: Final = re.compile(r"^(?P<base>[A-Za-z_]+)-(?P<layer>\d+)$")

NodeKey = tuple[str, int | None, str]  # (name without layer, layer, op or "" when the last op wins)


def run_llamacpp(model_path: Path, token_ids: Sequence[int], tap: Tap, *, n_threads: int = 2) -> RuntimeRun:
    """Run `token_ids` through llama.cpp (one prefill decode, CPU) and tap every stage it exposes.

    Args:
        model_path: a .gguf file.
        token_ids: the prompt, already tokenized (no BOS is added).
        tap: called as `tap(StageId, float32 array)` for every stage, in forward order.
        n_threads: llama.cpp threads; fixed so runs repeat bit for bit.

    Example:
        >>> run = run_llamacpp(Path("smollm2-f32.gguf"), [1780, 314, 216], tap)  # doctest: +SKIP
        >>> run.qk_layout, run.unavailable
        (<QKLayout.INTERLEAVED: 'gguf-interleaved'>, (<Stage.FFN_SILU: 'ffn_silu'>,))
    """
    ggml, log = bind()
    llama = ggml.llama_cpp
    path = Path(model_path)
    if not path.is_file():
        raise NotFoundError(f"model not found: {path}")
    if n_threads < 1:
        raise ValidationError(f"n_threads must be >= 1, got {n_threads}")
    with log.capture():
        done = _run(llama, ggml, path, token_ids, n_threads, log)
    ordered = ForwardOrderTap(tap, ENGINE_LLAMACPP)
    qkv_bias, scales = _emit(done.recorder, done.n_layers, len(done.ids), ordered)
    ordered.close()
    expected = model_stages(qkv_bias=qkv_bias)
    unavailable = missing_stages(expected, ordered.seen, done.n_layers, ENGINE_LLAMACPP)
    rope_name, qk_layout = ROPE_TYPES[done.rope_type]
    settings = {**done.settings, "rope_type": rope_name}
    settings["kq_scale"] = ",".join(f"{s:.9g}" for s in sorted(set(scales)))
    return RuntimeRun(
        engine=ENGINE_LLAMACPP,
        engine_version=ggml.version,
        token_ids=done.ids,
        qk_layout=qk_layout,
        unavailable=unavailable,
        notes=_notes(qkv_bias, settings, unavailable),
        settings=settings,
    )


class _Decoded(NamedTuple):
    ids: tuple[int, ...]
    rope_type: int
    n_layers: int
    recorder: _Recorder
    settings: dict[str, str]


def _run(
    llama: Any, ggml: Ggml, path: Path, token_ids: Sequence[int], n_threads: int, log: LogSink
) -> _Decoded:
    """Load the model, check the ids, decode once with the recorder, free the model."""
    model = _load_model(llama, path, log)
    try:
        ids = check_token_ids(token_ids, llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model)))
        rope_type = llama.llama_model_rope_type(model)
        if rope_type not in ROPE_TYPES:
            raise ModelLoadError(f"llama.cpp runtime supports NORM and NEOX rope; {path} uses {rope_type}")
        recorder = _Recorder(ggml)
        settings = _decode(llama, model, ids, recorder, n_threads, log)
        return _Decoded(ids, rope_type, llama.llama_model_n_layer(model), recorder, settings)
    finally:
        llama.llama_model_free(model)


def _notes(qkv_bias: bool, settings: dict[str, str], unavailable: tuple[Stage, ...]) -> tuple[str, ...]:
    notes = [
        f"attn_scores: kq (unscaled Q·Kᵀ) × kq_scale {settings['kq_scale']} from the SOFT_MAX op_params, "
        f"sliced to [:, :S, :S] of the {settings['n_ctx']}-cell KV view, above-diagonal set to 0.0",
        "attn_softmax: kq_soft_max sliced to [:, :S, :S]",
        "qkv_matmul: the Qcur/Kcur/Vcur MUL_MAT nodes concatenated per position",
    ]
    if not qkv_bias:
        notes.append("qkv_bias: not applicable, the model has no q/k/v bias")
    notes.extend(f"{s}: {UNAVAILABLE_REASONS.get(s, 'no such node in the graph')}" for s in unavailable)
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
    llama: Any, model: Any, ids: tuple[int, ...], recorder: _Recorder, n_threads: int, log: LogSink
) -> dict[str, str]:
    """One llama_decode of all `ids` with the recorder as cb_eval; returns the settings used."""
    n_ctx = -(-len(ids) // CTX_ALIGN) * CTX_ALIGN
    params = llama.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = n_threads
    params.flash_attn_type = FLASH_ATTN_DISABLED
    params.type_k = params.type_v = GGML_TYPE_F32
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
        "kv_cache": "f32",
        "n_threads": str(n_threads),
        "n_ctx": str(n_ctx),
        "n_ubatch": str(n_ctx),
        "n_gpu_layers": "0",
    }


class _Recorder:
    """The cb_eval callback: asks for the nodes apr maps and copies them out as they are computed.

    ggml calls it twice per wanted node: with ask=True before computing (answer: do we want it?), then
    with ask=False once it is computed. It runs inside llama_decode, so it never raises: a failure is kept
    in `error` and raised after the decode.
    """

    def __init__(self, ggml: Ggml) -> None:
        self.ggml = ggml
        self.raw: dict[NodeKey, Array] = {}
        self.softmax_params: dict[int, tuple[float, float]] = {}  # layer → (scale, max_bias)
        self.error: BaseException | None = None
        self._wanted: dict[int, NodeKey] = {}  # address → key, between ask and compute
        self._attn = _AttnOutPath()

    def __call__(self, address: int, ask: bool, _user_data: Any) -> bool:
        if self.error is not None:
            return not ask
        try:
            if ask:
                return self._ask(self.ggml.node(address))
            self._store(self.ggml.node(address), self._wanted.pop(address))
        except Exception as e:  # an exception must not unwind through C
            self.error = e
        return True

    def _ask(self, node: Node) -> bool:
        key = _node_key(node)
        if key is not None and key[0] == RESIDUAL_NODE and not self._attn.consumed_by(node):
            self.raw.pop((ATTN_OUT_NODE, key[1], ""), None)  # not what the residual adds: drop it
        key = self._attn.see(node, key) or key
        if key is not None:
            self._wanted[node.address] = key
        return key is not None

    def _store(self, node: Node, key: NodeKey) -> None:
        self.raw[key] = self.ggml.read(node)
        if node.op == OP_SOFTMAX and key[1] is not None:
            self.softmax_params[key[1]] = (node.op_param_f32(0), node.op_param_f32(1))

    def kq_scale(self, layer: int) -> float:
        """The scale the layer's SOFT_MAX applies to kq (op_params: scale, max_bias)."""
        if layer not in self.softmax_params:
            raise InferenceError(f"llama.cpp graph has kq-{layer} but no kq_soft_max-{layer}")
        scale, max_bias = self.softmax_params[layer]
        if max_bias != 0.0:
            raise InferenceError(f"layer {layer} uses ALiBi (max_bias {max_bias}); not supported")
        return scale


class _AttnOutPath:
    """Finds attn_out by structure: the last node on the path from kqv_out-i into ffn_inp-i.

    llama.cpp names the O-projection `attn_out-i` in some model builders (llama) and not in others
    (qwen2, qwen3: an anonymous `node_N`); the value added to the residual is found either way. In the
    last layer the path ends in a GET_ROWS of every output row, which selects all rows in order.
    """

    def __init__(self) -> None:
        self.layer: int | None = None
        self._path: set[int] = set()
        self._last = 0

    def see(self, node: Node, key: NodeKey | None) -> NodeKey | None:
        """attn_out's key when `node` continues the path; kqv_out-i (`key`) starts a new path."""
        if key is not None:
            if key[0] == ATTENTION_NODE:
                self.layer, self._path, self._last = key[1], {node.address}, 0
            return None
        if self._path and any(src in self._path for src in node.srcs):
            self._path.add(node.address)
            self._last = node.address
            return (ATTN_OUT_NODE, self.layer, "")
        return None

    def consumed_by(self, residual: Node) -> bool:
        """Ends the path at ffn_inp-i; true when that add takes the path's last node."""
        last, self._path, self._last = self._last, set(), 0
        return last in residual.srcs


def _node_key(node: Node) -> NodeKey | None:
    if node.name in WHOLE_MODEL_NODES:
        return (node.name, None, "")
    m = _NODE_NAME.match(node.name)
    if m is None:
        return None
    base, layer = m["base"], int(m["layer"])
    if base in QKV_NODES:
        return (base, layer, node.op) if node.op in (OP_MATMUL, OP_BIAS, OP_ROPE) else None
    return (base, layer, "") if base in LAYER_NODES and base != ATTN_OUT_NODE else None


def _emit(
    recorder: _Recorder, n_layers: int, n_tokens: int, tap: ForwardOrderTap
) -> tuple[bool, list[float]]:
    """Recorded nodes → canonical stages. Returns (the model has a q/k/v bias, kq scale per layer)."""
    raw, s = recorder.raw, n_tokens
    for name, sid in WHOLE_MODEL_NODES.items():
        if (name, None, "") in raw:
            tap(sid, raw.pop((name, None, "")).reshape(s, -1))
    qkv_bias, scales = False, []
    for i in range(n_layers):
        qkv_bias |= _emit_qkv(raw, i, s, tap)
        for base, stage in LAYER_NODES.items():
            value = raw.pop((base, i, ""), None)
            if value is None:
                continue
            if stage is Stage.ATTN_SCORES:
                scale = recorder.kq_scale(i)
                scales.append(scale)
                value = np.tril(_causal_square(value, s) * np.float32(scale))
            elif stage is Stage.ATTN_SOFTMAX:
                value = _causal_square(value, s)
            else:
                value = value.reshape(s, -1)
            tap(StageId(stage, i), value)
    return qkv_bias, scales


def _causal_square(kq: Array, s: int) -> Array:
    """(1, H, S, n_kv) padded to the KV view → (H, S, S): KV cells 0..S-1 hold positions 0..S-1."""
    return np.ascontiguousarray(kq.reshape(-1, s, kq.shape[-1])[:, :, :s])


def _emit_qkv(raw: dict[NodeKey, Array], layer: int, s: int, tap: ForwardOrderTap) -> bool:
    """[Q|K|V] before and after the bias, and Q/K after RoPE. Returns whether any bias node existed."""
    matmul = [raw.pop((b, layer, OP_MATMUL), None) for b in QKV_NODES]
    biased = [raw.pop((b, layer, OP_BIAS), None) for b in QKV_NODES]
    for base, stage in ROPE_STAGES.items():
        roped = raw.pop((base, layer, OP_ROPE), None)
        if roped is not None:
            tap(StageId(stage, layer), roped.reshape(s, -1))
    if any(m is None for m in matmul):
        return False
    plain = [m.reshape(s, -1) for m in matmul if m is not None]
    tap(StageId(Stage.QKV_MATMUL, layer), np.concatenate(plain, axis=-1))
    if all(b is None for b in biased):
        return False
    with_bias = [p if b is None else b.reshape(s, -1) for p, b in zip(plain, biased, strict=True)]
    tap(StageId(Stage.QKV_BIAS, layer), np.concatenate(with_bias, axis=-1))
    return True
