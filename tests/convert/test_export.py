"""`apr export`: an HF folder transformers loads offline, equal to what transformers makes of the GGUF."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from apr.cli import cli
from apr.engine.weights import Weights
from apr.models import open_model
from apr.models.config import ModelConfig, RopeScaling
from apr.models.exchange_gguf import llama3_from_freqs, rope_freqs
from apr.models.llama import DECODER
from apr.stages import Stage, StageId
from tests.fixtures.zoo import ZooModel
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


def test_a_llama3_gguf_exports_its_rope_scaling_recovered_from_rope_freqs(zoo: Any, tmp_path: Path) -> None:
    """llama.cpp's converter writes Llama 3's scaling as the rope_freqs tensor and no parameters; the
    export states the rope_scaling that gives those divisors back, and transformers' logits on it are
    bit-identical (tolerance 0) to its logits on the folder the GGUF was converted from."""
    z: ZooModel = zoo("llama3")
    out = tmp_path / "hf"
    r = CliRunner().invoke(cli, ["export", str(z.gguf), "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    given = z.hf_config["rope_parameters"]
    assert cfg["rope_scaling"] == {k: given[k] for k in cfg["rope_scaling"]} | {"rope_type": "llama3"}
    header = json.loads((out / "model.safetensors").read_bytes()[8:][: 1 << 16].split(b"}}", 1)[0] + b"}}")
    assert not [k for k in header if "rope" in k]  # the divisors are in config.json only
    ids = tuple(z.token_ids())
    lm = StageId(Stage.LM_HEAD)
    _, theirs = transformers_run(z.hf_dir, ids)
    _, ours = transformers_run(out, ids)
    assert np.array_equal(ours.arrays[lm], theirs.arrays[lm])


@pytest.mark.parametrize(
    ("theta", "head_dim", "factor", "orig"),
    [
        (500000.0, 128, 8.0, 8192),
        (500000.0, 64, 32.0, 8192),
        (10000.0, 16, 8.0, 32),
        (500000.0, 128, 16.0, 4096),
    ],
)
def test_llama3_scaling_comes_back_from_its_rope_freqs(
    theta: float, head_dim: int, factor: float, orig: int
) -> None:
    """Llama 3.1 (8B), 3.2 (1B) and the zoo's shapes: the divisors a GGUF carries give back a scaling
    whose divisors are the same float32 values; divisors no Llama 3 scaling makes give None."""
    cfg = ModelConfig("llama", head_dim * 4, 1, 4, 4, head_dim, 64, 256, rope_theta=theta)
    scaling = RopeScaling("llama3", factor, 1.0, 4.0, orig)
    freqs = rope_freqs(replace(cfg, rope_scaling=scaling))
    assert freqs is not None
    back = llama3_from_freqs(cfg, freqs)
    assert back is not None and back.kind == "llama3" and back.factor == factor
    again = rope_freqs(replace(cfg, rope_scaling=back))
    assert again is not None and np.array_equal(again, freqs)
    odd = freqs.copy()
    odd[len(odd) // 2] *= 1.01  # a divisor off the curve
    assert llama3_from_freqs(cfg, odd) is None
