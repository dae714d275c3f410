"""The mixture-of-experts row of the benchmark: a Qwen3-30B-A3B-shaped Q4_K_M GGUF, apr vs llama.cpp.

    .venv/bin/python bench/moe.py                  # write the 17 GiB file, measure, delete it
    .venv/bin/python bench/moe.py --layers 8       # the same shapes, fewer layers (a quick look)

The file (bench/synth.py preset 30b-a3b: 48 layers, 128 experts of width 768, 8 per token, hidden 2048) is
written to a temporary path next to the cache, read once so both engines find it in the page cache, traced
by `apr trace` with every stage of every layer and evaluated by llama.cpp on the same token ids, then
deleted — it is too big to keep. Targets: apr's peak RSS ≤ 2 GiB (only the experts some token selects are
dequantized: Weights.expert_linear) and wall time ≤ 1.5× llama.cpp's. A last row counts the experts some
token selects, from the trace's moe_router_indices: the experts apr reads (tests/models/test_moe.py checks
that a forward pass reads exactly those bytes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import run
import synth
from tests.fixtures import models

from apr.stages import Stage
from apr.trace.reader import Trace

RATIO_TARGET: Final = 1.5
FREE_MARGIN: Final = 4 << 30  # refuse to write the file unless this much more is free


def moe_rows(layers: int | None = None, seed: int = 0) -> tuple[list[run.Row], str]:
    """Write the file, measure both engines once, delete it; the rows and a note on the file."""
    shape = synth.QWEN3_30B_A3B if layers is None else replace(synth.QWEN3_30B_A3B, layers=layers)
    folder = models.cache_dir() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    need = synth.file_size(shape) + FREE_MARGIN
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SystemExit(
            f"bench: {folder} has {free / 2**30:.1f} GiB free, the MoE file needs {need / 2**30:.1f}"
        )
    path = folder / f"synth-30b-a3b-{shape.layers}l-s{seed}-tmp{os.getpid()}.gguf"
    try:
        run.status(f"writing the 30B-A3B-shaped model to {path} ({synth.file_size(shape) / 2**30:.1f} GiB)")
        start = time.perf_counter()
        synth.write_synthetic_gguf(path, shape, seed)
        note = (
            f"{path.stat().st_size / 2**30:.2f} GiB, written in {time.perf_counter() - start:.0f} s, deleted"
        )
        run.status("30B-A3B-shaped traces")
        label = f"30B-A3B-shaped MoE Q4_K_M ({shape.experts} experts, {shape.experts_used} active)"
        selected: list[int] = []
        rows = run.trace_rows(
            label, path, 1, True, RATIO_TARGET, lambda t: selected.extend(experts_selected(t))
        )
    finally:
        path.unlink(missing_ok=True)
    total, used = shape.layers * shape.experts, sum(selected)
    what = f"{label}: experts some token selects (the only ones apr reads)"
    rows.append(run.Row(what, "experts", f"{used} of {total}", "—", f"{used / total:.0%}"))
    return rows, f"30B-A3B-shaped model: {note}"


def experts_selected(trace: Trace) -> list[int]:
    """Per layer, how many distinct experts the trace's moe_router_indices name."""
    ids = sorted((s for s in trace.entries if s.stage is Stage.MOE_ROUTER_INDICES), key=lambda s: s.sort_key)
    return [len(np.unique(np.asarray(trace.load(s)))) for s in ids]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--layers", type=int, help="fewer layers than Qwen3-30B-A3B's 48")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows, note = moe_rows(args.layers, args.seed)
    print(note)
    print(run.render(rows))


if __name__ == "__main__":
    main()
