"""A conversion interrupted while it writes its output file (SIGINT or SIGTERM, real processes) leaves
neither the output nor its temporary file: one `error: interrupted` line and exit 130."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
