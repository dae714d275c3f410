"""Single-file drill-down (`apr diff run-a/layer-0/q_post_rope.bin run-b/layer-0/q_post_rope.bin`) on real
traces of one tiny model as llama.cpp's converter wrote it (GGUF: Q/K rows interleaved) and as its HF folder:
the file pair must give the directory diff's numbers for that stage, and a file no manifest describes must be
refused for a layout-sensitive stage (exit 5) instead of giving a cosine of two row orders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fixtures.cli import run
from tests.fixtures.zoo import ZooModel

STAGES = "q_post_rope,k_post_rope,qkv_matmul,attn_out,lm_head"


@pytest.fixture(scope="module")
def traces(zoo: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    z: ZooModel = zoo("llama")
    tmp = tmp_path_factory.mktemp("drill")
    ids = ",".join(map(str, z.token_ids()))
    for model, out in ((z.gguf, tmp / "g"), (z.hf_dir, tmp / "h")):
        code, _, err = run("trace", str(model), "--save-tensor", STAGES, "--save-tensor-layers", "0..2",
                           "--save-tensor-dir", str(out), "--tokens", ids)  # fmt: skip
        assert code == 0, err
    return tmp / "g", tmp / "h"


def diff_json(*args: str) -> tuple[int, dict[str, Any], str]:
    code, out, err = run("diff", *args, "--json")
    return code, json.loads(out) if out else {}, err


@pytest.mark.parametrize(
    "rel", ["layer-0/q_post_rope.bin", "layer-1/k_post_rope.bin", "layer-1/qkv_matmul.bin"]
)
def test_file_pair_gives_the_directory_modes_cosine(traces: tuple[Path, Path], rel: str) -> None:
    g, h = traces
    code, whole, _ = diff_json(str(g), str(h))
    assert code == 0
    stage, layer = Path(rel).stem, int(Path(rel).parent.name.split("-")[1])
    row = next(r for r in whole["stages"] if r["stage"] == stage and r["layer"] == layer)
    assert row["cosine"] > 0.99999  # the directory diff puts both sides in HF order
    code, single, err = diff_json(str(g / rel), str(h / rel))
    assert code == 0, err
    # the same aligned values: equal to float32 summation order (tolerance 1e-6 relative)
    assert single["cosine_sim"] == pytest.approx(row["cosine"], rel=1e-6, abs=1e-7)
    assert single["max_abs_diff"] == pytest.approx(row["max_abs_diff"], rel=1e-6)
    # guard: the stored row orders really differ, so as-stored values would not give that cosine
    a, b = (np.fromfile(d / rel, "<f4", offset=12) for d in traces)
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) < 0.9


def test_unaffected_stage_and_check(traces: tuple[Path, Path]) -> None:
    g, h = traces
    code, doc, _ = diff_json(str(g / "layer-1/attn_out.bin"), str(h / "layer-1/attn_out.bin"))
    assert code == 0 and doc["cosine_sim"] > 0.99999
    assert (
        run("diff", str(g / "layer-0/q_post_rope.bin"), str(h / "layer-0/q_post_rope.bin"), "--check")[0] == 0
    )


def test_bare_copy_of_a_qk_stage_is_refused_exit_5(traces: tuple[Path, Path], tmp_path: Path) -> None:
    g, h = traces
    bare = tmp_path / "bare" / "layer-0"
    bare.mkdir(parents=True)
    shutil.copy(g / "layer-0/q_post_rope.bin", bare / "q_post_rope.bin")  # an aprender-style trace
    shutil.copy(g / "layer-0/attn_out.bin", bare / "attn_out.bin")
    code, out, err = run("diff", str(bare / "q_post_rope.bin"), str(h / "layer-0/q_post_rope.bin"))
    assert (code, out) == (5, "") and err.count("\n") == 1
    assert err.startswith("error: q_post_rope depends on the Q/K row layout") and str(bare) in err
    # a stage whose values do not depend on the row order still compares as stored
    code, doc, _ = diff_json(str(bare / "attn_out.bin"), str(h / "layer-0/attn_out.bin"))
    assert code == 0 and doc["cosine_sim"] > 0.99999


def test_only_the_compared_files_are_verified(traces: tuple[Path, Path], tmp_path: Path) -> None:
    """A drill-down checks the two files it compares against their manifests (size, sha256), not every file
    of both traces: another file changed after the run does not stop it; the compared one does (exit 4)."""
    g, h = traces
    copy = tmp_path / "g"
    shutil.copytree(g, copy)
    other = copy / "layer-1/attn_out.bin"
    raw = bytearray(other.read_bytes())
    raw[-1] ^= 0x40
    other.write_bytes(bytes(raw))
    rel = "layer-0/q_post_rope.bin"
    code, single, err = diff_json(str(copy / rel), str(h / rel))
    assert code == 0 and single["cosine_sim"] > 0.99999, err
    code, out, err = run("diff", str(other), str(h / "layer-1/attn_out.bin"))
    assert (code, out) == (4, "") and "sha256 differs" in err and err.count("\n") == 1
