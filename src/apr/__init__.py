"""apr — trace an LLM's forward pass stage by stage and find where two runs part ways.

Public API (the CLI is a thin layer over these):

    open_checkpoint(path) -> Checkpoint         GGUF, HF safetensors folder, or .apr; lazy
    TracePlan.from_cli(stages, layers)          which stages / layers to save
    read_trace(dir) -> Trace                    a trace directory (apr manifest or aprender layout)
    diff_stage_files(a, b) -> StageFileDiff     aprender's `apr diff --values` on two APRT files
    diff_traces(a, b, Tolerance) -> TraceDiff   every stage of two traces, first divergence

The names are imported on first use (PEP 562), so `import apr` (and the CLI's start-up) does not pay for
the modules a command does not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from apr.lazy import lazy_getattr
from apr.version import __version__

if TYPE_CHECKING:
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

_HOME: Final = {
    "StageDiff": "apr.diff.compare",
    "StageFileDiff": "apr.diff.compare",
    "Tolerance": "apr.diff.compare",
    "TraceDiff": "apr.diff.compare",
    "diff_stage_files": "apr.diff.compare",
    "diff_traces": "apr.diff.compare",
    "first_divergence": "apr.diff.compare",
    "AprError": "apr.errors",
    "open_checkpoint": "apr.formats",
    "STAGE_ORDER": "apr.stages",
    "Stage": "apr.stages",
    "StageId": "apr.stages",
    "TracePlan": "apr.trace.plan",
    "Trace": "apr.trace.reader",
    "read_trace": "apr.trace.reader",
}

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
assert set(__all__) == {*_HOME, "__version__"}


__getattr__ = lazy_getattr("apr", _HOME, globals())


def __dir__() -> list[str]:
    return __all__
