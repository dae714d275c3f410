from __future__ import annotations

import pytest

from apr.errors import StageParseError
from apr.stages import APRENDER_STAGES, FORWARD_ORDER, STAGE_ORDER, Stage, StageId, parse_stage

# spec/aprender.md §2.1, in `ALL` order
SPEC_NAMES = [
    "embedding",
    "attn_norm",
    "qkv_matmul",
    "qkv_bias",
    "q_post_rope",
    "k_post_rope",
    "attn_scores",
    "attn_softmax",
    "attention",
    "attn_out",
    "post_attn_residual",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_silu",
    "ffn_swigl",
    "ffn_out",
    "post_ffn_residual",
    "moe_router",
    "moe_ffn_out",
    "moe_router_indices",
    "final_norm",
    "lm_head",
]


APR_ADDITIONS = ["attn_post_norm", "ffn_post_norm", "moe_router_logits", "moe_shared_out"]


def test_vocabulary_is_the_specs_23_names_in_order_then_apr_additions() -> None:
    assert [s.value for s in STAGE_ORDER] == SPEC_NAMES + APR_ADDITIONS
    assert [s.value for s in APRENDER_STAGES] == SPEC_NAMES


def test_forward_order_puts_post_norms_and_moe_inside_their_sublayer() -> None:
    order = [s.value for s in FORWARD_ORDER]
    assert sorted(order) == sorted(SPEC_NAMES + APR_ADDITIONS)
    assert order.index("attn_out") < order.index("attn_post_norm") < order.index("post_attn_residual")
    for moe in ("moe_router_logits", "moe_router", "moe_router_indices", "moe_shared_out", "moe_ffn_out"):
        assert order.index("ffn_norm") < order.index(moe) < order.index("post_ffn_residual"), moe
    assert order.index("ffn_out") < order.index("ffn_post_norm") < order.index("post_ffn_residual")
    assert StageId(Stage.MOE_FFN_OUT, 2).sort_key < StageId(Stage.POST_FFN_RESIDUAL, 2).sort_key


def test_only_final_norm_and_lm_head_are_whole_model() -> None:
    assert [s.value for s in STAGE_ORDER if not s.per_layer] == ["final_norm", "lm_head"]


def test_moe_stages() -> None:
    assert [s.value for s in STAGE_ORDER if s.moe] == [
        "moe_router",
        "moe_ffn_out",
        "moe_router_indices",
        "moe_router_logits",
        "moe_shared_out",
    ]


@pytest.mark.parametrize(
    ("text", "stage"),
    [
        (" Embedding ", Stage.EMBEDDING),
        ("LAYER_OUTPUT", Stage.POST_FFN_RESIDUAL),
        ("lm_head", Stage.LM_HEAD),
    ],
)
def test_parse_stage_trims_lowercases_and_resolves_alias(text: str, stage: Stage) -> None:
    assert parse_stage(text) is stage


def test_parse_stage_errors() -> None:
    with pytest.raises(StageParseError, match="^save-tensor stage cannot be an empty string$"):
        parse_stage("  ")
    with pytest.raises(StageParseError) as e:
        parse_stage("x")
    assert str(e.value) == 'unknown save-tensor stage "x"; valid stages: ' + ",".join(
        SPEC_NAMES + APR_ADDITIONS
    )


@pytest.mark.parametrize(
    ("sid", "text"),
    [(StageId(Stage.ATTN_OUT, 3), "blk.3.attn_out"), (StageId(Stage.LM_HEAD), "lm_head")],
)
def test_stage_id_canonical_spelling_round_trips(sid: StageId, text: str) -> None:
    assert str(sid) == text
    assert StageId.parse(text) == sid


def test_stage_id_parse_accepts_layout_paths_and_aliases() -> None:
    assert StageId.parse("layer-12/ffn_up") == StageId(Stage.FFN_UP, 12)
    assert StageId.parse("blk.2.layer_output") == StageId(Stage.POST_FFN_RESIDUAL, 2)


def test_stage_id_rejects_layer_mismatch() -> None:
    with pytest.raises(StageParseError, match="needs a layer"):
        StageId(Stage.ATTN_OUT)
    with pytest.raises(StageParseError, match="whole-model"):
        StageId(Stage.FINAL_NORM, 0)


def test_sort_key_is_forward_order() -> None:
    ids = [
        StageId(Stage.LM_HEAD),
        StageId(Stage.ATTN_NORM, 1),
        StageId(Stage.FINAL_NORM),
        StageId(Stage.FFN_UP, 0),
        StageId(Stage.EMBEDDING, 0),
    ]
    assert [str(s) for s in sorted(ids, key=lambda s: s.sort_key)] == [
        "blk.0.embedding",
        "blk.0.ffn_up",
        "blk.1.attn_norm",
        "final_norm",
        "lm_head",
    ]
