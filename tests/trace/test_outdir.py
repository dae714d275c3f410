"""Trace-directory atomicity with real signals and a real full disk: the previous trace survives SIGINT,
kill -9 and ENOSPC exactly as it was, nothing partial is left, and a second run into a directory being
written is refused. A symlink is followed; the mode and group stay; a directory a rename cannot replace, or
one under a file, is refused before any model is opened."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from apr.errors import AprIOError
from apr.stages import Stage, StageId
from apr.trace.outdir import OutputDir, lock_path
from apr.trace.plan import TracePlan
from apr.trace.writer import TraceWriter
from tests.fixtures.cli import run, run_unprivileged
from tests.fixtures.disks import mounted_tmpfs
from tests.fixtures.traces import run_info

Runner = Callable[..., tuple[int, str, str]]
IDS = ",".join(str(100 + 37 * i % 4000) for i in range(96))  # long enough to be caught mid-run


def digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()
    }


def start_trace(model: Path, out: Path) -> subprocess.Popen[bytes]:
    args = ["trace", str(model), "--tokens", IDS, "--save-tensor", "all", "--save-tensor-layers", "0..30"]
    cmd = [sys.executable, "-m", "apr", *args, "--save-tensor-dir", str(out), "-q"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_mid_run(proc: subprocess.Popen[bytes], out: Path) -> None:
    """Until the run has written layer 2 into its temporary directory."""
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f".{out.name}.apr-tmp-*/layer-2")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


@pytest.fixture
def old_trace(smollm2_gguf: Path, tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    out = tmp_path / "t"
    code, _, stderr = run(
        "trace", str(smollm2_gguf), "--save-tensor", "ffn_up,lm_head", "--save-tensor-dir", str(out)
    )
    assert (code, stderr) == (0, "")
    (out / "notes.txt").write_text("mine")
    yield out, digest(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_rerun_keeps_the_previous_trace(
    smollm2_gguf: Path, old_trace: tuple[Path, dict[str, str]], sig: signal.Signals
) -> None:
    out, before = old_trace
    proc = start_trace(smollm2_gguf, out)
    wait_mid_run(proc, out)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert digest(out) == before
    if sig is signal.SIGINT:
        assert (proc.returncode, stderr) == (130, b"error: interrupted\n")
        assert siblings(out) == []
    else:
        assert proc.returncode == -9 and len(siblings(out)) == 2  # its temporary directory and lock file
        code, _, _ = run(
            "trace", str(smollm2_gguf), "--save-tensor", "lm_head", "--save-tensor-dir", str(out)
        )
        assert code == 0 and siblings(out) == []  # the next run clears what the killed one left
        assert set(digest(out)) == {"lm_head.bin", "manifest.json", "notes.txt"}


def test_an_interrupted_first_run_leaves_no_directory(smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    proc = start_trace(smollm2_gguf, out)
    wait_mid_run(proc, out)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert not out.exists() and siblings(out) == []


def test_a_second_run_into_a_directory_being_written_is_refused(smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    held = OutputDir(out)
    held.open()
    try:
        code, stdout, stderr = run(
            "trace", str(smollm2_gguf), "--save-tensor", "lm_head", "--save-tensor-dir", str(out)
        )
    finally:
        held.close()
    assert (code, stdout.count("Wrote")) == (7, 0)
    assert stderr == (
        f"error: another apr run is writing {out} (it holds {lock_path(out)}); wait for it or choose another "
        "--save-tensor-dir\n"
    )
    assert not out.exists() and siblings(out) == []
    assert run("trace", str(smollm2_gguf), "--save-tensor", "lm_head", "--save-tensor-dir", str(out))[0] == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (the suite runs as root, as `make test` does here)."""
    with mounted_tmpfs(tmp_path / "disk", "1m") as mnt:
        yield mnt


def test_a_full_disk_keeps_the_previous_trace(small_disk: Path) -> None:
    out = small_disk / "t"
    plan = TracePlan.from_cli("embedding,attn_norm", "0..2")
    with TraceWriter(out, plan, run_info()) as w:
        w(StageId(Stage.EMBEDDING, 0), np.ones((3, 8), np.float32))
    before = digest(out)
    with (
        pytest.raises(
            AprIOError, match=f"^cannot write {out}/layer-0/attn_norm.bin: No space left on device$"
        ),
        TraceWriter(out, plan, run_info()) as w,
    ):
        w(StageId(Stage.EMBEDDING, 0), np.ones((3, 8), np.float32))
        w(StageId(Stage.ATTN_NORM, 0), np.ones((3, 1 << 18), np.float32))  # 3 MiB
    assert digest(out) == before and sorted(os.listdir(small_disk)) == ["t"]


