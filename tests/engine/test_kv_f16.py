"""`--kv-type f16`: K and V rounded to f16 after RoPE, as llama.cpp's default KV cache stores them.

Against llama.cpp run with its F16 cache (`run_llamacpp(kv_type="f16")`) on the Q8_0 fixture (llama.cpp's
own quantizer, tests/quant/fixtures.py): `--precision ggml --kv-type f16` (which also rounds Q and the
softmax output to f16, the f16 matmuls' vec_dot type, and runs Q·Kᵀ / ·V in tinyBLAS's order) matches
every stage bit for bit — the same tolerance (0) as `--kv-type f32` against llama.cpp's F32 cache
(tests/engine/test_ggml_precision.py). Without the f16 cache on our side the same comparison is off by
more than `F32_CACHE_MISS` in the attention. The option runs through TraceOptions into the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apr.errors import ValidationError
from apr.models import open_model
from apr.stages import Stage
from apr.trace.plan import TracePlan
from apr.trace.run import TraceOptions, prepare_trace
from tests.engine.test_ggml_precision import WHOLE_TOL, whole_trace_errors
from tests.fixtures import models
from tests.quant.fixtures import quantized_gguf

pytestmark = pytest.mark.oracle
F32_CACHE_MISS = 1e-4  # our f32 attention against llama.cpp's f16 cache: worse than this somewhere


def test_ggml_with_an_f16_cache_matches_llamacpps_f16_cache_bit_for_bit() -> None:
    errors = whole_trace_errors("Q8_0", ggml=True, kv_type="f16")
    apart = {str(sid): f"{e:.1e}" for sid, e in errors.items() if e > WHOLE_TOL}
    assert apart == {}
    assert len({sid.stage for sid in errors} & {Stage.ATTN_SCORES, Stage.ATTN_SOFTMAX, Stage.ATTENTION}) == 3


def test_an_f32_cache_does_not_match_llamacpps_f16_cache() -> None:
    errors = whole_trace_errors("Q8_0", ggml=True, kv_type="f16", ours_kv="f32")
    attention = [e for sid, e in errors.items() if sid.stage is Stage.ATTENTION]
    assert max(attention) > F32_CACHE_MISS


def test_the_manifest_records_the_kv_type(tmp_path: Path) -> None:
    path = models.smollm2_gguf()
    plan = TracePlan.from_cli("attention", "0..1")
    prepared = prepare_trace(path, "Hello")
    outcome = prepared.run(plan, tmp_path / "t", TraceOptions(precision="ggml", kv_type="f16"))
    engine = json.loads((tmp_path / "t" / "manifest.json").read_text())["engine"]
    assert (engine["kv_type"], engine["settings"]["kv_cache"]) == ("f16", "f16")
    assert outcome.run.kv_type == "f16"
    plain = prepare_trace(path, "Hello").run(plan, tmp_path / "p", TraceOptions())
    assert plain.run.kv_type == "f32"


def test_llamacpp_runs_with_the_cache_type_asked_for(tmp_path: Path) -> None:
    path = quantized_gguf("Q8_0", tokenizer=True)
    opt = TraceOptions(engine="llama.cpp", kv_type="f16")
    outcome = prepare_trace(path, "Hello", "llama.cpp").run(
        TracePlan.from_cli("attention", "0..1"), tmp_path, opt
    )
    assert outcome.engine.settings["kv_cache"] == "f16"
    assert open_model(path).config.n_layers == 30


@pytest.mark.parametrize(
    ("opt", "message"),
    [
        (TraceOptions(kv_type="q8"), "unknown KV cache type 'q8' (choose from f32, f16)"),
        (
            TraceOptions(engine="transformers", kv_type="f16"),
            "--engine transformers keeps its KV cache in f32; drop --kv-type f16",
        ),
    ],
)
def test_kv_types_that_cannot_run_are_refused(opt: TraceOptions, message: str, tmp_path: Path) -> None:
    prepared = prepare_trace(models.smollm2_gguf(), "Hello")
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepared.run(TracePlan.from_cli("attention", "0..1"), tmp_path, opt)


def test_cli_kv_type_reaches_both_engines(tmp_path: Path) -> None:
    """`apr trace --kv-type f16` on each engine, then `apr diff`: the ggml emulation with an f16 cache and
    llama.cpp with its f16 cache agree to the bit on every stage both capture (max |a-b| = 0)."""
    from tests.fixtures.cli import run

    path = quantized_gguf("Q8_0", tokenizer=True)
    stages = "attention,attn_out,lm_head"
    common = ("--save-tensor", stages, "--save-tensor-layers", "all", "--prompt", "Hello")
    for name, extra in (("ref", ("--precision", "ggml")), ("cpp", ("--engine", "llama.cpp"))):
        code, out, err = run("-q", "trace", str(path), *common, *extra, "--kv-type", "f16",
                             "--save-tensor-dir", str(tmp_path / name))  # fmt: skip
        assert code == 0, out + err
        assert json.loads((tmp_path / name / "manifest.json").read_text())["engine"]["kv_type"] == "f16"
    code, out, err = run("diff", str(tmp_path / "ref"), str(tmp_path / "cpp"), "--json")
    assert code == 0, err
    rows = json.loads(out)["stages"]
    assert len(rows) >= 5 and all(r["max_abs_diff"] == 0.0 for r in rows), rows
