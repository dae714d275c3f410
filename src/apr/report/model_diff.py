"""Renders a ModelDiff (diff/models.py) as text and as the `--json` document; computes nothing."""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

from apr.diff.models import FieldDiff, ModelDiff, TensorDiff, TokenizerDiff
from apr.diff.tensor_data import DataCheck, DataDiff
from apr.formats.tokenizer_probe import ProbeCheck, ProbeDiff
from apr.report.numfmt import json_float, short

SCHEMA: Final = "apr-model-diff-v1"
LISTED: Final = 8  # tensors named per kind of difference in text (all of them in JSON)
# tensor differences of these kinds (apr.diff.models) are the same math stored differently
STORAGE_NOTES: Final = {"tied": "tied embeddings, one side stores them", "stored": "the rope_scaling above"}
IDS_SHOWN: Final = 6  # ids of each side shown from the first differing position of a probe
VERDICT_TEXT: Final = {
    "differ": "the models differ in what they compute",
    "same": "no difference in the math",
    "unverified": "no difference found in what was compared",
}


def _value(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _field_line(d: FieldDiff) -> str:
    note = f"   (storage only: {d.storage})" if d.storage else ""
    return f"  {d.name:<28} {_value(d.a):>14}  →  {_value(d.b)}{note}"


TENSOR_KINDS: Final = ("missing", "extra", "shape", "type", "tied", "stored")
KIND_LABELS: Final = {"missing": "only in A", "extra": "only in B", "shape": "shape differs"}


def tensor_summary(tensors: list[TensorDiff]) -> list[tuple[str, list[TensorDiff]]]:
    """One headline per kind of tensor difference present, with the tensors it covers (the HTML report's
    lines; the text report lists names under some)."""
    out: list[tuple[str, list[TensorDiff]]] = []
    for kind in TENSOR_KINDS:
        group = [t for t in tensors if t.kind == kind]
        if not group:
            continue
        if kind in STORAGE_NOTES:
            out += [
                (f"{t.name}: {t.a or '-'}  →  {t.b or '-'}   (storage only: {STORAGE_NOTES[kind]})", [t])
                for t in group
            ]
        elif kind == "type":
            pairs = Counter((t.a.split()[0], t.b.split()[0]) for t in group)
            shown = ", ".join(f"{a} → {b} ×{n}" for (a, b), n in pairs.most_common())
            out.append((f"type differs: {len(group)} tensors ({shown})", group))
        else:
            out.append((f"{KIND_LABELS[kind]}: {len(group)} tensors", group))
    return out


def _tensor_lines(tensors: list[TensorDiff]) -> list[str]:
    out = []
    for line, group in tensor_summary(tensors):
        out.append(f"  {line}")
        if group[0].kind in KIND_LABELS:
            out += [f"    {t.name}: {t.a or '-'}  →  {t.b or '-'}" for t in group[:LISTED]]
            if len(group) > LISTED:
                out.append(f"    ... and {len(group) - LISTED} more")
    return out


def _pair(a: int, b: int, what: str) -> str:
    return f"{a} {what}" if a == b else f"{a} → {b} {what}"


def _tokenizer_lines(t: TokenizerDiff) -> list[str]:
    if t.a_size is None and t.b_size is None:
        return ["tokenizer: neither side has one"]
    if t.a_size is None or t.b_size is None:
        return [f"tokenizer: {'A' if t.a_size is None else 'B'} has none"]
    sizes = f"{_pair(t.a_size, t.b_size, 'tokens')}, {_pair(t.merges[0], t.merges[1], 'merges')}"
    probes = t.probes
    if not t.differs and t.verified:
        encoded = f"; {probes.compared} probe texts encode alike" if probes else ""
        return [f"tokenizer: identical ({sizes}{encoded})"]
    head = "differs" if t.differs else "same vocabulary, encoding not compared"
    out = [f"tokenizer: {head} ({sizes})"]
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
    return out + ([] if probes is None else _probe_lines(probes))


def _probe_lines(p: ProbeCheck) -> list[str]:
    out = []
    if p.differ:
        first = p.differ[0]
        out.append(
            f"  encodes the {first.name!r} probe {_short_text(first.text)} differently at position "
            f"{first.position}: A {_ids_at(first.a_ids, first)} → B {_ids_at(first.b_ids, first)}"
        )
        if len(p.differ) > 1:
            out.append("  also encoded differently: " + ", ".join(repr(x.name) for x in p.differ[1:]))
    return out + [f"  not compared: {problem}" for problem in p.problems]


def _short_text(text: str, n: int = 32) -> str:
    return repr(text if len(text) <= n else text[:n] + "…")


def _ids_at(ids: tuple[int, ...], d: ProbeDiff) -> str:
    shown = list(ids[d.position : d.position + IDS_SHOWN])
    return (
        ("[…, " if d.position else "[")
        + ", ".join(map(str, shown))
        + (", …]" if d.position + IDS_SHOWN < len(ids) else "]")
    )


def _data_lines(c: DataCheck) -> list[str]:
    parts = []
    if c.compared or not c.skipped:
        state = "identical" if not c.differ else f"{len(c.differ)} differ{'s' * (len(c.differ) == 1)}"
        parts.append(f"{c.compared} tensors compared, {state}")
    parts += [f"{n} not compared: {why}" for why, n in Counter(why for _, why in c.skipped).items()]
    out = ["tensor data: " + "; ".join(parts)]
    out += [f"    {x.name}: {_data_difference(x)}" for x in c.differ[:LISTED]]
    if len(c.differ) > LISTED:
        out.append(f"    ... and {len(c.differ) - LISTED} more")
    return out


def _data_difference(x: DataDiff) -> str:
    how = "values differ" if x.how == "values" else "bytes differ"
    if x.max_abs is None:
        return f"{how} (values not read)"
    if x.max_abs == 0.0:
        return f"{how}, values equal (+0/−0 or NaN payloads: the same math)"
    return f"{how}, max |a − b| {short(x.max_abs)}"


def verdict_line(d: ModelDiff) -> str:
    """The verdict as one sentence (text and JSON give the same one)."""
    out = VERDICT_TEXT[d.verdict]
    if d.verdict != "unverified":
        return out
    why = [f"the data of {n} tensors ({why})" for why, n in Counter(w for _, w in d.data.skipped).items()]
    if not d.tokenizer.verified:
        why.append("the tokenizers' encoding (a side could not tokenize)")
    return f"{out}; not compared: " + "; ".join(why)


def render_text(d: ModelDiff) -> str:
    out = [
        f"A: {d.a} ({d.formats[0]}, {d.architectures[0]}, {d.tensor_counts[0]} tensors)",
        f"B: {d.b} ({d.formats[1]}, {d.architectures[1]}, {d.tensor_counts[1]} tensors)",
        "config: " + ("identical" if not d.config else f"{len(d.config)} fields differ"),
    ]
    out += [_field_line(f) for f in d.config]
    out += _tokenizer_lines(d.tokenizer)
    out.append("tensors: " + ("identical names, shapes and types" if not d.tensors else ""))
    out += _tensor_lines(d.tensors)
    out += _data_lines(d.data)
    out.append(f"=> {verdict_line(d)}")
    return "\n".join(line.rstrip() for line in out) + "\n"


def _field_doc(f: FieldDiff) -> dict[str, Any]:
    return {"field": f.name, "a": f.a, "b": f.b, "storage_only": bool(f.storage), "why": f.storage or None}


def _probes_doc(p: ProbeCheck | None) -> dict[str, Any] | None:
    if p is None:
        return None
    differ = [
        {"probe": x.name, "text": x.text, "position": x.position, "a": list(x.a_ids), "b": list(x.b_ids)}
        for x in p.differ
    ]
    return {"compared": p.compared, "differ": differ, "not_compared": list(p.problems)}


def _data_doc(c: DataCheck) -> dict[str, Any]:
    differ = [
        {
            "name": x.name,
            "how": x.how,
            "values_read": x.max_abs is not None,
            "max_abs": None if x.max_abs is None else json_float(x.max_abs),
            "changes_math": x.changes_math,
        }
        for x in c.differ
    ]
    skipped = [{"name": n, "why": why} for n, why in c.skipped]
    return {"compared": c.compared, "differ": differ, "not_compared": skipped}


def to_doc(d: ModelDiff) -> dict[str, Any]:
    t = d.tokenizer
    return {
        "schema": SCHEMA,
        "a": {"path": d.a, "format": d.formats[0], "architecture": d.architectures[0]},
        "b": {"path": d.b, "format": d.formats[1], "architecture": d.architectures[1]},
        "differs": d.differs,
        "verdict": d.verdict,
        "verdict_text": verdict_line(d),
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
            "probes": _probes_doc(t.probes),
        },
        "tensors": [{"name": x.name, "kind": x.kind, "a": x.a or None, "b": x.b or None} for x in d.tensors],
        "data": _data_doc(d.data),
    }
