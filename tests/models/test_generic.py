"""An architecture apr has no family for, traced by the runtimes that run it: SmolLM3 (NoPE layers).

The reference engine and `open_model` refuse it by name; `--engine transformers` on the HF folder and
`--engine llama.cpp` on the GGUF (llama.cpp's converter) trace it, mapping what the llama module / node
names cover and listing the rest as not captured. The two runtimes' logits agree (≤ 1e-5 relative L2), and
so do their layer outputs — a cross-runtime comparison with no apr math in between.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from apr.errors import ModelLoadError
from apr.models import open_model
from apr.stages import Stage, StageId
from apr.trace.reader import read_trace
from tests.fixtures.cli import run
from tests.fixtures.zoo import ZooModel

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def smollm3(zoo: Callable[[str], ZooModel]) -> ZooModel:
    return zoo("smollm3")


def test_the_reference_engine_refuses_it_by_name(smollm3: ZooModel, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="architecture 'SmolLM3ForCausalLM' is not supported"):
        open_model(smollm3.hf_dir)
    code, _, err = run(
        "trace", str(smollm3.gguf), "--save-tensor", "all", "--save-tensor-dir", str(tmp_path / "t")
    )
    assert code == 6 and "architecture 'smollm3' is not supported" in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


def trace(path: Path, engine: str, out: Path, ids: list[int]) -> Path:
    n = 4
    args = ["--tokens", ",".join(map(str, ids)), "--save-tensor", "all", "--save-tensor-layers", f"0..{n}"]
    code, _, err = run("-q", "trace", str(path), "--engine", engine, *args, "--save-tensor-dir", str(out))
    assert code == 0, err
    return out


def test_both_runtimes_trace_it_and_agree(smollm3: ZooModel, tmp_path: Path) -> None:
    ids = smollm3.token_ids()
    a = read_trace(trace(smollm3.hf_dir, "transformers", tmp_path / "hf", ids))
    b = read_trace(trace(smollm3.gguf, "llama.cpp", tmp_path / "gguf", ids))
    manifest = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    assert manifest["config"]["family"] == "generic" and manifest["config"]["n_layers"] == 4
    for t in (a, b):
        assert StageId(Stage.POST_FFN_RESIDUAL, 3) in t.entries and StageId(Stage.LM_HEAD) in t.entries
    for sid in [StageId(Stage.POST_FFN_RESIDUAL, i) for i in range(4)] + [StageId(Stage.LM_HEAD)]:
        x, y = np.asarray(a.load(sid), np.float64), np.asarray(b.load(sid), np.float64)
        x, y = x.reshape(-1, x.shape[-1])[-y.reshape(-1, y.shape[-1]).shape[0] :], y.reshape(-1, y.shape[-1])
        assert np.linalg.norm(x - y) / np.linalg.norm(y) <= 1e-5, sid
