"""Where stage files live in a trace directory (aprender's layout, spec §2.4).

<out>/layer-<N>/<stage>.bin     per-layer stages (decimal N, no padding; embedding is layer-0)
<out>/<stage>.bin               whole-model stages: final_norm.bin, lm_head.bin
<out>/manifest.json             apr's addition: run identity, shapes, labels, layouts (trace/manifest.py)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from apr.stages import Stage, StageId

SUFFIX: Final = ".bin"
LAYER_DIR: Final = "layer-{layer}"
MANIFEST_NAME: Final = "manifest.json"
_LAYER_DIR_RE: Final = re.compile(r"^layer-(0|[1-9][0-9]*)$")
# what only an unfinished apr run leaves: atomicfile's `.<name>.tmp-*`, lock files, and outdir.py's
# `.<name>.apr-tmp-*` run directory (a directory so named is itself a run being written)
_DEBRIS_RE: Final = re.compile(r"^\..+\.tmp-|\.lock$|\.apr-tmp-")


def relative_path(sid: StageId) -> Path:
    name = sid.stage.value + SUFFIX
    return Path(name) if sid.layer is None else Path(LAYER_DIR.format(layer=sid.layer)) / name


def default_output_dir(model_path: Path) -> Path:
    """`a/foo/bar.apr` → `a/foo/bar-trace`; `model.apr` → `./model-trace`; `a/no_ext` → `a/no_ext-trace`."""
    return model_path.parent / f"{model_path.stem or 'trace'}-trace"


def stage_id_for(rel: Path) -> StageId | None:
    """Inverse of `relative_path`: the StageId a file under a trace dir stands for, or None."""
    if rel.suffix != SUFFIX:
        return None
    try:
        stage = Stage(rel.stem)
    except ValueError:
        return None
    parts = rel.parts
    if len(parts) == 1 and not stage.per_layer:
        return StageId(stage)
    if len(parts) == 2 and stage.per_layer and (m := _LAYER_DIR_RE.match(parts[0])):
        return StageId(stage, int(m.group(1)))
    return None


def is_layer_dir(rel: Path) -> bool:
    """`layer-N` at the top of a trace directory: a stage folder (made by the writer when it has files)."""
    return len(rel.parts) == 1 and bool(_LAYER_DIR_RE.match(rel.name))


def stage_files(out_dir: Path) -> dict[StageId, Path]:
    """Every file in `out_dir` that the layout names as a stage file (no other globbing anywhere)."""
    found: dict[StageId, Path] = {}
    if not out_dir.is_dir():
        return found
    candidates = [p for p in out_dir.iterdir() if p.is_file()]
    for sub in out_dir.iterdir():
        if sub.is_dir() and _LAYER_DIR_RE.match(sub.name):
            candidates.extend(p for p in sub.iterdir() if p.is_file())
    for p in candidates:
        sid = stage_id_for(p.relative_to(out_dir))
        if sid is not None:
            found[sid] = p
    return dict(sorted(found.items(), key=lambda kv: kv[0].sort_key))


def debris(out_dir: Path) -> list[str]:
    """Names (relative, sorted) of apr temp/lock files in `out_dir` and its layer-N/ folders."""
    found = [out_dir.name] if _DEBRIS_RE.search(out_dir.name) else []
    for p in out_dir.iterdir():
        if _DEBRIS_RE.search(p.name):
            found.append(p.name)
        elif p.is_dir() and _LAYER_DIR_RE.match(p.name):
            found.extend(f"{p.name}/{q.name}" for q in p.iterdir() if _DEBRIS_RE.search(q.name))
    return sorted(found)
