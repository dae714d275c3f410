"""Fault tests with real processes and real signals (what tests/trace/test_outdir.py does not cover already):

- SIGINT, SIGTERM and SIGKILL at seeded random points of `apr trace` (SmolLM2, every stage of every layer),
  into a fresh directory and into one that holds an earlier trace: the earlier trace stays byte-identical
  (every file compared), a fresh directory is not created, nothing is left that breaks the next run, and the
  next run succeeds and leaves no temp or lock file;
- two runs into one directory started together: exactly one succeeds, the other exits 7 with a one-line
  message about the lock, and the trace left verifies (`read_trace`: every file's size and sha256 against the
  manifest) and is the winner's;
- a disk that fills up during the run (a real tmpfs, filled by the test once the run is writing): exit 7 with
  one line, the earlier trace byte-identical, no partial output.

A point is "once the run has written layer k" (k seeded; the signal then lands a little later, wherever the
run is) or "as soon as the run holds the lock". A late signal may land after the new trace was swapped in
(signals are held during the swap itself, apr.trace.outdir) or after the run finished: then the new trace
must be whole and verify. SEED picks the points; a failure prints it.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from apr.trace.outdir import lock_path
from apr.trace.reader import read_trace
from tests.fixtures.disks import mounted_tmpfs

SEED = int(os.environ.get("APR_FAULT_SEED", "20261202"))
POINTS = 2  # per signal and directory kind
IDS = ",".join(str(100 + 37 * i % 4000) for i in range(16))
LAYERS = 30
INTERRUPTED = b"error: interrupted\n"


def trace_cmd(model: Path, out: Path, stages: str = "all", layers: str = f"0..{LAYERS}") -> list[str]:
    args = ["trace", str(model), "--tokens", IDS, "--save-tensor", stages, "--save-tensor-layers", layers]
    return [sys.executable, "-m", "apr", *args, "--save-tensor-dir", str(out), "-q"]


def contents(d: Path) -> dict[str, bytes]:
    """Every file under `d` (relative path → bytes)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def debris(out: Path) -> list[str]:
    """apr's temp directories and lock file next to `out`."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def wait_for(proc: subprocess.Popen[bytes], check: Callable[[], bool]) -> bool:
    """Poll `check()` until true; False if the process ended first."""
    deadline = time.monotonic() + 120
    while not check():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.002)
    return True


def holds_lock(pid: int, path: Path) -> bool:
    """Whether process `pid` holds a flock on `path` (/proc/locks: "1: FLOCK ADVISORY WRITE pid maj:min:ino
    ..."); a lock file a killed run left behind does not count."""
    try:
        ino = path.stat().st_ino
    except FileNotFoundError:
        return False
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) > 5 and f[1] == "FLOCK" and f[4] == str(pid) and f[5].endswith(f":{ino}"):
            return True
    return False


