"""The disk estimate: exact for the stage files the reference engine writes, and the refusals (exit 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apr.errors import PlanError
from apr.trace.estimate import MANIFEST_PER_FILE, parse_size
from apr.trace.plan import TracePlan
from apr.trace.prompt import Prompt
from apr.trace.run import TraceOptions, prepare_trace
from tests.fixtures.cli import run

IDS = "504,2365,6354,16438,27003,690,260"


@pytest.mark.parametrize(
    ("text", "size"),
    [("4GiB", 4 << 30), ("500M", 500 << 20), ("1.5g", 3 << 29), ("123", 123), ("none", None)],
)
def test_sizes(text: str, size: int | None) -> None:
    assert parse_size(text) == size


def test_a_size_that_is_not_one_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match=r"^--max-disk '4 parsecs' is not a size \(e\.g\. 4GiB, 500M"):
        parse_size("4 parsecs")


@pytest.mark.parametrize(("positions", "lm_head_all"), [("all", False), ("-2..", True)])
def test_the_estimate_is_what_the_stage_files_take(
    smollm2_gguf: Path, tmp_path: Path, positions: str, lm_head_all: bool
) -> None:
    out = tmp_path / "t"
    extra = ["--save-tensor-positions", positions] + ["--lm-head-all"] * lm_head_all
    args = [
        "trace",
        str(smollm2_gguf),
        "--tokens",
        IDS,
        "--save-tensor",
        "all",
        "--save-tensor-layers",
        "0..3",
    ]
    assert run(*args, "--save-tensor-dir", str(out), *extra)[0] == 0
    files = json.loads((out / "manifest.json").read_text())["files"]
    prepared = prepare_trace(smollm2_gguf, Prompt(token_ids=tuple(int(t) for t in IDS.split(","))))
    plan = TracePlan.from_cli("all", "0..3", positions)
    estimate = prepared.estimate_disk(plan, out, TraceOptions(lm_head_all=lm_head_all))
    assert estimate.bytes == sum(f["bytes"] for f in files) + MANIFEST_PER_FILE * len(files)


def test_over_max_disk_is_refused_before_running_in_one_line(smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    code, stdout, stderr = run(
        "trace", str(smollm2_gguf), "--save-tensor", "all", "--save-tensor-layers", "0..30",
        "--save-tensor-dir", str(out), "--max-disk", "1M",
    )  # fmt: skip
    assert code == 5 and "Disk:         ~" in stdout and "Wrote" not in stdout and not out.exists()
    assert stderr.count("\n") == 1 and stderr.startswith(f"error: the trace would write ~10.0 MiB to {out}, ")
    assert stderr.endswith(
        "more than --max-disk 1.0 MiB ("
        + stderr.split("(")[1].split(")")[0]
        + "); shrink it with --save-tensor-positions (e.g. -16..), --save-tensor-layers, --save-tensor, "
        "or lift the cap with --max-disk none\n"
    )
    args = ["trace", str(smollm2_gguf), "--save-tensor", "all", "--save-tensor-layers", "0..30"]
    assert run(*args, "--save-tensor-dir", str(out), "--max-disk", "none", "-q")[0] == 0
