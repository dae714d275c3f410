"""The save-tensor plan: which stages, which layers. Parsed once, before any model is opened.

Parsing follows aprender's `SaveTensorPlan::from_cli` exactly (spec §2.2–2.3): `all` (any case) or a comma
list (trimmed, case-insensitive, order and duplicates kept, empty token and unknown name are errors), and a
half-open `START..END` layer range of u32 with END > START. Whole-model stages ignore the range, and
`embedding` (emitted as layer 0) is saved only when 0 is in the range. apr adds the prompt positions to keep
(`Positions`, default all), `all` as a layer range (every layer of the model, resolved by `for_model`), and
the save mode: `full` (APRT stage files, aprender's) or `stats` (per-position statistics, apr.trace.stats).
It departs from aprender in one place: an empty or blank stage list, aprender's plan that saves nothing, is
an error, as an empty token is (`--save-tensor ""` is a mistake, not a request for a trace of nothing).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Final

from apr.errors import PlanError, StageParseError
from apr.stages import DENSE_STAGES, STAGE_ORDER, Stage, StageId, parse_stage
from apr.trace.stats import MODES as SAVE_MODES

DEFAULT_LAYERS: Final = "0..1"
U32_MAX: Final = 0xFFFFFFFF
ALL_LAYERS: Final = range(0, U32_MAX)  # `--save-tensor-layers all`: every layer the model has
_U32_RE: Final = re.compile(r"^\+?[0-9]+$")  # Rust's u32::from_str: optional '+', ASCII digits


def parse_stage_list(text: str) -> tuple[Stage, ...]:
    """`"embedding, ATTN_norm,embedding"` → (EMBEDDING, ATTN_NORM, EMBEDDING); `""` → ()."""
    text = text.strip()
    if not text:
        return ()
    return tuple(parse_stage(token) for token in text.split(","))


def _parse_u32(name: str, text: str, got: str) -> int:
    text = text.strip()
    if not _U32_RE.match(text) or int(text) > U32_MAX:
        raise _range_error(got, f'{name} "{text}" is not a valid u32')
    return int(text)


def _range_error(got: str, reason: str) -> PlanError:
    return PlanError(f"save-tensor layer range invalid ({json.dumps(got)}): {reason}")


def parse_layer_range(text: str) -> range:
    """`"3..7"` → range(3, 7). Only `START..END`, END exclusive and > START, or `all` (ALL_LAYERS)."""
    if text.strip().lower() == "all":
        return ALL_LAYERS
    got = text
    start_s, sep, end_s = text.strip().partition("..")
    if not sep:
        raise _range_error(got, "expected `START..END`")
    start = _parse_u32("START", start_s, got)
    end = _parse_u32("END", end_s, got)
    if end <= start:
        raise _range_error(got, f"END ({end}) must be > START ({start})")
    return range(start, end)


_POS_RE: Final = re.compile(r"^\s*([+-]?[0-9]+)?\s*\.\.\s*([+-]?[0-9]+)?\s*$")


@dataclass(frozen=True, slots=True)
class Positions:
    """`--save-tensor-positions START..END`: the prompt positions per-position stages keep. END exclusive,
    negative values count from the end, either side may be omitted (`-16..` is the last 16); `last` is
    `-1..`, `all` (the default, as aprender) is `..`. Python slice semantics, resolved per prompt."""

    start: int | None = None
    end: int | None = None
    text: str = field(default="", compare=False)  # as the user wrote it ("0..-0" is 0..0): for messages

    @classmethod
    def parse(cls, text: str) -> Positions:
        """`"-16.."` → Positions(-16, None); `"last"` → Positions(-1, None); `"all"` → Positions()."""
        word = text.strip().lower()
        if word in ("all", "last"):
            return cls(text=word) if word == "all" else cls(-1, text=word)
        m = _POS_RE.match(text)
        if not m:
            raise PlanError(
                f"save-tensor positions invalid ({json.dumps(text)}): expected START..END (END exclusive, "
                "negative from the end, either side optional: 0..8, -16.., ..4), last or all"
            )
        start, end = (None if g is None else int(g) for g in m.groups())
        return cls(start, end, text.strip())

    @property
    def every(self) -> bool:
        return self.start in (None, 0) and self.end is None

    def select(self, n_tokens: int) -> range:
        """The positions of an `n_tokens` prompt, in order. Raises PlanError when none is left."""
        rows = range(n_tokens)[self.start : self.end]
        if not rows:
            raise PlanError(
                f"--save-tensor-positions {self} selects no position of the {n_tokens}-token prompt"
            )
        return rows

    def __str__(self) -> str:
        if self.text:
            return self.text
        return "".join(
            ("" if self.start is None else str(self.start), "..", "" if self.end is None else str(self.end))
        )


@dataclass(frozen=True, slots=True)
class TracePlan:
    """What to save. `all_stages` remembers that the user said `all` (so a dense model saves dense stages)."""

    stages: tuple[Stage, ...]
    layers: range = range(0, 1)
    all_stages: bool = False
    positions: Positions = Positions()
    mode: str = "full"  # SAVE_MODES: APRT stage files, or one statistics file (apr.trace.stats)

    @classmethod
    def from_cli(
        cls, stages: str, layers: str = DEFAULT_LAYERS, positions: str = "all", mode: str = "full"
    ) -> TracePlan:
        """Parse `--save-tensor`, `--save-tensor-layers`, `--save-tensor-positions` and the save mode.

        >>> TracePlan.from_cli("embedding,lm_head", "0..2").layers
        range(0, 2)
        """
        if not stages.strip():  # aprender's empty plan, a run that saves nothing: see the module docstring
            raise StageParseError(
                "save-tensor stage list invalid: no stage given (comma-separated stage names, see "
                "`apr stages`, or all)"
            )
        if stages.strip().lower() == "all":
            parsed, all_stages = STAGE_ORDER, True
        else:
            try:
                parsed, all_stages = parse_stage_list(stages), False
            except StageParseError as e:
                raise StageParseError(f"save-tensor stage list invalid: {e}") from None
        if mode not in SAVE_MODES:
            raise PlanError(f"save-tensor mode {mode!r} is not one of {', '.join(SAVE_MODES)}")
        return cls(parsed, parse_layer_range(layers), all_stages, Positions.parse(positions), mode)

    def should_save(self, sid: StageId) -> bool:
        """aprender's `should_save`: selected, and per-layer stages only inside the range."""
        if sid.stage not in self.stages:
            return False
        return not sid.stage.per_layer or (sid.layer is not None and sid.layer in self.layers)

    def for_model(self, n_layers: int, model_stages: Collection[Stage] = DENSE_STAGES) -> TracePlan:
        """Check the plan against a model (its family's stages) and drop what `all` selected but it lacks.

        Raises PlanError for a MoE stage named on a dense model (qkv_bias on a bias-free one), or a layer
        range beyond the model. Other named stages the model lacks stay in the plan: the writer lists them as
        not captured, with why.
        """
        moe = any(s.moe for s in model_stages)
        if self.layers == ALL_LAYERS:
            return replace(self, layers=range(0, n_layers)).for_model(n_layers, model_stages)
        if self.layers.stop > n_layers and any(s.per_layer for s in self.stages):
            raise PlanError(
                f"layer range {self.layers.start}..{self.layers.stop} is outside the model's "
                f"{n_layers} layers (valid: 0..{n_layers})"
            )
        if self.all_stages:
            # the model's stages, and aprender's dense ones it lacks (listed as not captured, with why)
            keep = set(model_stages) | set(DENSE_STAGES)
            return replace(self, stages=tuple(s for s in STAGE_ORDER if s in keep))
        named_moe = [s.value for s in self.stages if s.moe]
        if named_moe and not moe:
            raise PlanError(
                f"stage {named_moe[0]} exists only in mixture-of-experts models; this model is dense"
            )
        if Stage.QKV_BIAS in self.stages and Stage.QKV_BIAS not in model_stages:  # named, as a MoE stage
            raise PlanError("stage qkv_bias exists only in models with a q/k/v bias; this model has none")
        return self

    def unique_stages(self) -> tuple[Stage, ...]:
        """The selected stages once each, in forward order."""
        return tuple(s for s in STAGE_ORDER if s in self.stages)
