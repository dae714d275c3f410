"""JSON renderings of diff results (pure; non-finite floats become null, as serde_json writes them)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

from apr.report import routing
from apr.report.numfmt import json_float

if TYPE_CHECKING:  # annotations only: `apr trace` need not import the converters and the differ
    from apr.convert.export import ExportResult
    from apr.convert.gguf_export import GgufExportResult
    from apr.convert.importer import ImportResult
    from apr.diff.compare import StageDiff, StageFileDiff, TraceDiff
    from apr.trace.run import TraceOutcome

STAGE_DIFF_SCHEMA: Final = "apr-stage-diff-v1"
TRACE_DIFF_SCHEMA: Final = "apr-trace-diff-v1"


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def stage_file_diff_doc(d: StageFileDiff) -> dict[str, Any]:
    """Exactly aprender's keys (spec §4.4)."""
    m = d.metrics
    return {
        "schema": STAGE_DIFF_SCHEMA,
        "path_a": str(d.path_a),
        "path_b": str(d.path_b),
        "layer": "whole-model" if d.layer is None else d.layer,
        "dim_product": m.n,
        "max_abs_diff": json_float(m.max_abs),
        "max_abs_diff_index": m.max_index,
        "rms_diff": json_float(m.rms),
        "cosine_sim": json_float(m.cosine),
        "top_diffs": [
            {
                "index": t.index,
                "a": json_float(t.a),
                "b": json_float(t.b),
                "abs_diff": json_float(t.abs_diff),
            }
            for t in d.top
        ],
    }


def stage_diff_doc(r: StageDiff) -> dict[str, Any]:
    m = r.metrics
    return {
        "id": str(r.sid),
        "layer": r.sid.layer,
        "stage": r.sid.stage.value,
        "elements": m.n,
        "shape": list(r.shape) if r.shape is not None else None,
        "max_abs_diff": json_float(m.max_abs),
        "max_abs_diff_index": m.max_index,
        "worst": {
            "coords": r.worst_coords,
            "a": json_float(m.a_at_max),
            "b": json_float(m.b_at_max),
        },
        "rms_diff": json_float(m.rms),
        "cosine": json_float(m.cosine),
        "rel_l2": json_float(m.rel_l2),
        "sqnr_db": json_float(m.sqnr_db),
        "nan_count": m.nan_count,
        "identical": m.max_abs == 0.0 and m.nan_count == 0,
        "diverged": not r.passed,
    }


def trace_diff_doc(d: TraceDiff) -> dict[str, Any]:
    first = d.first_divergence
    return {
        "schema": TRACE_DIFF_SCHEMA,
        "path_a": str(d.path_a),
        "path_b": str(d.path_b),
        "rule": {"min_cos": d.tolerance.min_cos, "max_rel": d.tolerance.max_rel},
        "compared": len(d.rows),
        "diverged": len(d.diverged),
        "first_divergence": stage_diff_doc(first) if first is not None else None,
        "routing": routing.to_doc(d.routing),
        "stages": [stage_diff_doc(r) for r in d.rows],
        "only_in_a": [str(s) for s in d.only_in_a],
        "only_in_b": [str(s) for s in d.only_in_b],
        "only_in": [
            {"side": g.side, "stage": g.stage.value, "layers": list(g.layers), "reason": g.reason}
            for g in d.only_in()
        ],
        "notes": list(d.notes),
    }


def trace_outcome_doc(o: TraceOutcome) -> dict[str, Any]:
    r = o.result
    return {
        "schema": "apr-trace-run-v1",
        "model": o.run.model_path,
        "format": o.run.model_format,
        "engine": o.run.engine,
        "precision": o.run.precision,
        "prompt": o.run.prompt,
        "token_ids": list(o.run.token_ids),
        "out_dir": str(r.out_dir),
        "files": [
            {"path": str(f.path), "stage": f.sid.stage.value, "layer": f.sid.layer, "bytes": f.bytes}
            for f in r.files
        ],
        "removed_stale": [str(p) for p in r.removed_stale],
        "not_captured": [{"stage": s, "reason": why} for s, why in r.not_captured],
        "manifest": str(r.manifest_path) if r.manifest_path else None,
        "stats": None
        if r.stats is None
        else {
            "path": str(r.stats.path),
            "stages": r.stats.stages,
            "records": r.stats.records,
            "bytes": r.stats.bytes,
        },
    }


def import_doc(r: ImportResult) -> dict[str, Any]:
    return {
        "schema": "apr-import-v1",
        "output": str(r.out),
        "tensors": r.tensors,
        "passthrough": r.passthrough,
        "converted": [{"name": n, "from": a, "to": b} for n, a, b in r.converted],
        "tied_lm_head": r.tied_lm_head,
        "quantize": None
        if r.wanted is None
        else {"type": r.wanted, "matrices": [{"name": n, "cols": c, "type": t} for n, c, t in r.matrices]},
    }


def export_doc(r: ExportResult) -> dict[str, Any]:
    return {
        "schema": "apr-export-v1",
        "output": str(r.out_dir),
        "files": [str(f) for f in r.files],
        "tensors": r.tensors,
        "qk_permuted": r.permuted,
        "notes": r.notes,
    }


def gguf_export_doc(r: GgufExportResult) -> dict[str, Any]:
    return {
        "schema": "apr-export-gguf-v1",
        "output": str(r.out),
        "architecture": r.architecture,
        "tensors": r.tensors,
        "types": r.types,
        "copied": r.copied,
        "fallback": [{"name": n, "wanted": a, "written": b} for n, a, b in r.fallback],
        "qk_permuted": r.permuted,
        "notes": r.notes,
    }
