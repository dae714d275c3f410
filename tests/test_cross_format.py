"""The same model as .gguf, .apr (apr import) and HF safetensors (apr export) gives agreeing traces."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from apr.diff.compare import Tolerance, diff_traces
from apr.formats.config import QKLayout
from apr.models import open_model
from apr.trace.plan import TracePlan
from apr.trace.reader import read_trace
from apr.trace.run import TraceOptions, prepare_trace

ALL_LAYERS = TracePlan.from_cli("all", "0..30")


def trace(model: Path, out: Path) -> Path:
    prepare_trace(model, "What is 2+2?").run(ALL_LAYERS, out, TraceOptions())
    return out


def digests(d: Path) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*.bin"))
    }


def test_imported_apr_dequantizes_to_exactly_the_ggufs_values(smollm2_gguf: Path, smollm2_apr: Path) -> None:
    g, a = open_model(smollm2_gguf), open_model(smollm2_apr)
    assert g.config == a.config
    names = [t.name for t in g.tensors()]
    assert sorted([*names, "output.weight"]) == sorted(t.name for t in a.tensors())  # + the tied lm_head
    for name in names:
        assert np.array_equal(g.read(name).view(np.uint32), a.read(name).view(np.uint32)), name
    assert np.array_equal(a.read("output.weight"), g.read("token_embd.weight"))


def test_gguf_and_imported_apr_traces_are_byte_identical(
    smollm2_gguf: Path, smollm2_apr: Path, tmp_path: Path
) -> None:
    dg, da = trace(smollm2_gguf, tmp_path / "g"), trace(smollm2_apr, tmp_path / "a")
    assert (
        len(digests(dg)) == 1 + 30 * 16 + 2
    )  # embedding, 16 per-layer stages (no qkv_bias), final_norm, lm_head
    assert digests(dg) == digests(da)


def test_gguf_and_exported_safetensors_agree_within_f32_rounding(
    smollm2_gguf: Path, smollm2_hf: Path, tmp_path: Path
) -> None:
    dg, dh = trace(smollm2_gguf, tmp_path / "g"), trace(smollm2_hf, tmp_path / "h")
    tg, th = read_trace(dg), read_trace(dh)
    assert tg.manifest and th.manifest
    assert (tg.manifest.run.qk_layout, th.manifest.run.qk_layout) == (QKLayout.INTERLEAVED, QKLayout.HF)
    d = diff_traces(tg, th, Tolerance(min_cos=0.99999, max_rel=1e-4))
    worst = max(d.rows, key=lambda r: r.metrics.rel_l2)
    print(f"gguf vs safetensors: worst {worst.sid} rel L2 {worst.metrics.rel_l2:.2e}")
    assert len(d.rows) == 1 + 30 * 16 + 2  # embedding, 16 per-layer stages (no qkv_bias), final_norm, lm_head
    assert d.first_divergence is None
    assert "Q/K layouts differ" in d.notes[0]


def test_qk_stages_really_differ_in_layout_before_alignment(
    smollm2_gguf: Path, smollm2_hf: Path, tmp_path: Path
) -> None:
    """Guard for the test above: without un-permuting, q_post_rope of the two traces does not match."""
    plan = TracePlan.from_cli("q_post_rope")
    for model, out in ((smollm2_gguf, tmp_path / "g"), (smollm2_hf, tmp_path / "h")):
        prepare_trace(model, "What is 2+2?").run(plan, out, TraceOptions())
    a = np.fromfile(tmp_path / "g/layer-0/q_post_rope.bin", "<f4", offset=12)
    b = np.fromfile(tmp_path / "h/layer-0/q_post_rope.bin", "<f4", offset=12)
    assert np.abs(a - b).max() > 0.1
    assert sorted(a.tolist()) == pytest.approx(sorted(b.tolist()), abs=1e-4)
