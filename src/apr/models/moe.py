"""The mixture-of-experts family: Mixtral, Qwen2-MoE, Qwen3-MoE — the llama decoder with a routed FFN.

    per layer:  attention as the llama family (Qwen2-MoE's q/k/v bias, Qwen3-MoE's QK-norm: from the tensors)
                h = rmsnorm(x);  p = softmax(h·Wrᵀ) over the E experts
                top = the k most probable experts of each token;  w = p[top]  (/ Σ w with norm_topk_prob)
                y = Σ_j w_j · down_e(silu(gate_e(h)) ⊙ up_e(h)), e = top_j   (+ sigmoid(h·w_s) · shared(h))
                x = x + y

The three share the router and expert math, as transformers 5.24 writes it (MixtralTopKRouter,
Qwen2MoeTopKRouter, Qwen3MoeTopKRouter: softmax over all experts, `torch.topk`, then renormalise); they
differ in flags. `norm_topk_prob`: Mixtral always renormalises (its config has no key), Qwen2/3-MoE when
config.json says so; llama.cpp reads no key for these architectures and hard-codes it (true for llama and
qwen3moe, false for qwen2moe), so a GGUF gets llama.cpp's value. Qwen2-MoE adds a shared expert, gated by
sigmoid(h·w_s) per token. Top-k ties (equal probabilities, e.g. identical router rows) go to the lowest
expert id; torch.topk leaves their order unspecified (ops.top_k).

Tensors: GGUF stores each layer's experts merged, (E, out, in) (`ffn_{gate,up,down}_exps`); HF checkpoints
per expert (Mixtral `block_sparse_moe.experts.{e}.w1`, Qwen `mlp.experts.{e}.gate_proj`: what
save_pretrained writes, even from transformers 5), stacked here into the same (E, out, in) tensor; and
transformers 5's in-memory parameters `mlp.experts.gate_up_proj` (E, 2·F, D), gate rows first, and
`mlp.experts.down_proj`, also accepted. Only the experts some token selects are read (Weights.expert_linear).
Not implemented, refused by name: dense FFN layers between MoE layers (Qwen's `decoder_sparse_step` > 1,
`mlp_only_layers`), sliding-window layers (`use_sliding_window`). Legend: T tokens, D hidden, E experts,
k experts per token, F expert FFN width, S shared-expert width, Te tokens routed to expert e.

Each variant's transformers class (names, attention tensors it lacks or always has): `moe_hf.HF_CLASSES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.engine import ops
from apr.engine.weights import Weights
from apr.errors import FormatError, ModelLoadError
from apr.formats.base import ConfigSource
from apr.models import common, decoder, llama, sources
from apr.models.base import (
    OPTIONAL,
    PREV_OUTPUT,
    REQUIRED,
    ROPE_NEOX,
    ROPE_NORM,
    Family,
    HookMap,
    Ignorable,
    StageNode,
    TensorRole,
    Variant,
)
from apr.models.config import ModelConfig
from apr.models.moe_hf import HF_CLASSES, HF_FUSED_DOWN, HF_FUSED_GATE_UP, QWEN_MLP, HFClass
from apr.models.params import COMMON, Param, typed
from apr.stages import Stage, Tap

Array = npt.NDArray[Any]
IN, OUT, ITEM = common.IN, common.OUT, common.ITEM

# written as num_experts, the one key all three transformers configs take (Mixtral's and Qwen3-MoE's map it
# to num_local_experts; Qwen2-MoE knows no other); `.apr` metadata keeps num_local_experts
N_EXPERTS: Final = Param(
    "n_experts",
    "{arch}.expert_count",
    ("num_experts", "num_local_experts"),
    ("num_local_experts", "num_experts"),
)


def _has_experts(source: ConfigSource) -> bool:
    """Mixtral's claim on a "llama" GGUF (or .apr): it has experts."""
    return any((typed(source.get(k), int) or 0) > 0 for k in N_EXPERTS.keys(source))


