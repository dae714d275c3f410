"""What a command loads: a reference trace of a GGUF from token ids imports neither the other formats'
readers nor the runtimes' glue nor the ggml emulation (each costs start-up on every trace), and still
runs them when asked."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.fixtures.zoo import ZooModel

# modules a reference trace of a GGUF from token ids has no use for
NOT_LOADED = (
    "apr.formats.apr",
    "apr.formats.aprwrite",
    "apr.formats.safetensors",
    "apr.formats.tokenizer_pre",
    "apr.models.exchange",
    "apr.models.summary",
    "apr.quant.vecdot",
    "apr.quant.vecdot_lanes",
    "apr.report.payload",
    "apr.runtimes.llamacpp",
    "apr.runtimes.transformers",
    "ctypes.util",
    "difflib",
)

CHILD = """
import sys
from apr.entry import call
sys.argv = ["apr", "--quiet", "trace", *sys.argv[1:]]
status = call()
assert not status, status
print(",".join(sorted(sys.modules)))
"""


def loaded(*args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    return set(done.stdout.strip().splitlines()[-1].split(","))


def test_a_reference_trace_loads_only_what_it_runs(
    smollm2_gguf: Path, zoo: Callable[[str], ZooModel], tmp_path: Path
) -> None:
    common = ["--tokens", "1,2,3", "--save-tensor", "lm_head"]
    mods = loaded(str(smollm2_gguf), *common, "--save-tensor-dir", str(tmp_path / "ref"))
    assert {"apr.formats.gguf", "apr.engine.weights", "apr.trace.writer"} <= mods  # it did trace
    assert not mods & set(NOT_LOADED), sorted(mods & set(NOT_LOADED))
    assert (tmp_path / "ref" / "lm_head.bin").is_file()
    tiny = str(zoo("llama").gguf)
    ggml = loaded(tiny, *common, "--precision", "ggml", "--save-tensor-dir", str(tmp_path / "ggml"))
    assert {"apr.quant.vecdot", "apr.quant.vecdot_lanes"} <= ggml  # loaded when the mode needs them
    assert (tmp_path / "ggml" / "lm_head.bin").is_file()
