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
    attn_out, post_attn_residual: by structure from kqv_out-i (`_AttnOutPath`); Phi-3's residual has no name
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

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from apr.errors import AprError, InferenceError, ModelLoadError, NotFoundError, ValidationError
from apr.formats.config import QKLayout
from apr.models.common import LLAMA_NODES
from apr.runtimes.base import (
    ENGINE_LLAMACPP,
    Array,
    ForwardOrderTap,
    RuntimeRun,
    check_token_ids,
    missing_stages,
    model_stages,
)
from apr.runtimes.llamacpp_ggml import GGML_TYPE_F16, GGML_TYPE_F32, Ggml, LogSink, Node, bind
from apr.stages import Stage, StageId, Tap

CTX_ALIGN: Final = 256  # llama.cpp pads the KV view to 256 cells anyway
FLASH_ATTN_DISABLED: Final = 0
KV_TYPES: Final = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16}  # the KV cache's element type

QKV_NODES: Final = ("Qcur", "Kcur", "Vcur")  # per position [Q|K|V]
OP_MATMUL: Final = "MUL_MAT"
OP_ADD: Final = "ADD"
OP_ROPE: Final = "ROPE"
OP_SOFTMAX: Final = "SOFT_MAX"
QKV_OPS: Final = (OP_MATMUL, OP_ADD, OP_ROPE)  # the projection, its bias, the rotation
PROJECTION_OPS: Final = (OP_MATMUL, OP_ADD, "GET_ROWS")  # with weights / row ids as their other inputs
GLU_SWAPPED: Final = 1  # op_params index of a GLU's flag: act() applies to the second half
ROPE_STAGES: Final = {"Qcur": Stage.Q_POST_ROPE, "Kcur": Stage.K_POST_ROPE}
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
# a stage the table maps to the node that consumes it: its value is that node's input at this index
INPUT_STAGES: Final = {Stage.MOE_ROUTER: 1}
_NODE_NAME: Final = re.compile(r"^(?P<base>.+)-(?P<layer>\d+)$")

QkvKey = tuple[str, int, str]  # (Qcur | Kcur | Vcur, layer, op)
Slot = StageId | QkvKey | int  # where a wanted node's copy goes (int: an ADD after a router, by address)


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
        model_path: a .gguf file.
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
    if not path.is_file():
        raise NotFoundError(f"model not found: {path}")
    if n_threads < 1:
        raise ValidationError(f"n_threads must be >= 1, got {n_threads}")
    if kv_type not in KV_TYPES:
        raise ValidationError(f"unknown KV cache type {kv_type!r} (choose from {', '.join(KV_TYPES)})")
    recorder = _Recorder(ggml, LLAMA_NODES if nodes is None else nodes)
    with log.capture():
        done = _run(llama, recorder, path, token_ids, n_threads, log, kv_type)
    ordered = ForwardOrderTap(tap, ENGINE_LLAMACPP)
    scales = _emit(recorder, done.n_layers, len(done.ids), ordered)
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
    recorder: _Recorder,
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
    recorder: _Recorder,
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


class _Softmax(NamedTuple):
    source: int  # address of the SOFT_MAX's input: the node attn_scores must come from
    source_name: str
    scale: float
    hidden: npt.NDArray[np.bool_]  # (S_tokens, n_kv): where the mask is -inf


