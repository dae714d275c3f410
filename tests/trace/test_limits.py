"""Resource limits (issue 14, item 6): the prompt against the model's context, chunked comparison,
a model truncated after opening."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from apr.diff import metrics
from apr.errors import FormatError
from apr.models import open_model
from tests.fixtures.cli import run
from tests.fuzz.seeds import write_gguf


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf")  # context_length 16


def test_a_prompt_longer_than_the_context_is_refused(gguf: Path, tmp_path: Path) -> None:
    ids = ",".join(["3"] * 17)
    code, _, err = run(
        "trace",
        str(gguf),
        "--tokens",
        ids,
        "--save-tensor",
        "lm_head",
        "--save-tensor-dir",
        str(tmp_path / "t"),
    )
    assert (code, err) == (5, "error: the prompt is 17 tokens, more than the model's context of 16 tokens\n")
    code, _, err = run(
        "trace",
        str(gguf),
        "--tokens",
        ",".join(["3"] * 16),
        "--save-tensor",
        "lm_head",
        "--save-tensor-dir",
        str(tmp_path / "u"),
    )
    assert code == 0, err


def test_a_huge_text_prompt_is_refused_before_tokenizing(gguf: Path, tmp_path: Path) -> None:
    code, _, err = run(
        "trace",
        str(gguf),
        "--prompt",
        "a" * 2000,
        "--save-tensor",
        "lm_head",
        "--save-tensor-dir",
        str(tmp_path / "t"),
    )
    assert (code, err) == (
        5,
        "error: the prompt has 2000 characters, far more than the model's context of 16 tokens holds; "
        "not tokenized\n",
    )


def test_a_model_truncated_after_opening_is_a_clean_error(gguf: Path) -> None:
    model = open_model(gguf)
    os.truncate(gguf, 2048)
    with pytest.raises(FormatError, match=r"the file now has 2048 bytes \(truncated after apr opened it\?\)"):
        for t in model.tensors():
            model.read(t.name)
    with pytest.raises(FormatError, match=r"the file now has 2048 bytes \(truncated after apr opened it\?\)"):
        model.read_rows("token_embd.weight", np.array([0, 9]))


def test_compare_in_chunks_equals_compare_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(10_000).astype(np.float32)
    b = (a + 0.01 * rng.standard_normal(10_000)).astype(np.float32)
    b[7777] = np.nan
    whole = metrics.compare(a, b), metrics.top_diffs(a, b, 5)
    monkeypatch.setattr(metrics, "CHUNK", 1000)
    chunked = metrics.compare(a, b), metrics.top_diffs(a, b, 5)
    assert chunked[0].max_index == whole[0].max_index and chunked[0].nan_count == whole[0].nan_count == 1
    assert [d.index for d in chunked[1]] == [d.index for d in whole[1]] and chunked[1][0].index == 7777
    assert chunked[0].cosine == pytest.approx(whole[0].cosine, nan_ok=True)


def test_max_tokens_guard(gguf: Path, tmp_path: Path) -> None:
    out = ("--save-tensor", "lm_head", "--save-tensor-dir", str(tmp_path / "t"))
    code, _, err = run("trace", str(gguf), "--tokens", "3,3,3,3", "--max-tokens", "3", *out)
    assert (code, err) == (5, "error: the prompt is 4 tokens, more than --max-tokens 3\n")
    code, _, err = run("trace", str(gguf), "--tokens", "3,3,3", "--max-tokens", "3", *out)
    assert code == 0, err
    assert run("trace", str(gguf), "--max-tokens", "0", *out)[0] == 2
