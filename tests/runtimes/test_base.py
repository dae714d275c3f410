"""The runtime plumbing: forward ordering, missing-stage accounting, token checks (no runtime needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apr.errors import InferenceError, ValidationError
from apr.runtimes.base import (
    ENGINE_LLAMACPP,
    ENGINE_TRANSFORMERS,
    ForwardOrderTap,
    check_loadable,
    check_token_ids,
    missing_stages,
    model_stages,
)
from apr.stages import Stage, StageId
from tests.runtimes import Recorder


def test_forward_order_tap_sorts_within_a_layer_and_releases_layer_by_layer() -> None:
    rec = Recorder()
    tap = ForwardOrderTap(rec, "test")
    x = np.zeros(1, dtype=np.float32)
    tap(StageId(Stage.EMBEDDING, 0), x)
    tap(StageId(Stage.Q_POST_ROPE, 0), x)
    tap(StageId(Stage.QKV_MATMUL, 0), x)
    assert rec.order == []  # layer 0 is still open
    tap(StageId(Stage.ATTN_NORM, 1), x)
    assert [str(s) for s in rec.order] == ["blk.0.embedding", "blk.0.qkv_matmul", "blk.0.q_post_rope"]
    tap(StageId(Stage.LM_HEAD), x)
    tap(StageId(Stage.FINAL_NORM), x)
    tap.close()
    assert [str(s) for s in rec.order[3:]] == ["blk.1.attn_norm", "final_norm", "lm_head"]
    with pytest.raises(InferenceError, match="^test produced stage blk.1.attn_norm twice$"):
        tap(StageId(Stage.ATTN_NORM, 1), x)


def test_missing_stages() -> None:
    expected = model_stages(qkv_bias=False)
    assert Stage.QKV_BIAS not in expected and Stage.QKV_BIAS in model_stages(qkv_bias=True)
    seen = {StageId(Stage.EMBEDDING, 0), StageId(Stage.LM_HEAD)}
    seen |= {StageId(s, i) for s in expected if s.per_layer and s is not Stage.EMBEDDING for i in (0, 1)}
    seen -= {StageId(Stage.FFN_SILU, 0), StageId(Stage.FFN_SILU, 1)}
    assert missing_stages(expected, frozenset(seen), 2, "x") == (Stage.FFN_SILU, Stage.FINAL_NORM)
    seen.remove(StageId(Stage.ATTN_OUT, 1))
    with pytest.raises(InferenceError, match=r"^x exposed attn_out for some layers but not for \[1\]$"):
        missing_stages(expected, frozenset(seen), 2, "x")


def test_check_token_ids() -> None:
    assert check_token_ids(np.array([3, 0]), 4) == (3, 0)
    with pytest.raises(ValidationError, match="^no token ids to run$"):
        check_token_ids([], 4)
    with pytest.raises(ValidationError, match=r"^token id -1 is outside the vocabulary \(size 4\)$"):
        check_token_ids([1, -1], 4)


def test_a_runtime_is_refused_a_format_it_cannot_load(tmp_path: Path) -> None:
    """Said up front, with how to get one it loads, not left to the runtime's loader ("not found", "invalid
    magic")."""
    (hf := tmp_path / "my-model").mkdir()
    (single := hf / "model.safetensors").write_bytes(b"")
    for engine, fmt, path in [
        ("reference", "apr", tmp_path / "m.apr"),
        (ENGINE_LLAMACPP, "gguf", tmp_path / "m.gguf"),
        (ENGINE_TRANSFORMERS, "gguf", tmp_path / "m.gguf"),
        (ENGINE_TRANSFORMERS, "safetensors", hf),
    ]:
        check_loadable(engine, path, fmt)
    with pytest.raises(ValidationError) as e:
        check_loadable(ENGINE_LLAMACPP, hf, "safetensors")
    assert str(e.value) == (
        f"{hf}: --engine llama.cpp runs .gguf files only, and this is a Hugging Face safetensors folder; "
        f"make one with `apr export {hf} -o my-model.gguf --format gguf`"
    )
    with pytest.raises(ValidationError) as e:
        check_loadable(ENGINE_TRANSFORMERS, single, "safetensors")
    assert str(e.value) == (
        f"{single}: --engine transformers loads a Hugging Face folder, not one .safetensors file of it; "
        f"give the folder {hf}"
    )
