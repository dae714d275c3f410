"""`apr trace --save-tensor-mode stats`: per stage and position statistics in one file, against numpy over the
APRT files of a full trace of the same run (read here with np.fromfile, not apr's reader), and sha256 of the
same bytes with hashlib."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from apr.trace import stats as aprs
from tests.fixtures import zoo
from tests.fixtures.cli import run
from tests.fixtures.models import cache_dir

IDS = "1,5,49,93,137,181,225"
TXT = ("attn_scores", "attn_softmax")


@pytest.fixture(scope="module")
def llama() -> Path:
    return zoo.build("llama", cache_dir() / "fixtures").gguf


def trace(model: Path, out: Path, *extra: str) -> None:
    code, stdout, err = run("-q", "trace", str(model), "--save-tensor", "all", "--save-tensor-layers", "all",
                            "--tokens", IDS, "--save-tensor-dir", str(out), *extra)  # fmt: skip
    assert code == 0, stdout + err


@pytest.fixture(scope="module")
def pair(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("stats")
    trace(llama, d / "full", "--lm-head-all")
    trace(llama, d / "stats", "--lm-head-all", "--save-tensor-mode", "stats")
    return d / "full", d / "stats"


def positions_of(values: np.ndarray, shape: list[int], stage: str) -> np.ndarray:
    x = values.reshape(shape)
    if stage in TXT:
        return np.ascontiguousarray(np.moveaxis(x, 1, 0)).reshape(shape[1], -1)
    return x.reshape(shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)


def test_every_stage_and_position_matches_numpy_over_the_full_trace(pair: tuple[Path, Path]) -> None:
    """Statistics within 1e-12 relative of numpy's in f64 (summation order); hashes and counts exact."""
    full, stats = pair
    fm, sm = (json.loads((d / "manifest.json").read_text()) for d in pair)
    assert sm["files"] == [] and sm["plan"]["mode"] == "stats"
    assert (stats / "stats.aprs").stat().st_size == sm["stats"]["bytes"]
    assert hashlib.sha256((stats / "stats.aprs").read_bytes()).hexdigest() == sm["stats"]["sha256"]
    raw = (stats / "stats.aprs").read_bytes()
    assert raw[:4] == b"APRS" and int.from_bytes(raw[4:8], "little") == 1
    records = np.frombuffer(raw, aprs.RECORD, offset=16)
    entries = {(e["stage"], e["layer"]): e for e in sm["stats"]["stages"]}
    assert len(entries) == len(fm["files"]) == 35  # 2 layers × 16 stages, embedding, final_norm, lm_head
    for f in fm["files"]:
        e = entries[(f["stage"], f["layer"])]
        assert e["shape"] == f["shape"] and e["positions"] == "0..7"
        values = np.fromfile(full / f["path"], "<f4", offset=12)
        rows = positions_of(values, f["shape"], f["stage"])
        got = records[e["first"] : e["first"] + len(rows)]
        x = rows.astype(np.float64)
        for name, want in (("min", x.min(1)), ("max", x.max(1)), ("mean", x.mean(1)), ("std", x.std(1)),
                           ("absmax", np.abs(x).max(1)), ("l2", np.linalg.norm(x, axis=1))):  # fmt: skip
            np.testing.assert_allclose(
                got[name], want, rtol=1e-12, atol=1e-300, err_msg=f"{f['path']} {name}"
            )
        assert [bytes(h) for h in got["sha256"]] == [hashlib.sha256(r.tobytes()).digest() for r in rows]
        assert not got["nan"].any() and not got["inf"].any()


def test_nan_and_inf_are_counted_not_summed() -> None:
    row = np.array([[1.0, np.nan, -3.0, np.inf, 2.0, -np.inf]], np.float32)
    r = aprs.compute(row)[0]
    finite = np.array([1.0, -3.0, 2.0])
    assert (r["nan"], r["inf"]) == (1, 2)
    assert (r["min"], r["max"], r["absmax"]) == (-3.0, 2.0, 3.0)
    assert r["mean"] == pytest.approx(finite.mean(), rel=1e-15)
    assert r["std"] == pytest.approx(finite.std(), rel=1e-15)
    assert r["l2"] == pytest.approx(np.linalg.norm(finite), rel=1e-15)
    assert bytes(r["sha256"]) == hashlib.sha256(row.tobytes()).digest()