VARIANTS: Final = (
    Variant("mixtral", ("llama",), ("MixtralForCausalLM",), ROPE_NORM, claims=_has_experts),
    Variant("qwen2moe", ("qwen2moe",), ("Qwen2MoeForCausalLM",), ROPE_NEOX, hf_model_type="qwen2_moe"),
    Variant("qwen3moe", ("qwen3moe",), ("Qwen3MoeForCausalLM",), ROPE_NEOX, hf_model_type="qwen3_moe"),
)
SHARED_EXPERT: Final = frozenset({"qwen2moe"})
# renormalised top-k weights where the file cannot say: MixtralTopKRouter always; llama.cpp per architecture
TOPK_NORM: Final = {"mixtral": True, "qwen2moe": False, "qwen3moe": True}

PARAMS: Final = (
    *COMMON,
    Param(
        "sliding_window", "{arch}.attention.sliding_window", ("sliding_window",), default=0, check="nonneg"
    ),
    N_EXPERTS,
    Param("n_experts_used", "{arch}.expert_used_count", ("num_experts_per_tok",)),
    Param(
        "expert_ffn",
        "{arch}.expert_feed_forward_length",
        ("moe_intermediate_size",),
        default=lambda v: v["intermediate_size"],
    ),  # Mixtral: its experts are intermediate_size wide
    Param(
        "shared_expert_ffn",
        "{arch}.expert_shared_feed_forward_length",
        ("shared_expert_intermediate_size",),
        default=lambda v: v["intermediate_size"],
        check="nonneg",
    ),  # llama.cpp's fallback; 0 without a shared expert
    Param("norm_topk_prob", None, ("norm_topk_prob",), kind=bool, default=False),
)

GATE_EXPS, UP_EXPS = "blk.{i}.ffn_gate_exps.weight", "blk.{i}.ffn_up_exps.weight"
GATE_UP_EXPS, DOWN_EXPS = "blk.{i}.ffn_gate_up_exps.weight", "blk.{i}.ffn_down_exps.weight"
ROUTER, SHARED_GATE = "blk.{i}.ffn_gate_inp.weight", "blk.{i}.ffn_gate_inp_shexp.weight"
DENSE_FFN: Final = frozenset(r.name for r in common.swiglu_roles(1, 1))


def finish(
    variant: Variant, source: ConfigSource, values: Mapping[str, Any], present: frozenset[str], where: str
) -> ModelConfig:
    if values["n_experts_used"] > values["n_experts"]:
        raise FormatError(
            f"{where}: {values['n_experts_used']} experts per token, but the model has "
            f"{values['n_experts']} experts"
        )
    _check_expert_tensors(present, where)
    _check_together(variant, present, where)
    window = values["sliding_window"]
    if source.kind == "hf" and source.get("use_sliding_window") is False:
        window = 0  # Qwen stores a window it does not use
    norm = (
        TOPK_NORM[variant.name]
        if variant.name == "mixtral" or source.kind == "gguf"
        else values["norm_topk_prob"]
    )
    shared = values["shared_expert_ffn"] if variant.name in SHARED_EXPERT else 0
    return ModelConfig(
        architecture=variant.name,
        family="moe",
        vocab_size=sources.vocab_size(source, present, where),
        qkv_bias="blk.{i}.attn_q.bias" in present,
        qk_norm="blk.{i}.attn_q_norm.weight" in present,
        tied_embeddings=sources.tied_embeddings(source, present),
        qk_layout=sources.qk_layout(variant, source, where),
        rope_scaling=sources.rope_scaling(source, "rope_freqs.weight" in present, where),
        **{**values, "sliding_window": window, "norm_topk_prob": norm, "shared_expert_ffn": shared},
    )


def _check_expert_tensors(present: frozenset[str], where: str) -> None:
    """Expert gate and up: separate (GGUF, HF per expert) or fused (transformers 5's gate_up_proj)."""
    split = [r for r in (GATE_EXPS, UP_EXPS) if r in present]
    if GATE_UP_EXPS in present and split:
        raise ModelLoadError(
            f"{where}: tensors {GATE_UP_EXPS.format(i=0)} and {split[0].format(i=0)} are both "
            "present: fused and separate expert weights"
        )
    if GATE_UP_EXPS not in present and len(split) < 2:
        missing = next(r for r in (GATE_EXPS, UP_EXPS) if r not in present)
        raise ModelLoadError(f"{where}: tensor {missing.format(i=0)} is missing")


