"""The one exception hierarchy of apr, and the exit code each kind maps to.

The library raises these with the culprit in the message (path, tensor, offset, expected vs found); it never
prints and never exits. `cli.py` turns them into `error: <message>` on stderr and `exit_code`.

Exit codes (documented in README and `apr --help`; aprender's codes where it has one, spec §1.6):
    0 success / within tolerance      1 divergence found (`--check`, `bisect`)   2 usage error (bad flag)
    3 file not found                  4 invalid or unsupported file format       5 validation failed
    6 model load failed               7 I/O error                                8 inference failed
    9 feature not installed (an optional extra is missing)
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar, Final

from apr.version import __version__

WHEEL: Final = f"apr-{__version__}-py3-none-any.whl"  # what `python -m build` / `pip wheel .` names it


class ExitCode(IntEnum):
    OK = 0
    DIVERGED = 1
    USAGE = 2
    NOT_FOUND = 3
    INVALID_FORMAT = 4
    VALIDATION = 5
    MODEL_LOAD = 6
    IO = 7
    INFERENCE = 8
    FEATURE_DISABLED = 9


class AprError(Exception):
    """Root of every error apr raises on purpose."""

    exit_code: ClassVar[ExitCode] = ExitCode.VALIDATION


class NotFoundError(AprError):
    exit_code = ExitCode.NOT_FOUND


class FormatError(AprError):
    """A file is not what it claims to be: bad magic, truncated, corrupt, or a layout we refuse."""

    exit_code = ExitCode.INVALID_FORMAT


class TraceFormatError(FormatError):
    """A stage tensor file (APRT) or trace manifest is malformed."""


class UnsupportedQuantError(FormatError):
    """A tensor's quantization type has no dequantizer here."""


class ValidationError(AprError):
    exit_code = ExitCode.VALIDATION


class StageParseError(ValidationError):
    """A `--save-tensor` stage list is malformed."""


class PlanError(ValidationError):
    """A save-tensor plan is malformed or does not fit the model."""


class MismatchError(ValidationError):
    """Two things to compare cannot be aligned (sizes, layers, layouts, tokenizers)."""


class ModelLoadError(AprError):
    exit_code = ExitCode.MODEL_LOAD


class AprIOError(AprError):
    exit_code = ExitCode.IO


class InferenceError(AprError):
    exit_code = ExitCode.INFERENCE


class FeatureDisabledError(AprError):
    """An optional extra (transformers, llama.cpp) is not installed.

    apr is not on PyPI, so the hint says what to run from a checkout and from a wheel.
    """

    exit_code = ExitCode.FEATURE_DISABLED

    def __init__(self, what: str, extra: str) -> None:
        super().__init__(
            f"{what} needs the optional extra [{extra}]: from a checkout, pip install -e '.[{extra}]' "
            f"(make dev installs every extra); from a wheel, pip install '{WHEEL}[{extra}]'"
        )
        self.extra = extra
