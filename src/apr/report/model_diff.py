"""Renders a ModelDiff (diff/models.py) as text and as the `--json` document; computes nothing."""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

from apr.diff.models import FieldDiff, ModelDiff, TensorDiff

SCHEMA: Final = "apr-model-diff-v1"
LISTED: Final = 8  # tensors named per kind of difference in text (all of them in JSON)


def _value(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _field_line(d: FieldDiff) -> str:
    note = f"   (storage only: {d.storage})" if d.storage else ""
    return f"  {d.name:<28} {_value(d.a):>14}  →  {_value(d.b)}{note}"


def _tensor_lines(tensors: list[TensorDiff]) -> list[str]:
    out = []
    for kind in ("missing", "extra", "shape", "type"):
        group = [t for t in tensors if t.kind == kind]
        if not group:
            continue
        if kind == "type":
            pairs = Counter((t.a.split()[0], t.b.split()[0]) for t in group)
            out.append(
                f"  type differs: {len(group)} tensors ("
                + ", ".join(f"{a} → {b} ×{n}" for (a, b), n in pairs.most_common())
                + ")"
            )
            continue
        label = {"missing": "only in A", "extra": "only in B", "shape": "shape differs"}[kind]
        out.append(f"  {label}: {len(group)} tensors")
        out += [f"    {t.name}: {t.a or '-'}  →  {t.b or '-'}" for t in group[:LISTED]]
        if len(group) > LISTED:
            out.append(f"    ... and {len(group) - LISTED} more")
    return out


def render_text(d: ModelDiff) -> str:
    out = [
        f"A: {d.a} ({d.formats[0]}, {d.architectures[0]}, {d.tensor_counts[0]} tensors)",
        f"B: {d.b} ({d.formats[1]}, {d.architectures[1]}, {d.tensor_counts[1]} tensors)",
        "config: " + ("identical" if not d.config else f"{len(d.config)} fields differ"),
    ]
    out += [_field_line(f) for f in d.config]
    t = d.tokenizer
    if t.a_size is None or t.b_size is None:
        out.append(f"tokenizer: {'A' if t.a_size is None else 'B'} has none")
    elif not t.differs:
        out.append(f"tokenizer: identical ({t.a_size} tokens, {t.merges[0]} merges)")
    else:
        out.append(f"tokenizer: {t.a_size} → {t.b_size} tokens, {t.merges[0]} → {t.merges[1]} merges")
        out += [_field_line(f) for f in t.fields]
        if t.first_token:
            i, a, b = t.first_token
            out.append(f"  first differing token: id {i}: {a!r} → {b!r}")
        if t.first_type:
            i, a, b = t.first_type
            out.append(f"  first differing token type: id {i}: {a} → {b}")
        if t.first_merge:
            i, a, b = t.first_merge
            out.append(f"  first differing merge: rank {i}: {a!r} → {b!r}")
    out.append("tensors: " + ("identical names, shapes and types" if not d.tensors else ""))
    out += _tensor_lines(d.tensors)
    verdict = "the models differ in what they compute" if d.differs else "no difference in the math"
    out.append(f"=> {verdict}" + ("" if d.differs or not d.tensors else " (types differ: precision only)"))
    return "\n".join(line.rstrip() for line in out) + "\n"


def _field_doc(f: FieldDiff) -> dict[str, Any]:
    return {"field": f.name, "a": f.a, "b": f.b, "storage_only": bool(f.storage), "why": f.storage or None}


def to_doc(d: ModelDiff) -> dict[str, Any]:
    t = d.tokenizer
    return {
        "schema": SCHEMA,
        "a": {"path": d.a, "format": d.formats[0], "architecture": d.architectures[0]},
        "b": {"path": d.b, "format": d.formats[1], "architecture": d.architectures[1]},
        "differs": d.differs,
        "config": [_field_doc(f) for f in d.config],
        "tokenizer": {
            "size": [t.a_size, t.b_size],
            "merges": list(t.merges),
            "fields": [_field_doc(f) for f in t.fields],
            "first_token": None
            if t.first_token is None
            else dict(zip(("id", "a", "b"), t.first_token, strict=True)),
            "first_type": None
            if t.first_type is None
            else dict(zip(("id", "a", "b"), t.first_type, strict=True)),
            "first_merge": None
            if t.first_merge is None
            else dict(zip(("rank", "a", "b"), t.first_merge, strict=True)),
        },
        "tensors": [{"name": x.name, "kind": x.kind, "a": x.a or None, "b": x.b or None} for x in d.tensors],
    }