def _check_together(variant: Variant, present: frozenset[str], where: str) -> None:
    """Tensors the variant's transformers class builds from one config flag are all there or none: a part of
    such a set is no model transformers can build (nor can `apr export` write it), so it is refused."""
    for group in HF_CLASSES[variant.name].together:
        if (have := sorted(group & present)) and (missing := sorted(group - present)):
            raise ModelLoadError(
                f"{where}: tensor {missing[0].format(i=0)} is missing ({have[0].format(i=0)} is "
                f"present, and {variant.hf[0]} has {len(group)} such tensors or none)"
            )


def _attention_roles(c: ModelConfig, hf: HFClass) -> tuple[TensorRole, ...]:
    """llama's roles without its dense FFN, each as the variant's transformers class holds it."""
    out = []
    for r in llama.roles(c):
        if r.name in DENSE_FFN:
            continue
        if r.name in hf.lacks:
            r = dataclasses.replace(r, hf="")
        elif r.name in hf.always:
            r = dataclasses.replace(r, presence=REQUIRED)
        out.append(r)
    return tuple(out)


def roles(c: ModelConfig) -> tuple[TensorRole, ...]:
    D, E, F, S = c.hidden_size, c.n_experts, c.expert_ffn, c.shared_expert_ffn
    hf = HF_CLASSES[c.architecture]
    shared = (
        (
            TensorRole(SHARED_GATE, QWEN_MLP + "shared_expert_gate.weight", lambda _: (1, D)),
            TensorRole(
                "blk.{i}.ffn_gate_shexp.weight", QWEN_MLP + "shared_expert.gate_proj.weight", lambda _: (S, D)
            ),
            TensorRole(
                "blk.{i}.ffn_up_shexp.weight", QWEN_MLP + "shared_expert.up_proj.weight", lambda _: (S, D)
            ),
            TensorRole(
                "blk.{i}.ffn_down_shexp.weight", QWEN_MLP + "shared_expert.down_proj.weight", lambda _: (D, S)
            ),
        )
        if c.architecture in SHARED_EXPERT
        else ()
    )
    return (
        *_attention_roles(c, hf),  # embeddings, attention, norms
        TensorRole(ROUTER, hf.router, lambda _: (E, D), hf_alt=hf.router_alt),
        TensorRole(GATE_EXPS, hf.gate, lambda _: (E, F, D), OPTIONAL),
        TensorRole(UP_EXPS, hf.up, lambda _: (E, F, D), OPTIONAL),
        TensorRole(GATE_UP_EXPS, HF_FUSED_GATE_UP, lambda _: (E, 2 * F, D), OPTIONAL),
        TensorRole(DOWN_EXPS, hf.down, lambda _: (E, D, F), hf_alt=HF_FUSED_DOWN),
        *shared,
    )


def graph(c: ModelConfig) -> tuple[StageNode, ...]:
    return (
        StageNode(Stage.EMBEDDING, (), ("token_embd.weight",)),
        StageNode(Stage.ATTN_NORM, (PREV_OUTPUT,), ("blk.{i}.attn_norm.weight",), norm=True),
        *common.attention_nodes(c, Stage.ATTN_NORM),
        StageNode(Stage.POST_ATTN_RESIDUAL, (Stage.ATTN_OUT, PREV_OUTPUT)),
        StageNode(Stage.FFN_NORM, (Stage.POST_ATTN_RESIDUAL,), ("blk.{i}.ffn_norm.weight",), norm=True),
        *common.moe_nodes(Stage.FFN_NORM, shared=c.shared_expert_ffn > 0),
        StageNode(Stage.POST_FFN_RESIDUAL, (Stage.MOE_FFN_OUT, Stage.POST_ATTN_RESIDUAL)),
        *common.head_nodes(),
    )


