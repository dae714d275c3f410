"""What the decoder families declare alike: tensor roles, stage-graph pieces and the default runtime maps.

Config readers are in models/sources.py, forward pieces in models/decoder.py; a step whose math differs
stays in the family module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy.typing as npt

from apr.models.base import OPTIONAL, PREV_OUTPUT, StageNode, TensorRole
from apr.models.config import ModelConfig
from apr.stages import Stage

Array = npt.NDArray[Any]
IN: Final = "in"
OUT: Final = "out"
ITEM: Final = "item:"  # + k: item k of a module's tuple output of flat (batch·S, …) tensors (a MoE router's)

# ---- tensor roles -------------------------------------------------------------------------------


def global_roles(c: ModelConfig) -> tuple[TensorRole, ...]:
    V, D = c.vocab_size, c.hidden_size
    return (
        TensorRole("token_embd.weight", "model.embed_tokens.weight", lambda _: (V, D)),
        TensorRole("output_norm.weight", "model.norm.weight", lambda _: (D,)),
        TensorRole("output.weight", "lm_head.weight", lambda _: (V, D), OPTIONAL),
    )


def attention_roles(c: ModelConfig) -> tuple[TensorRole, ...]:
    D, q, kv = c.hidden_size, c.q_dim, c.kv_dim
    return (
        TensorRole("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight", lambda _: (q, D)),
        TensorRole("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight", lambda _: (kv, D)),
        TensorRole("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight", lambda _: (kv, D)),
        TensorRole(
            "blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight", lambda _: (D, q)
        ),
        TensorRole(
            "blk.{i}.attn_output.bias", "model.layers.{i}.self_attn.o_proj.bias", lambda _: (D,), OPTIONAL
        ),
    )


def swiglu_roles(D: int, ffn: int) -> tuple[TensorRole, ...]:
    return (
        TensorRole("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight", lambda _: (ffn, D)),
        TensorRole("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight", lambda _: (ffn, D)),
        TensorRole("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight", lambda _: (D, ffn)),
    )


# ---- stage graph ----------------------------------------------------------------------------------


def attention_nodes(c: ModelConfig, norm_stage: Stage | str) -> tuple[StageNode, ...]:
    qk_in = (Stage.QKV_BIAS,) if c.qkv_bias else (Stage.QKV_MATMUL,)
    qkv_w = ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight")
    bias = (
        (
            StageNode(
                Stage.QKV_BIAS,
                (Stage.QKV_MATMUL,),
                ("blk.{i}.attn_q.bias", "blk.{i}.attn_k.bias", "blk.{i}.attn_v.bias"),
                ("seq", "q|k|v"),
            ),
        )
        if c.qkv_bias
        else ()
    )
    return (
        StageNode(Stage.QKV_MATMUL, (norm_stage,), qkv_w, ("seq", "q|k|v"), matmul=True),
        *bias,
        StageNode(
            Stage.Q_POST_ROPE,
            qk_in,
            ("blk.{i}.attn_q_norm.weight",),
            ("seq", "head*head_dim"),
            norm=c.qk_norm,
        ),
        StageNode(
            Stage.K_POST_ROPE,
            qk_in,
            ("blk.{i}.attn_k_norm.weight",),
            ("seq", "kv_head*head_dim"),
            norm=c.qk_norm,
        ),
        StageNode(Stage.ATTN_SCORES, (Stage.Q_POST_ROPE, Stage.K_POST_ROPE), (), ("head", "query", "key")),
        StageNode(Stage.ATTN_SOFTMAX, (Stage.ATTN_SCORES,), (), ("head", "query", "key")),
        StageNode(Stage.ATTENTION, (Stage.ATTN_SOFTMAX, *qk_in), (), ("seq", "head*head_dim")),
        StageNode(
            Stage.ATTN_OUT,
            (Stage.ATTENTION,),
            ("blk.{i}.attn_output.weight", "blk.{i}.attn_output.bias"),
            matmul=True,
        ),
    )


def swiglu_nodes(norm_stage: Stage) -> tuple[StageNode, ...]:
    ffn = ("seq", "ffn")
    return (
        StageNode(Stage.FFN_GATE, (norm_stage,), ("blk.{i}.ffn_gate.weight",), ffn, matmul=True),
        StageNode(Stage.FFN_UP, (norm_stage,), ("blk.{i}.ffn_up.weight",), ffn, matmul=True),
        StageNode(Stage.FFN_SILU, (Stage.FFN_GATE,), (), ffn),
        StageNode(Stage.FFN_SWIGL, (Stage.FFN_SILU, Stage.FFN_GATE, Stage.FFN_UP), (), ffn),
        StageNode(Stage.FFN_OUT, (Stage.FFN_SWIGL,), ("blk.{i}.ffn_down.weight",), matmul=True),
    )


def moe_nodes(norm_stage: Stage, shared: bool = True) -> tuple[StageNode, ...]:
    """aprender's MoE stages (and apr's router logits / shared expert), between ffn_norm and the residual.
    Router logits → top-k weights and expert ids; the routed experts' weighted sum (+ the shared expert)."""
    shexp = (
        (
            StageNode(
                Stage.MOE_SHARED_OUT,
                (norm_stage,),
                (
                    "blk.{i}.ffn_gate_shexp.weight",
                    "blk.{i}.ffn_up_shexp.weight",
                    "blk.{i}.ffn_down_shexp.weight",
                    "blk.{i}.ffn_gate_inp_shexp.weight",
                ),
                matmul=True,
            ),
        )
        if shared
        else ()
    )
    return (
        StageNode(
            Stage.MOE_ROUTER_LOGITS,
            (norm_stage,),
            ("blk.{i}.ffn_gate_inp.weight",),
            ("seq", "expert"),
            matmul=True,
        ),
        StageNode(Stage.MOE_ROUTER, (Stage.MOE_ROUTER_LOGITS,), (), ("seq", "k")),
        StageNode(Stage.MOE_ROUTER_INDICES, (Stage.MOE_ROUTER_LOGITS,), (), ("seq", "k")),
        *shexp,
        StageNode(
            Stage.MOE_FFN_OUT,
            (Stage.MOE_ROUTER, Stage.MOE_ROUTER_INDICES, norm_stage, *(n.stage for n in shexp)),
            (
                "blk.{i}.ffn_gate_exps.weight",
                "blk.{i}.ffn_up_exps.weight",
                "blk.{i}.ffn_gate_up_exps.weight",
                "blk.{i}.ffn_down_exps.weight",
            ),
            matmul=True,
        ),
    )