def test_reruns_are_byte_identical(llama: Path, tmp_path: Path, pair: tuple[Path, Path]) -> None:
    trace(llama, tmp_path / "again", "--lm-head-all", "--save-tensor-mode", "stats")
    for name in ("stats.aprs", "manifest.json"):
        assert (tmp_path / "again" / name).read_bytes() == (pair[1] / name).read_bytes()


def test_full_mode_is_unchanged_by_the_option(llama: Path, tmp_path: Path, pair: tuple[Path, Path]) -> None:
    """`--save-tensor-mode full` is the default: the same bytes, and no stats keys in the manifest."""
    trace(llama, tmp_path / "full", "--lm-head-all", "--save-tensor-mode", "full")
    assert (tmp_path / "full" / "manifest.json").read_bytes() == (pair[0] / "manifest.json").read_bytes()
    doc = json.loads((pair[0] / "manifest.json").read_text())
    assert "stats" not in doc and "mode" not in doc["plan"]


def test_a_changed_stats_file_is_refused(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    trace(llama, out, "--save-tensor-mode", "stats")
    data = bytearray((out / "stats.aprs").read_bytes())
    data[100] ^= 1
    (out / "stats.aprs").write_bytes(bytes(data))
    code, _, err = run("diff", str(out), str(out))
    assert code != 0 and "sha256 differs from the manifest" in err and err.startswith("error: ")


def test_positions_and_last_logits(llama: Path, tmp_path: Path) -> None:
    """--save-tensor-positions 2..5: three records a per-position stage; lm_head (last only): position 6."""
    trace(llama, tmp_path / "s", "--save-tensor-mode", "stats", "--save-tensor-positions", "2..5")
    doc = json.loads((tmp_path / "s" / "manifest.json").read_text())
    by = {(e["stage"], e["layer"]): e for e in doc["stats"]["stages"]}
    assert by[("attn_scores", 1)]["positions"] == "2..5" and by[("attn_scores", 1)]["shape"] == [4, 3, 7]
    assert by[("lm_head", None)]["positions"] == "6..7"


def test_layers_all_is_every_layer(llama: Path, tmp_path: Path) -> None:
    """`--save-tensor-layers all` = 0..n_layers (issue 13 item 8)."""
    trace(llama, tmp_path / "s", "--save-tensor-mode", "stats")
    doc = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert doc["plan"]["layers"] == "0..2"
    assert {e["layer"] for e in doc["stats"]["stages"]} == {0, 1, None}


def test_a_new_trace_replaces_the_other_modes_files(llama: Path, tmp_path: Path) -> None:
    """stats over full drops the stage files; full over stats drops stats.aprs (other files are kept)."""
    out = tmp_path / "t"
    trace(llama, out)
    (out / "notes.txt").write_text("mine")
    trace(llama, out, "--save-tensor-mode", "stats")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "stats.aprs"]
    trace(llama, out)
    names = sorted(p.name for p in out.iterdir())
    assert "stats.aprs" not in names and "notes.txt" in names and "layer-0" in names


def test_json_names_the_statistics_file(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    code, stdout, err = run("trace", str(llama), "--save-tensor", "all", "--tokens", IDS, "--json",
                            "--save-tensor-mode", "stats", "--save-tensor-dir", str(out))  # fmt: skip
    assert code == 0, stdout + err
    doc = json.loads(stdout)
    assert doc["files"] == [] and doc["stats"]["path"] == str(out / "stats.aprs")
    assert doc["stats"]["bytes"] == (out / "stats.aprs").stat().st_size
    assert doc["stats"]["records"] == (doc["stats"]["bytes"] - 16) // aprs.RECORD.itemsize
