"""The decoder's cost follows the tap: what the tap does not keep is not computed for it, and what it keeps
has the same bits whatever else it keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from apr.engine.weights import Weights
from apr.models import open_model
from apr.stages import Stage, StageId

IDS = (1, 504, 3458, 282, 2)


class Keep:
    """A tap that keeps some stages (or all, as a plain callable does) and records what reaches it."""

    def __init__(self, stages: set[Stage] | None = None, positions: list[int] | None = None) -> None:
        self.stages, self.pos = stages, positions
        self.got: dict[StageId, np.ndarray] = {}

    def __call__(self, sid: StageId, value: Any, /) -> None:
        self.got[sid] = np.array(value)

    def wants(self, sid: StageId) -> bool:
        return self.stages is None or sid.stage in self.stages

    def positions(self, n_tokens: int) -> np.ndarray | None:
        return None if self.pos is None else np.array(self.pos)


def run(path: Path, tap: Keep) -> np.ndarray:
    model = open_model(path)
    out: np.ndarray = model.family.forward(Weights(model), model.config, IDS, tap)
    return out


def test_unwanted_stages_reach_no_tap_and_the_kept_ones_keep_their_bits(smollm2_gguf: Path) -> None:
    every, some = Keep(), Keep({Stage.ATTENTION, Stage.ATTN_SOFTMAX})
    none = Keep({Stage.ATTENTION})
    logits = run(smollm2_gguf, every)
    assert np.array_equal(run(smollm2_gguf, some), logits) and np.array_equal(run(smollm2_gguf, none), logits)
    assert not any(s.stage in (Stage.ATTN_SCORES, Stage.QKV_MATMUL) for s in some.got)
    assert not any(s.stage in (Stage.ATTN_SCORES, Stage.ATTN_SOFTMAX) for s in none.got)
    for sid, value in some.got.items():
        assert np.array_equal(value, every.got[sid]), sid


def test_attention_matrices_of_the_kept_positions_only(smollm2_gguf: Path) -> None:
    every, last2 = Keep(), Keep({Stage.ATTN_SCORES, Stage.ATTN_SOFTMAX}, [3, 4])
    run(smollm2_gguf, every)
    run(smollm2_gguf, last2)
    sid = StageId(Stage.ATTN_SOFTMAX, 7)
    assert last2.got[sid].shape == (9, 2, 5)
    assert np.array_equal(last2.got[sid], every.got[sid][:, 3:])
    sid = StageId(Stage.ATTN_SCORES, 29)
    assert np.array_equal(last2.got[sid], every.got[sid][:, 3:])