def test_a_trace_over_the_free_space_is_refused_before_running(smollm2_gguf: Path, small_disk: Path) -> None:
    out = small_disk / "t"
    args = ["trace", str(smollm2_gguf), "--save-tensor", "all", "--save-tensor-layers", "0..5"]
    code, _, stderr = run(*args, "--save-tensor-dir", str(out), "--max-disk", "none")
    assert code == 5 and not out.exists()
    assert stderr == (
        f"error: the trace would write ~1.9 MiB to {out}, more than the 1.0 MiB free on its filesystem; "
        "shrink it with --save-tensor-positions (e.g. -16..), --save-tensor-layers, --save-tensor\n"
    )


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    from tests.runtimes import write_tiny_gguf

    return write_tiny_gguf(tmp_path / "tiny.gguf", "llama")


def trace_into(model: Path, out: Path | str, stages: str = "lm_head") -> tuple[int, str, str]:
    return run("trace", str(model), "--save-tensor", stages, "--save-tensor-dir", str(out), "-q")


def test_a_symlink_is_followed_and_stays(tiny: Path, tmp_path: Path) -> None:
    """The trace is swapped in at the link's target; the link still points at it; nothing is left."""
    target, link = tmp_path / "pm", tmp_path / "pmlink"
    assert trace_into(tiny, target) == (0, "", "")
    link.symlink_to("pm")
    (tmp_path / ".pmlink.apr-tmp-old1").symlink_to("pm")  # what runs that swapped the link itself left
    assert trace_into(tiny, link, "embedding,lm_head") == (0, "", "")
    assert link.is_symlink() and os.readlink(link) == "pm"
    assert set(digest(target)) == {"layer-0/embedding.bin", "lm_head.bin", "manifest.json"}
    assert siblings(target) == siblings(link) == [] and lock_path(link) == lock_path(target)


def test_a_dangling_symlink_gets_its_target_made(tiny: Path, tmp_path: Path) -> None:
    link = tmp_path / "pmlink"
    link.symlink_to("pm")
    assert trace_into(tiny, link) == (0, "", "")
    assert link.is_symlink() and set(digest(tmp_path / "pm")) == {"lm_head.bin", "manifest.json"}


def test_a_leftover_symlink_is_removed_not_followed(tiny: Path, tmp_path: Path) -> None:
    """A `.<name>.apr-tmp-*` that is a symlink loses the link only: what it points at is not a run's."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data.txt").write_text("keep")
    (tmp_path / ".t.apr-tmp-x1y2").symlink_to(theirs)
    assert trace_into(tiny, tmp_path / "t") == (0, "", "")
    assert siblings(tmp_path / "t") == [] and (theirs / "data.txt").read_text() == "keep"


NOGROUP = 65534


@pytest.mark.parametrize("runner", [run, run_unprivileged])
def test_a_retrace_keeps_the_directory_mode_and_group(tiny: Path, tmp_path: Path, runner: Runner) -> None:
    """A private trace stays private; the group is kept when the process may set it (as root), and its
    EPERM ignored when not (without CAP_CHOWN)."""
    out = tmp_path / "pm"
    assert trace_into(tiny, out)[0] == 0
    assert out.stat().st_mode & 0o7777 == 0o777 & ~current_umask()  # a first run: mkdir's permissions
    os.chown(out, -1, NOGROUP)
    out.chmod(0o750)
    code, _, stderr = runner("trace", str(tiny), "--save-tensor", "lm_head", "--save-tensor-dir", str(out))
    assert (code, stderr) == (0, "")
    st = out.stat()
    assert st.st_mode & 0o7777 == 0o750
    assert st.st_gid == (NOGROUP if runner is run else os.getgid())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("given", "why"),
    [
        (".", "the current directory"),
        ("", "the current directory"),  # click: Path("") is "."
        ("{cwd}", "the current directory"),
        ("..", "a parent of the current directory"),
        ("{tmp}", "a parent of the current directory"),
        ("/", "the root directory"),
    ],
)
def test_a_directory_a_rename_cannot_replace_is_refused_before_running(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str, why: str
) -> None:
    cwd = tmp_path / "pm" / "sub"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    out = given.format(cwd=cwd, tmp=tmp_path / "pm")
    code, stdout, stderr = run("trace", str(tiny), "--save-tensor", "lm_head", "--save-tensor-dir", out)
    assert (code, stdout) == (5, "")  # not even the header: no model was opened
    assert stderr == (
        f"error: cannot write a trace to {out or '.'}: it is {why}, and a trace directory is replaced whole "
        "(choose another --save-tensor-dir)\n"
    )
    assert os.listdir(tmp_path / "pm") == ["sub"] and os.listdir(cwd) == []


def test_a_mount_point_is_refused_before_running(tiny: Path, small_disk: Path) -> None:
    code, stdout, stderr = trace_into(tiny, small_disk)
    assert (code, stdout, os.listdir(small_disk)) == (5, "", [])
    assert stderr == (
        f"error: cannot write a trace to {small_disk}: it is a mount point, and a trace directory is "
        "replaced whole (choose another --save-tensor-dir)\n"
    )


@pytest.mark.parametrize("under", ["afile/sub", "afile/sub/deeper"])
def test_a_directory_under_a_file_names_the_file(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, under: str
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("")
    assert trace_into(tiny, under) == (7, "", f"error: cannot create {under}: afile is not a directory\n")
    assert sorted(os.listdir(tmp_path)) == ["afile", "tiny.gguf"]
