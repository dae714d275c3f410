"""What a trace will write, before it runs: bytes per stage file from the stage graph's dimension labels and
the config, against the free space of the output filesystem and the `--max-disk` cap.

The estimate is exact for the reference engine's files (a 12-byte APRT header + 4 bytes a value) plus a
manifest allowance per file; a runtime that lacks a stage writes less.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from apr.errors import PlanError, ValidationError
from apr.models.config import ModelConfig
from apr.models.registry import stage_dims
from apr.stages import Stage
from apr.trace import format as aprt
from apr.trace.plan import TracePlan
from apr.trace.writer import expected_ids

DEFAULT_MAX_DISK: Final = 4 << 30
MANIFEST_PER_FILE: Final = 400  # bytes of manifest.json per file entry (path, shape, dims, sha256)
_SIZE_RE: Final = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
SHRINK_FLAGS: Final = "--save-tensor-positions (e.g. -16..), --save-tensor-layers, --save-tensor"


def parse_size(text: str) -> int | None:
    """`--max-disk`: `4GiB`, `500M`, `1.5g`, `123456` (bytes; k/M/G/T are powers of 1024), or `none`."""
    if text.strip().lower() == "none":
        return None
    m = _SIZE_RE.match(text)
    if not m:
        raise PlanError(f"--max-disk {text!r} is not a size (e.g. 4GiB, 500M, 123456 bytes) or none")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human(n: int) -> str:
    """1536 → "1.5 KiB"; below 1 KiB, exact bytes."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def stage_shape(
    stage: Stage, cfg: ModelConfig, n_tokens: int, rows: int, lm_head_all: bool
) -> tuple[int, ...]:
    """The shape the writer saves `stage` with: `rows` kept positions of an `n_tokens` prompt."""
    if stage is Stage.LM_HEAD and not lm_head_all:
        return (cfg.vocab_size,)
    sizes = {
        "seq": rows,
        "query": rows,
        "key": n_tokens,
        "hidden": cfg.hidden_size,
        "q|k|v": cfg.q_dim + 2 * cfg.kv_dim,
        "head*head_dim": cfg.n_heads * cfg.head_dim,
        "kv_head*head_dim": cfg.n_kv_heads * cfg.head_dim,
        "head": cfg.n_heads,
        "ffn": cfg.intermediate_size or cfg.expert_ffn,
        "expert": cfg.n_experts,
        "k": cfg.n_experts_used,
        "vocab": cfg.vocab_size,
    }
    return tuple(sizes.get(label, cfg.hidden_size) for label in stage_dims()[stage])


@dataclass(frozen=True, slots=True)
class DiskEstimate:
    bytes: int
    free: int
    limit: int | None  # --max-disk; None: no cap
    out_dir: Path

    def check(self) -> None:
        """Raise ValidationError (exit 5), one line: estimate, free space, the flags that shrink it."""
        over_free = self.bytes > self.free
        if not over_free and (self.limit is None or self.bytes <= self.limit):
            return
        if over_free:
            why = f"more than the {human(self.free)} free on its filesystem"
        else:
            why = f"more than --max-disk {human(self.limit or 0)} ({human(self.free)} free)"
        lift = "" if over_free else ", or lift the cap with --max-disk none"
        raise ValidationError(
            f"the trace would write ~{human(self.bytes)} to {self.out_dir}, {why}; shrink it with "
            f"{SHRINK_FLAGS}{lift}"
        )


def estimate_disk(
    plan: TracePlan,
    cfg: ModelConfig,
    model_stages: Collection[Stage],
    n_tokens: int,
    out_dir: Path,
    *,
    lm_head_all: bool = False,
    limit: int | None = None,
) -> DiskEstimate:
    """What `plan` writes for an `n_tokens` prompt, and the free space where `out_dir` will be."""
    rows = n_tokens if plan.positions.every else len(plan.positions.select(n_tokens))
    total = 0
    for sid in expected_ids(plan, cfg.n_layers):
        if sid.stage in model_stages:
            shape = stage_shape(sid.stage, cfg, n_tokens, rows, lm_head_all)
            if plan.mode == "stats":  # one 96-byte record per position (apr.trace.stats)
                total += 96 * (rows if len(shape) > 1 else 1) + MANIFEST_PER_FILE
                continue
            total += aprt.HEADER_SIZE + 4 * math.prod(shape) + MANIFEST_PER_FILE
    where = out_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    return DiskEstimate(total, shutil.disk_usage(where).free, limit, out_dir)
