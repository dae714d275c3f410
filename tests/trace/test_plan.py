from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apr.errors import PlanError, StageParseError
from apr.stages import DENSE_STAGES, STAGE_ORDER, Stage, StageId
from apr.trace.plan import TracePlan, parse_layer_range, parse_stage_list


def test_all_is_every_stage_in_canonical_order_any_case() -> None:
    plan = TracePlan.from_cli("  ALL ")
    assert plan.stages == STAGE_ORDER and plan.all_stages
    assert plan.layers == range(0, 1)


def test_list_keeps_order_and_duplicates() -> None:
    plan = TracePlan.from_cli(" ffn_up, Embedding ,ffn_up,layer_output")
    assert plan.stages == (Stage.FFN_UP, Stage.EMBEDDING, Stage.FFN_UP, Stage.POST_FFN_RESIDUAL)


@pytest.mark.parametrize("text", ["", "   ", "\t"])
def test_an_empty_list_is_an_error_not_an_empty_plan(text: str) -> None:
    """aprender's empty plan saved nothing and exited 0, leaving the previous trace for a later diff."""
    with pytest.raises(StageParseError) as e:
        TracePlan.from_cli(text)
    assert str(e.value) == (
        "save-tensor stage list invalid: no stage given (comma-separated stage names, see `apr stages`, "
        "or all)"
    )


@pytest.mark.parametrize("text", ["embedding,,lm_head", "embedding,", ",embedding", "ffn_up, ,lm_head"])
def test_empty_token_is_an_error(text: str) -> None:
    with pytest.raises(StageParseError) as e:
        TracePlan.from_cli(text)
    assert str(e.value) == "save-tensor stage list invalid: save-tensor stage cannot be an empty string"


def test_unknown_token_lists_valid_names_and_stops_at_first_bad() -> None:
    with pytest.raises(StageParseError) as e:
        TracePlan.from_cli("embedding,Bogus,alsobad")
    assert str(e.value).startswith('save-tensor stage list invalid: unknown save-tensor stage "bogus"; ')
    assert str(e.value).endswith("valid stages: " + ",".join(STAGE_ORDER))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("0-3", "expected `START..END`"),
        ("3", "expected `START..END`"),
        ("-1..3", 'START "-1" is not a valid u32'),
        ("0..x", 'END "x" is not a valid u32'),
        ("0..4294967296", 'END "4294967296" is not a valid u32'),
        ("3..3", "END (3) must be > START (3)"),
        ("5..2", "END (2) must be > START (5)"),
        ("3..", 'END "" is not a valid u32'),
        ("1...3", 'END ".3" is not a valid u32'),
        ("0..=3", 'END "=3" is not a valid u32'),
    ],
)
def test_layer_range_errors_are_plain_sentences(text: str, reason: str) -> None:
    with pytest.raises(PlanError) as e:
        parse_layer_range(text)
    assert str(e.value) == f"save-tensor layer range invalid ({json.dumps(text)}): {reason}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0..1", range(0, 1)),
        ("  3..7 ", range(3, 7)),
        (" 2 .. 5", range(2, 5)),
        ("+1..2", range(1, 2)),
    ],
)
def test_layer_range_accepts(text: str, expected: range) -> None:
    assert parse_layer_range(text) == expected


def test_should_save_matches_aprender() -> None:
    plan = TracePlan.from_cli("embedding,ffn_gate,lm_head", "3..7")
    assert not plan.should_save(StageId(Stage.EMBEDDING, 0))  # embedding is layer 0: outside 3..7
    assert plan.should_save(StageId(Stage.FFN_GATE, 3))
    assert not plan.should_save(StageId(Stage.FFN_GATE, 7))
    assert plan.should_save(StageId(Stage.LM_HEAD))  # whole-model ignores the range
    assert not plan.should_save(StageId(Stage.FINAL_NORM))  # not selected


def test_for_model_checks_moe_and_range() -> None:
    assert TracePlan.from_cli("all", "0..30").for_model(30).stages == DENSE_STAGES
    with pytest.raises(PlanError, match="^stage moe_router exists only in mixture-of-experts models"):
        TracePlan.from_cli("moe_router").for_model(30)
    with pytest.raises(PlanError) as e:
        TracePlan.from_cli("ffn_up", "28..31").for_model(30)
    assert str(e.value) == "layer range 28..31 is outside the model's 30 layers (valid: 0..30)"
    assert TracePlan.from_cli("lm_head", "28..31").for_model(30).stages == (Stage.LM_HEAD,)


names = st.sampled_from([s.value for s in STAGE_ORDER] + ["layer_output"])


@given(st.lists(names, min_size=1, max_size=8), st.data())
def test_property_any_spelling_of_a_stage_list_parses_to_the_same_stages(
    tokens: list[str], data: st.DataObject
) -> None:
    spaced = [
        data.draw(st.sampled_from(["", " ", "\t"]))
        + "".join(c.upper() if data.draw(st.booleans()) else c for c in t)
        + data.draw(st.sampled_from(["", " "]))
        for t in tokens
    ]
    parsed = parse_stage_list(",".join(spaced))
    assert parsed == tuple(Stage("post_ffn_residual" if t == "layer_output" else t) for t in tokens)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_property_layer_ranges(start: int, end: int) -> None:
    text = f"{start}..{end}"
    if end > start:
        assert parse_layer_range(text) == range(start, end)
    else:
        with pytest.raises(PlanError, match=r"must be > START"):
            parse_layer_range(text)