class _Recorder:
    """The cb_eval callback: asks for the nodes apr maps and copies them out as they are computed.

    ggml calls it twice per wanted node: with ask=True before computing (answer: do we want it?), then
    with ask=False once it is computed. It runs inside llama_decode, so it never raises: a failure is kept
    in `error` and raised after the decode.
    """

    def __init__(self, ggml: Ggml, nodes: Mapping[str, Stage]) -> None:
        self.ggml = ggml
        self.nodes = nodes
        self.stages: dict[StageId, Array] = {}
        self.sources: dict[StageId, int] = {}  # the node each stage was copied from
        self.qkv: dict[QkvKey, Array] = {}
        self.softmax: dict[int, _Softmax] = {}  # layer → what its SOFT_MAX did
        self.fused_glu: dict[int, tuple[int, bool]] = {}  # layer → (the GLU's one input, swapped)
        self.reasons: dict[Stage, str] = {}  # why a stage the table maps could not be exposed
        self.error: BaseException | None = None
        self.layer: int | None = None  # of the last "-{il}" node: where a bare per-layer name belongs
        self._routed: int | None = None  # the layer whose router was seen, until its residual add
        self._adds: dict[int, Array] = {}  # ADDs since the router: address → copy (moe_ffn_out candidates)
        self._wanted: dict[int, Slot] = {}  # address → slot, between ask and compute
        self._masks: dict[int, npt.NDArray[np.bool_]] = {}  # one read per mask tensor
        self._attn = _AttnOutPath(ggml)

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
        slot = self._slot(node)
        found = self._attn.see(node, slot)
        if found is not None:
            if slot is not None and slot != found:
                raise InferenceError(f"llama.cpp node {node.name} is {slot} by name but {found} by structure")
            slot = found
        if isinstance(slot, StageId) and slot.stage is Stage.MOE_ROUTER_LOGITS:
            self._routed = slot.layer
        elif slot is None and self._routed is not None and node.op == OP_ADD:
            slot = node.address
        if slot is not None:
            self._wanted[node.address] = slot
        return slot is not None

    def _slot(self, node: Node) -> Slot | None:
        m = _NODE_NAME.match(node.name)
        base, layer = (m["base"], int(m["layer"])) if m else (node.name, None)
        if layer is not None:
            self.layer = layer
            if base in QKV_NODES:
                return (base, layer, node.op) if node.op in QKV_OPS else None
        stage = self.nodes.get(base)
        if stage is None:
            return None
        if layer is None and stage.per_layer and stage is not Stage.EMBEDDING:
            if self.layer is None:
                raise InferenceError(f"llama.cpp node {node.name} ({stage}) comes before any layer")
            layer = self.layer
        return StageId(stage, layer if stage is not Stage.EMBEDDING else 0)

    def _store(self, node: Node, slot: Slot) -> None:
        if isinstance(slot, StageId) and slot.stage in INPUT_STAGES:
            source = node.src_at(INPUT_STAGES[slot.stage])
            if source is None:
                raise InferenceError(f"llama.cpp node {node.name} has no input for {slot}")
            node = self.ggml.node(source)
        value = self.ggml.read(node)
        if isinstance(slot, int):
            self._adds[slot] = value
            return
        if not isinstance(slot, StageId):
            self.qkv[slot] = value
            return
        self.stages[slot], self.sources[slot] = value, node.address
        if slot.stage is Stage.POST_FFN_RESIDUAL and slot.layer is not None:
            self._moe_out(node, slot.layer)
        if slot.stage is Stage.ATTN_SOFTMAX and slot.layer is not None:
            self.softmax[slot.layer] = self._softmax_of(node)
        if slot.stage is Stage.FFN_SWIGL and slot.layer is not None and len(node.srcs) == 1:
            self.fused_glu[slot.layer] = (node.srcs[0], bool(node.op_param_i32(GLU_SWAPPED)))

    def _moe_out(self, residual: Node, layer: int) -> None:
        """moe_ffn_out by structure: what the residual ADD adds to post_attn_residual, in a routed layer."""
        adds, routed = self._adds, self._routed
        self._adds, self._routed = {}, None
        attn = self.sources.get(StageId(Stage.POST_ATTN_RESIDUAL, layer))
        if routed != layer or attn not in residual.srcs:
            return
        other = [src for src in residual.srcs if src != attn]
        if residual.op != OP_ADD or len(other) != 1 or other[0] not in adds:
            raise InferenceError(f"llama.cpp node {residual.name} is not the residual add of an FFN output")
        sid = StageId(Stage.MOE_FFN_OUT, layer)
        self.stages[sid], self.sources[sid] = adds[other[0]], other[0]

    def _softmax_of(self, node: Node) -> _Softmax:
        """scale and max_bias from the op_params; the mask (src[1]) an input set before the graph ran."""
        source, mask = node.src_at(0), node.src_at(1)
        if node.op != OP_SOFTMAX or source is None or mask is None:
            raise InferenceError(f"llama.cpp node {node.name} is not a masked SOFT_MAX ({node.op})")
        max_bias = node.op_param_f32(1)
        if max_bias != 0.0:
            raise InferenceError(f"{node.name} uses ALiBi (max_bias {max_bias}); not supported")
        if mask not in self._masks:
            values = self.ggml.read(self.ggml.node(mask))
            self._masks[mask] = np.isneginf(values.reshape(-1, values.shape[-1]))
        return _Softmax(source, self.ggml.node(source).name, node.op_param_f32(0), self._masks[mask])


class _AttnOutPath:
    """attn_out and post_attn_residual by structure: the nodes that lead from kqv_out-i on.

    The O-projection is the MUL_MAT that takes kqv_out, then a bias ADD, then — in the last layer — the
    GET_ROWS of every output row (all rows, in order): ops whose other inputs are leaves (weights, row
    ids). Its last node is attn_out, named `attn_out` by some builders (llama) and not by others (qwen2,
    gemma, phi3). What follows before the residual (Gemma's and OLMo2's post-norm, Granite's residual
    scale) is neither; the first ADD with a computed input besides the path is the residual add,
    post_attn_residual (`ffn_inp`, Gemma's `sa_out`, an anonymous node in Phi-3).
    """

    def __init__(self, ggml: Ggml) -> None:
        self.ggml = ggml
        self.layer: int | None = None
        self._path: set[int] = set()
        self._projecting = False

    def see(self, node: Node, slot: Slot | None) -> StageId | None:
        """The stage `node` is by structure, if any; kqv_out-i (`slot` attention) starts a path."""
        if isinstance(slot, StageId) and slot.stage is Stage.ATTENTION:
            self.layer, self._path, self._projecting = slot.layer, {node.address}, True
            return None
        if not any(src in self._path for src in node.srcs):
            return None
        self._path.add(node.address)
        leaves = all(self.ggml.is_leaf(src) for src in node.srcs if src not in self._path)
        self._projecting &= node.op in PROJECTION_OPS and leaves
        if self._projecting:
            return StageId(Stage.ATTN_OUT, self.layer)
        if node.op == OP_ADD and not leaves:
            self._path = set()
            return StageId(Stage.POST_ATTN_RESIDUAL, self.layer)
        return None