def expert(w: Weights, cfg: ModelConfig, i: int, e: int, x: Array) -> Array:
    """Expert e of layer i on the tokens routed to it: down(silu(gate(x)) ⊙ up(x)). (Te, D) → (Te, D)"""
    p, F = decoder.layer_names(i), cfg.expert_ffn
    if w.has(p("ffn_gate_up_exps.weight")):
        gu = w.expert_linear(x, p("ffn_gate_up_exps.weight"), e)  # (Te, 2·F)
        g, u = gu[:, :F], gu[:, F:]  # (Te, F) each
    else:
        g = w.expert_linear(x, p("ffn_gate_exps.weight"), e)  # (Te, F)
        u = w.expert_linear(x, p("ffn_up_exps.weight"), e)  # (Te, F)
    return w.expert_linear(ops.silu(g) * u, p("ffn_down_exps.weight"), e)  # (Te, D)


def shared_expert(w: Weights, i: int, h: Array) -> Array:
    """Qwen2-MoE's shared expert, scaled per token by its sigmoid gate. (T, D) → (T, D)"""
    p = decoder.layer_names(i)
    names = [p("ffn_gate_shexp.weight"), p("ffn_up_shexp.weight"), p("ffn_gate_inp_shexp.weight")]
    g, u, logit = w.linears(h, names)  # (T, S), (T, S), (T, 1): one batch of row blocks
    s = w.linear(ops.silu(g) * u, p("ffn_down_shexp.weight"))  # (T, D)
    return ops.sigmoid(logit) * s  # (T, D)


def moe_ffn(w: Weights, cfg: ModelConfig, i: int, h: Array, emit: Callable[[Stage, Array], None]) -> Array:
    """The routed FFN of layer i on its normed input: (T, D) → (T, D)."""
    p = decoder.layer_names(i)
    # router: softmax over every expert, the k most probable, their (renormalised) probabilities
    logits = w.linear(h, p("ffn_gate_inp.weight"))  # (T, E)
    emit(Stage.MOE_ROUTER_LOGITS, logits)
    probs = ops.softmax(logits)  # (T, E)
    top = ops.top_k(probs, cfg.n_experts_used)  # (T, k) expert ids, most probable first
    weights = np.take_along_axis(probs, top, axis=-1)  # (T, k)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)  # (T, k)
    emit(Stage.MOE_ROUTER, weights)
    emit(Stage.MOE_ROUTER_INDICES, top.astype(h.dtype))
    # experts: each selected one once, on its tokens; summed in ascending expert id, as transformers does
    out = np.zeros_like(h)  # (T, D)
    for e in np.unique(top):
        rows, slot = np.nonzero(top == e)  # (Te,) tokens that chose e, and where in their top-k
        out[rows] += weights[rows, slot, None] * expert(w, cfg, i, int(e), h[rows])  # (Te, D)
    # shared expert (Qwen2-MoE)
    if cfg.shared_expert_ffn:
        s = shared_expert(w, i, h)  # (T, D)
        emit(Stage.MOE_SHARED_OUT, s)
        out = out + s  # (T, D)
    emit(Stage.MOE_FFN_OUT, out)
    return out


def block(w: Weights, cfg: ModelConfig, i: int, x: Array, tap: Tap, rot: decoder.Rotary) -> Array:
    """Decoder layer i: (T, D) → (T, D)."""
    p, emit = decoder.layer_names(i), decoder.emitter(tap, i)
    # attention norm, self-attention (q/k/v, bias, QK-norm, RoPE, causal softmax, O-projection)
    h = ops.rms_norm(x, w.vector(p("attn_norm.weight")), cfg.rms_eps)  # (T, D)
    emit(Stage.ATTN_NORM, h)
    x = x + decoder.attention(w, cfg, i, h, emit, rot)  # (T, D)
    emit(Stage.POST_ATTN_RESIDUAL, x)
    # mixture of experts
    h = ops.rms_norm(x, w.vector(p("ffn_norm.weight")), cfg.rms_eps)  # (T, D)
    emit(Stage.FFN_NORM, h)
    x = x + moe_ffn(w, cfg, i, h, emit)  # (T, D)
    emit(Stage.POST_FFN_RESIDUAL, x)
    return x


