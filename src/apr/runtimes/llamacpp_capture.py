"""The llama.cpp runtime's node capture: `NodeRecorder` sees every graph node `cb_eval` reports and turns the
ones a family's table names (and the ones found by structure: Q/K/V, scores, attn_out) into stages, in
forward order. See runtimes/llamacpp.py for which node is which stage."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from apr.errors import InferenceError
from apr.runtimes.base import (
    Array,
    ForwardOrderTap,
)
from apr.runtimes.llamacpp_ggml import Ggml, Node
from apr.stages import Stage, StageId

QKV_NODES: Final = ("Qcur", "Kcur", "Vcur")  # per position [Q|K|V]
OP_MATMUL: Final = "MUL_MAT"
OP_ADD: Final = "ADD"
OP_ROPE: Final = "ROPE"
OP_SOFTMAX: Final = "SOFT_MAX"
QKV_OPS: Final = (OP_MATMUL, OP_ADD, OP_ROPE)  # the projection, its bias, the rotation
PROJECTION_OPS: Final = (OP_MATMUL, OP_ADD, "GET_ROWS")  # with weights / row ids as their other inputs
GLU_SWAPPED: Final = 1  # op_params index of a GLU's flag: act() applies to the second half
ROPE_STAGES: Final = {"Qcur": Stage.Q_POST_ROPE, "Kcur": Stage.K_POST_ROPE}
# a stage the table maps to the node that consumes it: its value is that node's input at this index
INPUT_STAGES: Final = {Stage.MOE_ROUTER: 1}
_NODE_NAME: Final = re.compile(r"^(?P<base>.+)-(?P<layer>\d+)$")

QkvKey = tuple[str, int, str]  # (Qcur | Kcur | Vcur, layer, op)
Slot = StageId | QkvKey | int  # where a wanted node's copy goes (int: an ADD after a router, by address)


class _Softmax(NamedTuple):
    source: int  # address of the SOFT_MAX's input: the node attn_scores must come from
    source_name: str
    scale: float
    hidden: npt.NDArray[np.bool_]  # (S_tokens, n_kv): where the mask is -inf


class NodeRecorder:
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


def emit_stages(recorder: NodeRecorder, n_layers: int, n_tokens: int, tap: ForwardOrderTap) -> list[float]:
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


def _rows(_recorder: NodeRecorder, sid: StageId, value: Array, s: int) -> Emitted:
    yield sid, value.reshape(s, -1)


def _scores(recorder: NodeRecorder, sid: StageId, value: Array, s: int) -> Emitted:
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


def _probs(_recorder: NodeRecorder, sid: StageId, value: Array, s: int) -> Emitted:
    yield sid, _causal_square(value, s)


def _ffn_up(recorder: NodeRecorder, sid: StageId, value: Array, s: int) -> Emitted:
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


_SHAPERS: Final[dict[Stage, Callable[[NodeRecorder, StageId, Array, int], Emitted]]] = {
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
