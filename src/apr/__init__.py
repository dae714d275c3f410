"""apr — trace an LLM's forward pass stage by stage and find where two runs part ways.

Public API (the CLI is a thin layer over these):

    open_checkpoint(path) -> Checkpoint         GGUF, HF safetensors folder, or .apr; lazy
    TracePlan.from_cli(stages, layers)          which stages / layers to save
    read_trace(dir) -> Trace                    a trace directory (apr manifest or aprender layout)
    diff_stage_files(a, b) -> StageFileDiff     aprender's `apr diff --values` on two APRT files
    diff_traces(a, b, Tolerance) -> TraceDiff   every stage of two traces, first divergence
"""

from __future__ import annotations

from apr.diff.compare import (
    StageDiff,
    StageFileDiff,
    Tolerance,
    TraceDiff,
    diff_stage_files,
    diff_traces,
    first_divergence,
)
from apr.errors import AprError
from apr.formats import open_checkpoint
from apr.stages import STAGE_ORDER, Stage, StageId
from apr.trace.plan import TracePlan
from apr.trace.reader import Trace, read_trace
from apr.version import __version__

__all__ = [
    "STAGE_ORDER",
    "AprError",
    "Stage",
    "StageDiff",
    "StageFileDiff",
    "StageId",
    "Tolerance",
    "Trace",
    "TraceDiff",
    "TracePlan",
    "__version__",
    "diff_stage_files",
    "diff_traces",
    "first_divergence",
    "open_checkpoint",
    "read_trace",
]
