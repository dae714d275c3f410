"""What every runtime oracle returns, and the plumbing they share.

A runtime (transformers, llama.cpp) runs one prefill forward pass over given token ids and calls
`tap(StageId, float32 array)` for every stage it can expose, in forward order, in apr's canonical shapes
(aprender spec §6): S tokens, D hidden, H heads, Hkv kv heads, Dh head_dim, I ffn, V vocab.

    embedding, attn_norm, post_attn_residual, ffn_norm, ffn_out, post_ffn_residual, final_norm   (S, D)
    qkv_matmul, qkv_bias      (S, H·Dh + 2·Hkv·Dh), per position [Q|K|V]
    q_post_rope (S, H·Dh)     k_post_rope (S, Hkv·Dh)     attention (S, H·Dh)     attn_out (S, D)
    attn_scores, attn_softmax (H, S, S), entries above the diagonal 0.0
    ffn_gate, ffn_up, ffn_silu, ffn_swigl (S, I)          lm_head (S, V), every position

What a runtime cannot expose is listed in `RuntimeRun.unavailable`, with the reason in `notes`; it is never
silently missing and never recomputed. Which model formats each runtime loads is the table `LOADS`; any other
is refused up front by `check_loadable` (a ValidationError saying how to get one it loads), never left to
the runtime's own loader. This module knows nothing of torch or ggml.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from apr.errors import InferenceError, ValidationError
from apr.formats.config import QKLayout
from apr.stages import DENSE_STAGES, Stage, StageId, Tap

ENGINE_TRANSFORMERS: Final = "transformers"
ENGINE_LLAMACPP: Final = "llama.cpp"

Array = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Loads:
    """The model formats (apr.formats names) a runtime loads, said for a user, and how to get one."""

    formats: tuple[str, ...]
    said: str  # "runs .gguf files only"
    hint: str  # a command making one, with {model} and {stem}


LOADS: Final[dict[str, Loads]] = {
    ENGINE_LLAMACPP: Loads(
        ("gguf",), "runs .gguf files only", "apr export {model} -o {stem}.gguf --format gguf"
    ),
    ENGINE_TRANSFORMERS: Loads(
        ("safetensors", "gguf"),
        "loads Hugging Face folders and .gguf files only",
        "apr export {model} -o {stem}-hf/",
    ),
}
FORMAT_NOUNS: Final = {"safetensors": "a Hugging Face safetensors folder", "apr": "an .apr file"}


def check_loadable(engine: str, path: Path, format_name: str) -> None:
    """Raise ValidationError when the runtime `engine` cannot load a `format_name` model (the reference
    engine, and a name not in `LOADS`, load everything apr reads). transformers loads an HF folder, not one
    .safetensors file of it: the folder is what it would load, whatever else the folder holds."""
    loads = LOADS.get(engine)
    if loads is None:
        return
    if format_name in loads.formats:
        if engine == ENGINE_TRANSFORMERS and format_name == "safetensors" and not path.is_dir():
            raise ValidationError(
                f"{path}: --engine {engine} loads a Hugging Face folder, not one .safetensors file of it; "
                f"give the folder {path.parent}"
            )
        return
    noun = FORMAT_NOUNS.get(format_name, f"a {format_name} model")
    stem = (path.resolve().name if path.is_dir() else path.stem) or "model"
    hint = loads.hint.format(model=path, stem=stem)
    raise ValidationError(
        f"{path}: --engine {engine} {loads.said}, and this is {noun}; make one with `{hint}`"
    )


@dataclass(frozen=True, slots=True)
class RuntimeRun:
    """How a runtime ran, next to the stages it tapped (the arrays themselves went to the tap)."""

    engine: str  # ENGINE_TRANSFORMERS | ENGINE_LLAMACPP
    engine_version: str  # "transformers 5.24.0 / torch 2.13.0+cpu", "llama-cpp-python 0.3.36 (ggml …)"
    token_ids: tuple[int, ...]
    qk_layout: QKLayout  # row order of the Q/K-derived stages as captured
    unavailable: tuple[Stage, ...]  # stages of this model the runtime cannot expose; reasons in notes
    notes: tuple[str, ...]
    settings: dict[str, str]


def model_stages(*, qkv_bias: bool) -> tuple[Stage, ...]:
    """The dense stages a LLaMA / Qwen2 / Qwen3 model has, in forward order (`qkv_bias` only with a bias)."""
    return tuple(s for s in DENSE_STAGES if qkv_bias or s is not Stage.QKV_BIAS)


def check_token_ids(token_ids: Sequence[int], n_vocab: int) -> tuple[int, ...]:
    """The ids as a tuple; raises ValidationError when empty or outside [0, n_vocab)."""
    ids = tuple(int(t) for t in token_ids)
    if not ids:
        raise ValidationError("no token ids to run")
    bad = [t for t in ids if not 0 <= t < n_vocab]
    if bad:
        raise ValidationError(f"token id {bad[0]} is outside the vocabulary (size {n_vocab})")
    return ids


class ForwardOrderTap:
    """Puts a runtime's captures into forward order before they reach the user's tap.

    Runtimes produce a layer's stages slightly out of order (V before the rope of K, gate before up, the
    fused [Q|K|V] only once V exists). This holds one layer at a time: when a stage of a later layer arrives,
    everything earlier is released sorted by `StageId.sort_key`; `close()` releases the rest.
    """

    def __init__(self, tap: Tap, engine: str) -> None:
        self._tap = tap
        self._engine = engine
        self._held: dict[StageId, Array] = {}
        self._seen: set[StageId] = set()

    @property
    def seen(self) -> frozenset[StageId]:
        return frozenset(self._seen)

    def __call__(self, sid: StageId, value: Array) -> None:
        if sid in self._seen:
            raise InferenceError(f"{self._engine} produced stage {sid} twice")
        self._seen.add(sid)
        self._release_before(sid.sort_key[0])
        self._held[sid] = value

    def close(self) -> None:
        self._release_before(None)

    def _release_before(self, layer_key: int | None) -> None:
        ready = sorted(
            (sid for sid in self._held if layer_key is None or sid.sort_key[0] < layer_key),
            key=lambda sid: sid.sort_key,
        )
        for sid in ready:
            self._tap(sid, self._held.pop(sid))


def missing_stages(
    expected: Sequence[Stage],
    seen: frozenset[StageId],
    n_layers: int,
    engine: str,
    *,
    partial_ok: bool = False,
) -> tuple[Stage, ...]:
    """Expected stages never tapped. A stage tapped at some layers but not all is a runtime bug (raise),
    unless `partial_ok`: an architecture without an apr family may really lack it in some layers (NoPE
    layers have no RoPE node); the trace then lists those layers' entries as not captured."""
    missing = []
    for stage in expected:
        if not stage.per_layer:
            layers: set[int | None] = {None}
        elif stage is Stage.EMBEDDING:
            layers = {0}
        else:
            layers = set(range(n_layers))
        got = {sid.layer for sid in seen if sid.stage is stage}
        if not got:
            missing.append(stage)
        elif got != layers and not partial_ok:
            lost = sorted(x for x in layers - got if x is not None)
            raise InferenceError(f"{engine} exposed {stage} for some layers but not for {lost}")
    return tuple(missing)