def interrupt(model: Path, out: Path, sig: signal.Signals, rng: random.Random) -> tuple[int, bytes, str]:
    """Start a full trace into `out`, send `sig` at a random point; (exit code, stderr, the point)."""
    left = set(out.parent.glob(f".{out.name}.apr-tmp-*"))  # a killed run's: not this run's progress
    proc = subprocess.Popen(trace_cmd(model, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    layer = rng.randrange(-1, LAYERS)
    point = f"layer {layer} written" if layer >= 0 else "lock taken"
    tmp = f".{out.name}.apr-tmp-*/layer-{layer}"
    if layer < 0:
        reached = wait_for(proc, lambda: holds_lock(proc.pid, lock_path(out)))
    else:
        reached = wait_for(proc, lambda: any(p.parent not in left for p in out.parent.glob(tmp)))
    time.sleep(rng.uniform(0, 0.03))
    if reached and proc.poll() is None:
        proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr, point


def check_interrupted(sig: signal.Signals, code: int, stderr: bytes, out: Path, where: str) -> None:
    """What a run cut short by `sig` must have left (the trace itself is checked by the caller)."""
    if sig is signal.SIGKILL:
        assert code == -9, where
        assert len(debris(out)) <= 2, (where, debris(out))  # at most its temp dir and lock file
    else:  # SIGINT, and SIGTERM once the run holds the directory: the same cleanup
        assert (code, stderr) == (130, INTERRUPTED), where
        assert debris(out) == [], (where, debris(out))


def check_complete(out: Path, layers: range, where: str, killed: bool = False) -> None:
    """`out` holds a whole trace of `layers` that verifies, and (unless the run was killed: then the next
    run clears it) nothing else of apr's is left."""
    trace = read_trace(out)  # every file's size and sha256 against the manifest
    assert trace.manifest is not None, where
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*.bin")}
    assert on_disk == {f.path for f in trace.manifest.files}, where  # no stray file, none missing
    assert {sid.layer for sid in trace.entries if sid.layer is not None} == set(layers), where
    assert killed or debris(out) == [], where


def signal_chains(model: Path, root: Path, old: Path, sig: signal.Signals) -> list[str]:
    """POINTS interrupted runs into a fresh directory, then into an existing trace, each chain followed by a
    run that must succeed. Returns what happened, for the failure message."""
    rng = random.Random(f"{SEED}-{sig.name}")
    log: list[str] = []
    fresh = root / f"fresh-{sig.name}"
    existing = root / f"old-{sig.name}"
    shutil.copytree(old, existing)
    before = contents(existing)
    for out, kind in ((fresh, "fresh"), (existing, "existing")):
        for i in range(POINTS):
            code, stderr, point = interrupt(model, out, sig, rng)
            where = f"{sig.name} {kind} #{i} at {point} (APR_FAULT_SEED={SEED}): {code} {stderr!r}"
            log.append(where)
            if code != 0:
                check_interrupted(sig, code, stderr, out, where)
            kept = not out.exists() if kind == "fresh" else contents(out) == before  # byte for byte
            if code == 0 or not kept:  # finished, or cut short only after the swap: the new trace, whole
                log[-1] += " - the new trace is in place"
                check_complete(out, range(LAYERS), where, killed=code == -9)
                if kind == "existing":
                    assert (out / "notes.txt").read_text() == "mine", where
                    shutil.rmtree(out)
                    shutil.copytree(old, out)
                else:
                    shutil.rmtree(out)
        done = subprocess.run(trace_cmd(model, out, "ffn_up", "0..2"), capture_output=True, check=False)
        assert (done.returncode, done.stderr) == (0, b""), (log, done.stderr)
        check_complete(out, range(2), str(log))  # the next run cleared whatever the killed ones left
        if kind == "existing":
            assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "keep.txt").exists()
    return log


@pytest.fixture(scope="module")
def old_trace(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An earlier trace (ffn_up of layers 0..3) with a note and a folder of the user's in it."""
    out = tmp_path_factory.mktemp("faults") / "old"
    done = subprocess.run(trace_cmd(smollm2_gguf, out, "ffn_up", "0..3"), capture_output=True, check=False)
    assert (done.returncode, done.stderr) == (0, b"")
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "keep.txt").write_text("also mine")
    return out


def test_signals_at_random_points_keep_the_previous_trace(
    smollm2_gguf: Path, old_trace: Path, tmp_path: Path
) -> None:
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
    with ThreadPoolExecutor(len(sigs)) as pool:  # one chain per signal, side by side
        runs = [pool.submit(signal_chains, smollm2_gguf, tmp_path, old_trace, s) for s in sigs]
        logs = [r.result() for r in runs]
    print("\n".join(line for log in logs for line in log))  # the points, shown with -s
    assert sum(len(log) for log in logs) == len(sigs) * 2 * POINTS


def test_two_runs_started_together_one_wins_the_other_is_refused(smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    ranges = ("0..10", "20..30")
    procs = [
        subprocess.Popen(
            trace_cmd(smollm2_gguf, out, "all", r), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for r in ranges
    ]
    results = [(p.wait(timeout=120), p.communicate()[1].decode()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 7], results  # exit 7: I/O error (the directory is locked)
    winner = ranges[[code for code, _ in results].index(0)]
    loser_stderr = next(err for code, err in results if code == 7)
    assert loser_stderr == (
        f"error: another apr run is writing {out} (it holds {lock_path(out)}); wait for it or choose another "
        "--save-tensor-dir\n"
    )
    lo, hi = (int(x) for x in winner.split(".."))
    check_complete(out, range(lo, hi), f"{winner} won")  # the winner's layers only, verified


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs: room for the whole trace (~25 MiB, so the run's free-space check passes) until the
    test fills it (the suite runs as root, as `make test` does here)."""
    with mounted_tmpfs(tmp_path / "disk", "64m") as mnt:
        yield mnt


def fill(disk: Path) -> Path:
    """Write a file until the filesystem is full; return it."""
    filler = disk / "filler"
    chunk = b"\0" * (1 << 20)
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    with filler.open("ab", buffering=0) as f, pytest.raises(OSError):
        f.write(chunk)
    return filler


def test_a_disk_that_fills_during_the_run(smollm2_gguf: Path, old_trace: Path, small_disk: Path) -> None:
    out = small_disk / "t"
    shutil.copytree(old_trace, out)
    before = contents(out)
    proc = subprocess.Popen(trace_cmd(smollm2_gguf, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for(proc, lambda: any(small_disk.glob(".t.apr-tmp-*/layer-1")))
    proc.send_signal(signal.SIGSTOP)  # filled while it waits, so the next write is the one that fails
    filler = fill(small_disk)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    text = stderr.decode()
    assert proc.returncode == 7, text  # exit 7: I/O error
    assert text.startswith(f"error: cannot write {out}/") and text.endswith(": No space left on device\n")
    assert text.count("\n") == 1
    assert contents(out) == before  # byte for byte
    assert sorted(os.listdir(small_disk)) == ["filler", "t"]  # no temp directory, no lock file
    filler.unlink()
    done = subprocess.run(trace_cmd(smollm2_gguf, out, "ffn_up", "0..2"), capture_output=True, check=False)
    assert (done.returncode, done.stderr) == (0, b"")
    check_complete(out, range(2), "after the disk was freed")
