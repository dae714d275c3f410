"""Traces are verified, confined and read only from regular files (issue 14, items 2 and 4)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from apr.diff.compare import diff_traces
from apr.errors import FormatError, TraceFormatError
from apr.stages import Stage, StageId
from apr.trace import format as aprt
from apr.trace.reader import read_trace
from tests.fixtures.cli import run
from tests.fixtures.traces import write_trace

FFN_OUT = StageId(Stage.FFN_OUT, 1)


def _tamper(trace: Path, sid: StageId = FFN_OUT) -> Path:
    """Replace one stage file's values by ×(−3), keeping its header and the manifest unchanged."""
    p = trace / f"layer-{sid.layer}" / f"{sid.stage.value}.bin"
    aprt.write_aprt(p, sid.layer, np.asarray(aprt.read_aprt(p).values) * np.float32(-3))
    return p


def test_a_stage_file_changed_under_its_manifest_is_refused(tmp_path: Path) -> None:
    a = write_trace(tmp_path / "a")
    b = shutil.copytree(a, tmp_path / "b")
    p = _tamper(b)
    with pytest.raises(TraceFormatError) as e:
        read_trace(b)
    assert str(e.value) == (
        f"{p}: sha256 differs from the manifest's (the file was changed after the run wrote it)"
    )
    code, _, err = run("diff", str(a), str(b))
    assert code == 4 and err.startswith("error: ") and "sha256 differs" in err


def test_equal_manifest_hashes_are_no_shortcut(tmp_path: Path) -> None:
    """Even past verification (the file changed after read_trace), both sides' bytes are compared."""
    a = write_trace(tmp_path / "a")
    b = shutil.copytree(a, tmp_path / "b")
    ta, tb = read_trace(a), read_trace(b)
    _tamper(b)
    d = diff_traces(ta, tb)
    assert [str(r.sid) for r in d.diverged] == [str(FFN_OUT)]


def test_size_mismatch_is_refused(tmp_path: Path) -> None:
    a = write_trace(tmp_path / "a")
    doc = json.loads((a / "manifest.json").read_text())
    doc["files"][0]["bytes"] += 1
    (a / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(TraceFormatError, match="bytes, the manifest says"):
        read_trace(a)


@pytest.mark.parametrize("evil", ["../../etc/passwd", "/etc/passwd", "layer-0/../../x/embedding.bin"])
def test_manifest_paths_must_stay_inside(tmp_path: Path, evil: str) -> None:
    a = write_trace(tmp_path / "a")
    doc = json.loads((a / "manifest.json").read_text())
    doc["files"][0]["path"] = evil
    (a / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError) as e:
        read_trace(a)
    assert repr(evil) in str(e.value) and "root:" not in str(e.value)


def test_a_fifo_stage_file_is_refused(tmp_path: Path) -> None:
    a = write_trace(tmp_path / "a")
    p = a / "final_norm.bin"
    p.unlink()
    os.mkfifo(p)
    with pytest.raises(FormatError, match="is a FIFO, not a regular file"):
        read_trace(a)


def test_bare_traces_are_read_with_a_note_and_debris_refuses_them(tmp_path: Path) -> None:
    a = write_trace(tmp_path / "a")
    (a / "manifest.json").unlink()
    b = shutil.copytree(a, tmp_path / "b")
    code, out, _ = run("diff", str(a), str(b))
    assert code == 0 and "comparing unverified bare traces" in out
    (b / "layer-0" / ".embedding.bin.tmp-abc123").write_bytes(b"")
    with pytest.raises(TraceFormatError, match="interrupted apr run's files"):
        read_trace(b)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("[" * 10_000, "nests 10000 levels deep (at most 64)"),
        ('{"schema": ' + "1" * 5000 + "}", "holds an integer of 5000 digits"),
        ('{"schema": 1e400}', "holds a number out of range for a 64-bit float"),
        ('"just a string"', "a trace manifest must be a JSON object"),
    ],
)
def test_hostile_manifest_json(tmp_path: Path, doc: str, message: str) -> None:
    a = write_trace(tmp_path / "a")
    (a / "manifest.json").write_text(doc)
    with pytest.raises(TraceFormatError) as e:
        read_trace(a)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_symlink_loop_is_named(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    assert run("diff", str(a), str(b)) == (4, "", f"error: {a}: symlink loop\n")
    with pytest.raises(FormatError, match="symlink loop"):
        read_trace(a)


def test_an_unfinished_run_directory_is_not_a_bare_trace(tmp_path: Path) -> None:
    run_dir = write_trace(tmp_path / ".t.apr-tmp-x1y2")  # outdir.py's name for a run being written
    (run_dir / "manifest.json").unlink()
    with pytest.raises(TraceFormatError, match=r"interrupted apr run's files \(\.t\.apr-tmp-x1y2\)"):
        read_trace(run_dir)


def test_read_trace_takes_a_str_path_as_open_checkpoint_does(tmp_path: Path) -> None:
    a = write_trace(tmp_path / "a")
    assert read_trace(str(a)).path == read_trace(a).path == a
