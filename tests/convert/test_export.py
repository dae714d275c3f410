"""`apr export`: an HF folder transformers loads offline, equal to what transformers makes of the GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from apr.cli import cli
from apr.engine.weights import Weights
from apr.models import open_model
from apr.models.llama import DECODER
from apr.stages import Stage, StageId
from tests.runtimes import PROMPT, PROMPT_IDS, Recorder, rel_err, transformers_run, write_tiny_gguf

forward = DECODER.forward

pytestmark = pytest.mark.oracle


def test_transformers_loads_the_export_and_agrees_with_its_own_gguf_loader(
    smollm2_hf: Path, smollm2_f32_gguf: Path
) -> None:
    """transformers dequantizes and un-permutes the GGUF on its own; our export must give the same model."""
    from transformers import AutoTokenizer

    _, from_gguf = transformers_run(smollm2_f32_gguf, PROMPT_IDS)
    _, from_export = transformers_run(smollm2_hf, PROMPT_IDS)
    lm = StageId(Stage.LM_HEAD)
    assert np.array_equal(from_export.arrays[lm], from_gguf.arrays[lm])
    tok = AutoTokenizer.from_pretrained(smollm2_hf, local_files_only=True)
    assert tok(PROMPT, add_special_tokens=False)["input_ids"] == list(PROMPT_IDS)
    cfg = json.loads((smollm2_hf / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True


def test_export_of_the_imported_apr_is_byte_identical(
    smollm2_apr: Path, smollm2_hf: Path, tmp_path: Path
) -> None:
    r = CliRunner().invoke(cli, ["export", str(smollm2_apr), "-o", str(tmp_path / "hf"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["schema"] == "apr-export-v1"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (smollm2_hf / name).read_bytes(), name


def test_qwen2_with_bias_round_trips_through_export(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "q.gguf", "qwen2")
    r = CliRunner().invoke(cli, ["export", str(gguf), "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.stderr
    ids = (5, 17, 200, 3)
    ours = Recorder()
    ck = open_model(gguf)
    forward(Weights(ck), ck.config, ids, ours, lm_head_all=True)
    _, theirs = transformers_run(tmp_path / "hf", ids)
    lm = StageId(Stage.LM_HEAD)
    assert rel_err(ours.arrays[lm], theirs.arrays[lm]) < 1e-5
    assert StageId(Stage.QKV_BIAS, 1) in theirs.arrays
