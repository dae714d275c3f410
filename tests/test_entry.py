"""The console script's exit (`apr.entry.leave`): it skips the interpreter's teardown, but not what anyone
can see of an exit — the status, all of stdout and stderr, the atexit handlers and the threads that are
not daemons."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apr.entry import exit_status

# a child that leaves work for the exit: a non-daemon thread still writing, and an atexit handler
CHILD = """
import atexit, sys, threading, time
from pathlib import Path
from apr.entry import run
out = Path(sys.argv.pop(1))
def late():
    time.sleep(0.3)
    (out / "thread").write_text("done")
threading.Thread(target=late).start()
atexit.register(lambda: (out / "atexit").write_text("done"))
atexit.register(print, "bye")  # runs first (last in): its line sits in stdout's buffer until the flush
sys.argv = ["apr", *sys.argv[1:]]
run()
"""


def child(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered
    cmd = [sys.executable, "-c", CHILD, str(tmp_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)


def test_the_exit_keeps_status_output_threads_and_atexit_handlers(tmp_path: Path) -> None:
    done = child(tmp_path, "trace", "--help")
    assert done.returncode == 0, done.stderr
    # the whole help text arrives through the pipe (it sits in a block buffer until flushed)
    assert done.stdout.startswith("Usage: apr trace"), done.stdout[:200]
    assert "Example:" in done.stdout and len(done.stdout) > 4000, len(done.stdout)
    assert (tmp_path / "thread").read_text() == "done"  # the thread was waited for
    assert (tmp_path / "atexit").read_text() == "done"  # and the handlers ran
    assert done.stdout.endswith("\nbye\n"), done.stdout[-200:]  # what they wrote was flushed


def test_the_exit_keeps_an_error_status_and_message(tmp_path: Path) -> None:
    done = child(tmp_path, "trace", str(tmp_path / "missing.gguf"))
    assert done.returncode == 3, (done.returncode, done.stderr)
    assert done.stderr.strip() == f"error: File not found: {tmp_path / 'missing.gguf'}", done.stderr
    assert (tmp_path / "thread").is_file() and (tmp_path / "atexit").is_file()


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (5, 5), (True, 1), ("bad", 1)])
def test_exit_status_is_what_sys_exit_gives(
    code: object, status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_status(code) == status
    assert capsys.readouterr().err == ("bad\n" if code == "bad" else "")


def test_a_ctrl_c_while_the_exit_waits_is_one_line_and_130(tmp_path: Path) -> None:
    """The command is done (its output arrived), a thread still runs: SIGINT then ends the wait with
    `error: interrupted` and 130, as everywhere else in the CLI, not a traceback from threading."""
    code = "import sys, threading, time\nfrom apr.entry import run\n"
    code += "threading.Thread(target=time.sleep, args=(5,)).start()\nsys.argv = ['apr', '--version']\nrun()\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().startswith("apr, version")
    time.sleep(0.2)  # into the join (a signal before it ends the same way, after the 5 s thread)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, (proc.returncode, err)
    assert err == "error: interrupted\n", err
