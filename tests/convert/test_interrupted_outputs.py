"""A conversion interrupted while it writes its output (real processes): SIGINT or SIGTERM leave neither the
output nor its temporary file (one `error: interrupted` line, exit 130); what kill -9 leaves behind, the
next run into the same name removes; a second export into a folder being written is refused."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apr.atomicfile import DEAD_AFTER_S
from apr.dirswap import TMP_INFIX, lock_file
from tests.fixtures.cli import run

WAIT_S = 60.0  # for the temporary file to appear (the import of a 540 MB F32 GGUF takes seconds)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_an_import_interrupted_mid_write_leaves_nothing(
    smollm2_f32_gguf: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "out.apr"
    cmd = [sys.executable, "-m", "apr", "import", str(smollm2_f32_gguf), "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + WAIT_S
    while not list(tmp_path.glob(".out.apr.tmp-*")):
        assert proc.poll() is None, f"the import ended before writing: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "no temporary file appeared"
        time.sleep(0.005)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=WAIT_S)
    assert (proc.returncode, stderr) == (130, "error: interrupted\n")
    assert list(tmp_path.iterdir()) == []


def killed_mid_write(cmd: list[str], folder: Path, pattern: str) -> Path:
    """Run `cmd`, kill -9 it once `folder` holds a `pattern` temporary; return that leftover."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + WAIT_S
    while not (found := list(folder.glob(pattern))):
        assert proc.poll() is None, f"the run ended before writing: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "no temporary output appeared"
        time.sleep(0.005)
    proc.kill()
    proc.communicate(timeout=WAIT_S)
    assert proc.returncode == -signal.SIGKILL
    return found[0]


def test_the_import_after_a_killed_one_removes_its_leftover(
    smollm2_f32_gguf: Path, smollm2_gguf: Path, tmp_path: Path
) -> None:
    """kill -9 leaves the hidden temporary file (nothing can catch it); the next write of that name, once
    the leftover's lock is free and it is `DEAD_AFTER_S` old, removes it, and a live writer's stays."""
    out = tmp_path / "out.apr"
    cmd = [sys.executable, "-m", "apr", "import", str(smollm2_f32_gguf), "-o", str(out)]
    left = killed_mid_write(cmd, tmp_path, ".out.apr.tmp-*")
    assert sorted(tmp_path.iterdir()) == [left] and not out.exists()
    live = tmp_path / ".out.apr.tmp-live"  # as a running writer's: locked by an open descriptor
    live.write_bytes(b"being written")
    old = time.time() - 10 * DEAD_AFTER_S
    for p in (left, live):
        os.utime(p, (old, old))
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run("import", str(smollm2_gguf), "-o", str(out))
        assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.apr.tmp-live", "out.apr"]


def test_an_export_killed_mid_write_is_cleared_by_the_next(smollm2_f32_gguf: Path, tmp_path: Path) -> None:
    """The folder swap's temporary sibling left by kill -9 is removed by the next export into the folder
    (under the folder's lock, which the dead process no longer holds); the lock file goes with it."""
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "apr", "export", str(smollm2_f32_gguf), "-o", str(out)]
    left = killed_mid_write(cmd, tmp_path, f".hf{TMP_INFIX}*")
    assert left.is_dir() and not out.exists()
    code, _, err = run("export", str(smollm2_f32_gguf), "-o", str(out))
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json"}


def test_a_second_export_into_a_folder_being_written_is_refused(
    smollm2_f32_gguf: Path, tmp_path: Path
) -> None:
    out = tmp_path / "hf"
    lock = lock_file(out)  # held as a running export (or trace) into `out` holds it
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, stdout, err = run("export", str(smollm2_f32_gguf), "-o", str(out))
    assert (code, stdout) == (7, "")
    assert err == (
        f"error: another apr run is writing {out} (it holds {lock}); wait for it or choose another "
        "output folder\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == [lock.name]  # the holder's: no folder, no temporary