Emitted = Iterator[tuple[StageId, Array]]


def _emit(recorder: _Recorder, n_layers: int, n_tokens: int, tap: ForwardOrderTap) -> list[float]:
    """Recorded nodes → canonical stages, layer by layer. Returns the SOFT_MAX scale of each layer."""
    stages, scales = recorder.stages, []
    for layer in (*range(n_layers), None):
        if layer is not None:
            _emit_qkv(recorder.qkv, layer, n_tokens, tap)
        for sid in sorted((k for k in stages if k.layer == layer), key=lambda k: k.sort_key):
            shape = _SHAPERS.get(sid.stage, _rows)
            for out, value in shape(recorder, sid, stages.pop(sid), n_tokens):
                tap(out, value)
        if layer in recorder.softmax:
            scales.append(recorder.softmax[layer].scale)
    if stages:
        raise InferenceError(
            f"llama.cpp node for {min(stages, key=lambda k: k.sort_key)} is past the last layer"
        )
    return scales


def _rows(_recorder: _Recorder, sid: StageId, value: Array, s: int) -> Emitted:
    yield sid, value.reshape(s, -1)


def _scores(recorder: _Recorder, sid: StageId, value: Array, s: int) -> Emitted:
    """(1, H, S, n_kv) → (H, S, S) × the softmax scale, hidden entries 0.0; nothing unless the node is
    the SOFT_MAX's input (a table that misses a soft-cap step: the stage is unavailable, with the reason)."""
    softmax = recorder.softmax.get(sid.layer) if sid.layer is not None else None
    if softmax is None or recorder.sources[sid] != softmax.source:
        read = f"reads {softmax.source_name}" if softmax else "is missing"
        recorder.reasons.setdefault(
            sid.stage, f"the SOFT_MAX {read}, which the node table does not map to it"
        )
        return
    scaled = _causal_square(value, s) * np.float32(softmax.scale)
    yield sid, np.where(softmax.hidden[:s, :s], np.float32(0.0), scaled)


def _probs(_recorder: _Recorder, sid: StageId, value: Array, s: int) -> Emitted:
    yield sid, _causal_square(value, s)


def _ffn_up(recorder: _Recorder, sid: StageId, value: Array, s: int) -> Emitted:
    """[gate|up] when the layer's GLU takes one input (gate first unless the GLU is swapped)."""
    if sid.layer not in recorder.fused_glu:
        yield sid, value.reshape(s, -1)
        return
    source, swapped = recorder.fused_glu[sid.layer]
    if recorder.sources[sid] != source:
        raise InferenceError(f"{sid}: the layer's GLU op does not take the node the table maps to ffn_up")
    halves = np.split(value.reshape(s, -1), 2, axis=-1)
    gate, up = (halves[1], halves[0]) if swapped else (halves[0], halves[1])
    yield StageId(Stage.FFN_GATE, sid.layer), np.ascontiguousarray(gate)
    yield sid, np.ascontiguousarray(up)


_SHAPERS: Final[dict[Stage, Callable[[_Recorder, StageId, Array, int], Emitted]]] = {
    Stage.ATTN_SCORES: _scores,
    Stage.ATTN_SOFTMAX: _probs,
    Stage.FFN_UP: _ffn_up,
}


def _causal_square(kq: Array, s: int) -> Array:
    """(1, H, S, n_kv) padded to the KV view → (H, S, S): KV cells 0..S-1 hold positions 0..S-1."""
    return np.ascontiguousarray(kq.reshape(-1, s, kq.shape[-1])[:, :, :s])


def _emit_qkv(raw: dict[QkvKey, Array], layer: int, s: int, tap: ForwardOrderTap) -> None:
    """[Q|K|V] before and after the bias, and Q/K after RoPE, from the separate Q/K/V nodes."""
    matmul = [raw.pop((b, layer, OP_MATMUL), None) for b in QKV_NODES]
    biased = [raw.pop((b, layer, OP_ADD), None) for b in QKV_NODES]
    for base, stage in ROPE_STAGES.items():
        roped = raw.pop((base, layer, OP_ROPE), None)
        if roped is not None:
            tap(StageId(stage, layer), roped.reshape(s, -1))
    if any(m is None for m in matmul):
        return
    plain = [m.reshape(s, -1) for m in matmul if m is not None]
    tap(StageId(Stage.QKV_MATMUL, layer), np.concatenate(plain, axis=-1))
    if all(b is None for b in biased):
        return
    with_bias = [p if b is None else b.reshape(s, -1) for p, b in zip(plain, biased, strict=True)]
    tap(StageId(Stage.QKV_BIAS, layer), np.concatenate(with_bias, axis=-1))