DECODER: Final = decoder.Decoder(block)


# transformers: the router returns (logits, top-k weights, top-k ids), flat over batch·S; the MoE block's
# output includes the shared expert; the shared expert's gated output is a product no module returns
LAYER_HOOKS: Final = (
    ("input_layernorm", OUT, Stage.ATTN_NORM),
    ("self_attn.o_proj", IN, Stage.ATTENTION),
    ("self_attn.o_proj", OUT, Stage.ATTN_OUT),
    ("post_attention_layernorm", IN, Stage.POST_ATTN_RESIDUAL),
    ("post_attention_layernorm", OUT, Stage.FFN_NORM),
    ("mlp.gate", ITEM + "0", Stage.MOE_ROUTER_LOGITS),
    ("mlp.gate", ITEM + "1", Stage.MOE_ROUTER),
    ("mlp.gate", ITEM + "2", Stage.MOE_ROUTER_INDICES),
    ("mlp", OUT, Stage.MOE_FFN_OUT),
    ("", OUT, Stage.POST_FFN_RESIDUAL),
)
GATED_HOOKS: Final = (("mlp.shared_expert", "mlp.shared_expert_gate", Stage.MOE_SHARED_OUT),)
# llama.cpp (build_moe_ffn in llama-graph.cpp, models/{llama,qwen2moe,qwen3moe}.cpp): names every variant
# gives the same value. The top-k weights are named per variant (`ffn_moe_weights_norm` after
# renormalisation: llama, qwen3moe; `ffn_moe_weights` without: qwen2moe), so moe_router is read as the
# weights input of `ffn_moe_weighted` (runtimes/llamacpp.py INPUT_STAGES); the expert ids `ffn_moe_topk` are
# an I32 view of the argsort; the MoE output (`ffn_moe_out` in llama and qwen3moe; in qwen2moe that is the
# routed part only, and the sum with the shared expert is `ffn_out`, which in llama names the residual add)
# is found by structure, the residual add's other input. The shared expert's build_ffn reuses the dense
# names (ffn_gate, ffn_up, ffn_swiglu, ffn_out): dropped with the dense FFN's.
GGML_NODES: Final = {
    **{
        k: v
        for k, v in common.LLAMA_NODES.items()
        if k not in ("ffn_gate", "ffn_up", "ffn_swiglu", "ffn_out")
    },
    "ffn_moe_logits": Stage.MOE_ROUTER_LOGITS,
    "ffn_moe_weighted": Stage.MOE_ROUTER,  # its input 1: the top-k weights
    "ffn_moe_topk": Stage.MOE_ROUTER_INDICES,
    "ffn_shexp_out": Stage.MOE_SHARED_OUT,
}


def _refuse_act(v: Any) -> str | None:
    return None if v == "silu" else f"activation {v!r} (the moe family computes SiLU)"


FAMILY: Final = Family(
    name="moe",
    variants=VARIANTS,
    params=PARAMS,
    finish=finish,
    roles=roles,
    graph=graph,
    forward=DECODER.forward,
    layer=DECODER.layer,
    hooks=HookMap(LAYER_HOOKS, common.MODEL_HOOKS, gated=GATED_HOOKS),
    ggml_nodes=GGML_NODES,
    ignorable=(Ignorable(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", "RoPE buffer, recomputed"),),
    gguf_keys=sources.ROPE_GGUF_KEYS,
    hf_extra=lambda c: HF_CLASSES[c.architecture].config(c),
    hf_refuse={
        "hidden_act": _refuse_act,
        "use_sliding_window": lambda v: (
            "Qwen's per-layer sliding window (use_sliding_window: true)" if v else None
        ),
        "decoder_sparse_step": lambda v: (
            None if v == 1 else f"dense FFN layers between MoE layers (decoder_sparse_step: {v})"
        ),
        "mlp_only_layers": lambda v: f"dense FFN layers {v} (mlp_only_layers)" if v else None,
        **sources.HF_REFUSE,
    },
)