def head_nodes() -> tuple[StageNode, ...]:
    return (
        StageNode(Stage.FINAL_NORM, (PREV_OUTPUT,), ("output_norm.weight",), norm=True),
        StageNode(
            Stage.LM_HEAD,
            (Stage.FINAL_NORM,),
            ("output.weight", "token_embd.weight"),
            ("seq", "vocab"),
            matmul=True,
        ),
    )


# ---- runtime maps ----------------------------------------------------------------------------------

LLAMA_LAYER_HOOKS: Final[tuple[tuple[str, str, Stage], ...]] = (
    ("input_layernorm", OUT, Stage.ATTN_NORM),
    ("self_attn.o_proj", IN, Stage.ATTENTION),
    ("self_attn.o_proj", OUT, Stage.ATTN_OUT),
    ("post_attention_layernorm", IN, Stage.POST_ATTN_RESIDUAL),
    ("post_attention_layernorm", OUT, Stage.FFN_NORM),
    ("mlp.gate_proj", OUT, Stage.FFN_GATE),
    ("mlp.up_proj", OUT, Stage.FFN_UP),
    ("mlp.act_fn", OUT, Stage.FFN_SILU),
    ("mlp.down_proj", IN, Stage.FFN_SWIGL),
    ("mlp.down_proj", OUT, Stage.FFN_OUT),
    ("", OUT, Stage.POST_FFN_RESIDUAL),
)
# the embedding as the first layer sees it (after Gemma's / Granite's scaling), the final norm, the logits
# as the model returns them (after Granite's division and Gemma 2's soft-cap: `logits` is the output)
MODEL_HOOKS: Final[tuple[tuple[str, str, Stage], ...]] = (
    ("model.layers.0", IN, Stage.EMBEDDING),
    ("model.norm", OUT, Stage.FINAL_NORM),
    ("", OUT, Stage.LM_HEAD),
)
# llama.cpp's cb_eval names (llm_graph_context::cb, without the "-{il}" suffix) → stage: the llama builders
# and build_attn / build_ffn in llama-graph.cpp. runtimes/llamacpp.py finds by structure what no name
# says (attn_out, an unnamed residual add) and takes Qcur/Kcur/Vcur apart by op.
LLAMA_NODES: Final[Mapping[str, Stage]] = {
    "embd": Stage.EMBEDDING,  # build_inp_embd, after Granite's embedding_scale
    "attn_norm": Stage.ATTN_NORM,
    "kq": Stage.ATTN_SCORES,  # the SOFT_MAX's input; × its scale
    "kq_soft_max": Stage.ATTN_SOFTMAX,
    "kqv_out": Stage.ATTENTION,
    "ffn_inp": Stage.POST_ATTN_RESIDUAL,
    "ffn_norm": Stage.FFN_NORM,
    "ffn_gate": Stage.FFN_GATE,
    "ffn_up": Stage.FFN_UP,
    "ffn_swiglu": Stage.FFN_SWIGL,  # the fused SWIGLU op: silu(gate) alone is never materialized
    "ffn_out": Stage.FFN_OUT,
    "l_out": Stage.POST_FFN_RESIDUAL,
    "result_norm": Stage.FINAL_NORM,
    "result_output": Stage.LM_HEAD,  # after Granite's logit_scale
}
