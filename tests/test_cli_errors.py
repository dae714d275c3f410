"""One error style for every command: click's usage errors and bad thresholds are one line and exit 2,
`--json` errors are also a JSON object on stdout, and the global flags work before or after the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import run

DIFF, BISECT, TRACE = "Try 'apr diff --help'.", "Try 'apr bisect --help'.", "Try 'apr trace --help'."


def invalid(option: str, why: str, hint: str = DIFF) -> str:
    return f"Invalid value for '{option}': {why}. {hint}"


def needs(flag: str, what: str) -> str:
    return f"{flag} applies to {what}. {TRACE}"


# `apr trace` flags that another mode would ignore: without --save-tensor; in the layer skeleton
SAVE_TENSOR_ONLY = [
    ["--save-tensor-dir", "t"],
    ["--save-tensor-layers", "0..2"],
    ["--save-tensor-mode", "stats"],
    ["--save-tensor-positions", "-1.."],
    ["--save-tensor-positions", "all"],
    ["--max-disk", "1G"],
]
FORWARD_ONLY = [
    ["--lm-head-all"],
    ["--progress"],
    ["--engine", "reference"],
    ["--precision", "f64"],
    ["--kv-type", "f16"],
    ["--prompt", "Hi"],
    ["--tokens", "1,2"],
    ["--chat"],
    ["--max-tokens", "9"],
]

USAGE = [
    (["diff", "a", "b", "--bogus"], f"No such option '--bogus'. {DIFF}"),
    (["diff", "a", "b", "--jsn"], f"No such option '--jsn'. Did you mean '--json'? {DIFF}"),
    (["diff", "a"], f"Missing argument 'B'. {DIFF}"),
    (["trace", "m.gguf", "--engine", "vllm"],
     invalid("--engine", "'vllm' is not one of 'reference', 'transformers', 'llama.cpp'",
             "Try 'apr trace --help'.")),
    (["bogus"], "No such command 'bogus'. Try 'apr --help'."),
    (["--bogus", "stages"], "No such option '--bogus'. Try 'apr --help'."),
    (["diff", "a", "b", "--min-cos", "1.5"], invalid("--min-cos", "1.5 is not in the range -1<=x<=1")),
    (["diff", "a", "b", "--min-cos", "-1.01"], invalid("--min-cos", "-1.01 is not in the range -1<=x<=1")),
    (["diff", "a", "b", "--min-cos", "nan"], invalid("--min-cos", "nan is not a finite number")),
    (["diff", "a", "b", "--min-cos", "abc"], invalid("--min-cos", "'abc' is not a valid float")),
    (["diff", "a", "b", "--max-rel", "-0.1"], invalid("--max-rel", "-0.1 is not in the range x>=0")),
    (["diff", "a", "b", "--max-rel", "NaN"], invalid("--max-rel", "NaN is not a finite number")),
    (["diff", "a", "b", "--max-rel", "inf"], invalid("--max-rel", "inf is not a finite number")),
    (["bisect", "a", "b", "--growth", "0"], invalid("--growth", "0.0 is not in the range x>0", BISECT)),
    (["bisect", "a", "b", "--growth", "nan"], invalid("--growth", "nan is not a finite number", BISECT)),
    (["bisect", "a", "b", "--floor", "-1e-9"], invalid("--floor", "-1e-09 is not in the range x>=0", BISECT)),
    (["bisect", "a", "b", "--floor", "nan"], invalid("--floor", "nan is not a finite number", BISECT)),
    *[(["trace", "m.gguf", *flag, *mode], needs(flag[0], "--save-tensor; give --save-tensor too"))
      for flag in SAVE_TENSOR_ONLY for mode in ([], ["--payload"])],
    *[(["trace", "m.gguf", *flag], needs(flag[0], "a forward pass; give --save-tensor or --payload too"))
      for flag in FORWARD_ONLY],
    (["trace", "m.gguf", "--save-tensor", "all", "--payload"],
     f"give one of --save-tensor, --payload (got both). {TRACE}"),
    (["trace", "m.gguf", "--payload", "--layer", "blk.1"],
     f"--layer filters the layer skeleton; it cannot take --save-tensor or --payload (the layers "
     f"--save-tensor saves: --save-tensor-layers). {TRACE}"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), USAGE)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    assert run(*args) == (2, "", f"error: {message}\n")


@pytest.mark.parametrize("stages", ["", " ", ","])
def test_an_empty_stage_list_is_refused_before_the_model_is_opened(stages: str) -> None:
    code, stdout, stderr = run("trace", "m.gguf", "--save-tensor", stages)
    assert (code, stdout) == (5, "") and stderr.startswith("error: save-tensor stage list invalid: ")


def test_a_bisect_report_it_cannot_write_is_refused_before_running(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    for report, why in (("afile/x.html", f"{tmp_path}/afile is not a directory"), ("adir", "Is a directory")):
        path = tmp_path / report
        code, stdout, stderr = run("bisect", "a", "b", "--report", str(path))  # a, b: never opened
        assert (code, stdout, stderr) == (7, "", f"error: cannot write {path}: {why}\n")
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile"] and os.listdir(tmp_path / "adir") == []


@pytest.mark.parametrize(
    "args",
    [
        ["diff", "a", "b", "--min-cos", "-1"],
        ["diff", "a", "b", "--min-cos", "1", "--max-rel", "0"],
        ["bisect", "a", "b", "--floor", "0", "--growth", "1e-9"],
    ],
)
def test_thresholds_on_the_boundary_are_accepted(args: list[str]) -> None:
    assert run(*args) == (3, "", "error: File not found: a\n")  # past the options, to the library


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["diff", "a"], 2, f"Missing argument 'B'. {DIFF}"),
        (["diff", "a", "b", "--max-rel", "-1"], 2, invalid("--max-rel", "-1.0 is not in the range x>=0")),
        (["diff", "a", "b", "--nope"], 2, f"No such option '--nope'. {DIFF}"),
        (["inspect", "missing.gguf"], 3, "File not found: missing.gguf"),
    ],
)  # fmt: skip
def test_json_errors_are_an_object_on_stdout_and_a_line_on_stderr(
    where: str, args: list[str], code: int, message: str
) -> None:
    argv = ["--json", *args] if where == "before" else [*args, "--json"]
    got, out, err = run(*argv)
    assert (got, json.loads(out), err) == (code, {"error": message, "exit_code": code}, f"error: {message}\n")


def test_global_flags_go_before_or_after_the_command() -> None:
    assert run("-q", "stages") == (0, "", "") == run("stages", "--quiet")
    before, after = run("--json", "stages"), run("stages", "--json")
    assert before == after and before[0] == 0 and "aliases" in json.loads(before[1])
    assert run("stages", "-q", "--json")[1] == before[1]  # --json output is never suppressed
    for argv in (["--debug", "inspect", "missing.gguf"], ["inspect", "missing.gguf", "--debug"]):
        code, out, err = run(*argv)
        assert (code, out) == (3, "") and err.startswith("Traceback (most recent call last):\n")
        assert err.endswith("\nerror: File not found: missing.gguf\n")


SIGINT_ON_IMPORT = """
import importlib.abc, os, signal, sys

class Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "apr.cli.tracing":  # a real SIGINT while the CLI's modules are being imported
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupt())
"""


@pytest.mark.parametrize("how", ["-m", "script"])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path: Path, how: str) -> None:
    """SIGINT delivered while `apr` is still importing its modules (before any command runs), through
    `python -m apr` and through the installed console script: `error: interrupted`, exit 130, no traceback."""
    (tmp_path / "sitecustomize.py").write_text(SIGINT_ON_IMPORT)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    exe = Path(sys.executable)
    cmd = [str(exe), "-m", "apr", "stages"] if how == "-m" else [str(exe.parent / "apr"), "stages"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout, p.stderr) == (130, "", "error: interrupted\n")
    (tmp_path / "sitecustomize.py").write_text("")  # the same command, not interrupted
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "embedding" in p.stdout, p.stderr
