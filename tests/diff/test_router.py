"""Router divergence on real traces: a zoo MoE GGUF (tests/fixtures/zoo.py) against a copy with one router row
of its last layer moved, so that the test knows which positions change experts.

The router is linear in its input, so the moved row's effect is known before B runs: B's router logits are A's
plus h·Δᵀ, with h the layer's ffn_norm output from A's own trace (the same up to the layer: nothing before it
changed). One move makes a chosen position pick the expert it ranked last (and any other position whose
logits the move lifts as far); a small move of the top expert's row changes its weights and no selection.
`diff_traces`, the text, JSON and HTML renderings, `apr diff --check` and `apr bisect` are checked on both.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from apr.diff.compare import TraceDiff, diff_traces
from apr.diff.router import RouterDivergence
from apr.report import json as json_report
from apr.report import routing, text
from apr.stages import Stage, StageId
from apr.trace.plan import TracePlan
from apr.trace.reader import Trace, read_trace
from apr.trace.run import TraceOptions, prepare_trace
from tests.fixtures.cli import run
from tests.fixtures.zoo import ZooModel

pytestmark = pytest.mark.oracle  # the zoo's GGUFs come from llama.cpp's converter
FAMILY = "qwen3_moe"
MARGIN = 0.5  # logits: how far past the k-th expert the moved row lifts the chosen one
TIE = 1e-3  # no predicted selection may hinge on a smaller gap than this


def _trace(model: Path, ids: list[int], out: Path) -> Trace:
    prepared = dataclasses.replace(prepare_trace(model, "-"), token_ids=tuple(ids))
    layers = f"0..{prepared.model.config.n_layers}"
    prepared.run(TracePlan.from_cli("all", layers), out, TraceOptions())
    return read_trace(out)


def _moved(z: ZooModel, out: Path, layer: int, expert: int, delta: np.ndarray) -> Path:
    """The zoo GGUF with router row `expert` of `layer` moved by `delta` (F32, edited in place)."""
    import gguf

    shutil.copy(z.gguf, out)
    reader = gguf.GGUFReader(out, "r+")
    router = next(t for t in reader.tensors if t.name == f"blk.{layer}.ffn_gate_inp.weight")
    router.data[expert] += delta.astype(np.float32)
    reader.data.flush()
    return out


def _top_sets(logits: np.ndarray, k: int) -> list[frozenset[int]]:
    ranked = np.sort(logits, axis=1)[:, ::-1]
    assert np.all(ranked[:, k - 1] - ranked[:, k] > TIE), "a near-tie: the prediction would be a guess"
    return [frozenset(map(int, np.argsort(-row, kind="stable")[:k])) for row in logits]


@dataclasses.dataclass
class Case:
    a: Trace
    b: Trace
    diff: TraceDiff
    layer: int
    expected: list[int]  # the positions predicted to change experts
    sets_a: list[frozenset[int]]
    sets_b: list[frozenset[int]]


Move = Callable[[np.ndarray, int, int], tuple[int, float]]  # (router logits, p, k) → (expert, lift at p)


def _case(z: ZooModel, tmp: Path, name: str, move: Move) -> Case:
    """A trace of the zoo model and of a copy whose last router row `e` is moved along h[p], raising expert
    e's logit at position p by `lift` (and at every other position q by lift · h[q]·h[p] / h[p]·h[p])."""
    ids = z.token_ids()
    a = _trace(z.gguf, ids, tmp / "a")
    cfg = a.manifest.run.config if a.manifest else None
    assert cfg is not None
    last, k = cfg.n_layers - 1, cfg.n_experts_used
    h = np.asarray(a.load(StageId(Stage.FFN_NORM, last)), np.float64)  # (T, D)
    logits = np.asarray(a.load(StageId(Stage.MOE_ROUTER_LOGITS, last)), np.float64)  # (T, E)
    p = len(ids) // 2
    e, lift = move(logits, p, k)
    delta = lift * h[p] / (h[p] @ h[p])  # (D,)
    predicted = logits.copy()
    predicted[:, e] += h @ delta  # (T,)
    sets_a, sets_b = _top_sets(logits, k), _top_sets(predicted, k)
    b = _trace(_moved(z, tmp / f"{name}.gguf", last, e, delta), ids, tmp / "b")
    expected = [t for t in range(len(ids)) if sets_a[t] != sets_b[t]]
    return Case(a, b, diff_traces(a, b), last, expected, sets_a, sets_b)


def _last_past_kth(logits: np.ndarray, p: int, k: int) -> tuple[int, float]:
    """The expert p ranks last, lifted MARGIN past p's k-th: p selects it."""
    e = int(np.argmin(logits[p]))
    return e, float(np.sort(logits[p])[::-1][k - 1] - logits[p, e]) + MARGIN


def _top_one_nudged(logits: np.ndarray, p: int, k: int) -> tuple[int, float]:
    """p's top expert, lifted a little: its top-k weights move, and (checked) no selection anywhere."""
    e = int(np.argmax(logits[p]))
    ranked = np.sort(logits, axis=1)[:, ::-1]
    return e, 0.1 * float(np.min(ranked[:, k - 1] - ranked[:, k]))


def _second_past_first(logits: np.ndarray, p: int, k: int) -> tuple[int, float]:
    """p's second expert, lifted just past its first: the same set at p, in the other order."""
    first, second = np.argsort(-logits[p], kind="stable")[:2]
    return int(second), float(logits[p, first] - logits[p, second]) + 1e-2


@pytest.fixture(scope="module")
def changed(zoo: Callable[[str], ZooModel], tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _case(zoo(FAMILY), tmp_path_factory.mktemp("changed"), "changed", _last_past_kth)


@pytest.fixture(scope="module")
def unchanged(zoo: Callable[[str], ZooModel], tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _case(zoo(FAMILY), tmp_path_factory.mktemp("unchanged"), "unchanged", _top_one_nudged)


@pytest.fixture(scope="module")
def reordered(zoo: Callable[[str], ZooModel], tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _case(zoo(FAMILY), tmp_path_factory.mktemp("reordered"), "reordered", _second_past_first)


def test_the_positions_that_change_experts_and_both_sets_are_named(changed: Case) -> None:
    r = changed.diff.routing
    assert isinstance(r, RouterDivergence) and r and changed.diff.routing_changed
    assert changed.expected and len(changed.expected) < len(changed.sets_a)  # some positions, not all
    assert [x.layer for x in r.changed] == [changed.layer]  # earlier layers route as before
    assert len(r.layers) == changed.layer + 1
    first = r.first
    assert first is not None
    assert [p.position for p in first.changed] == changed.expected
    for p in first.changed:
        assert frozenset(p.experts_a) == changed.sets_a[p.position]
        assert frozenset(p.experts_b) == changed.sets_b[p.position]
        assert set(p.only_a) == changed.sets_a[p.position] - changed.sets_b[p.position]


def test_the_same_experts_are_no_router_divergence(unchanged: Case) -> None:
    r = unchanged.diff.routing
    assert r is not None and not r and not unchanged.diff.routing_changed
    assert unchanged.expected == [] and r.first is None
    assert all(not x.changed for x in r.layers)
    last = r.layers[-1]
    assert last.weight_max_abs is not None and last.weight_max_abs > 0  # probabilities moved, experts did not
    assert all(x.weight_max_abs == 0.0 for x in r.layers[:-1])
    assert text.render_trace_diff(unchanged.diff).splitlines()[3] == routing.headline(r)
    assert "the same experts at every position" in routing.headline(r)


def test_the_same_experts_in_another_order_are_reported_apart(reordered: Case) -> None:
    r = reordered.diff.routing
    assert r is not None
    p = len(reordered.sets_a) // 2
    layer = r.layers[reordered.layer]
    assert p not in [x.position for x in layer.changed]
    swapped = next(x for x in layer.reordered if x.position == p)
    assert swapped.experts_b[:2] == swapped.experts_a[1::-1]  # the first two change places
    assert [x.position for x in layer.changed] == reordered.expected
    out = "\n".join(routing.render_text(r))
    assert (
        f"layer {reordered.layer}: the same experts in another order at {len(layer.reordered)} positions"
        in out
    )
    doc = routing.to_doc(r)
    assert doc is not None and p in [x["position"] for x in doc["layers"][reordered.layer]["reordered"]]


def test_text_and_json_say_it_before_the_stage_table(changed: Case) -> None:
    lines = text.render_trace_diff(changed.diff).splitlines()
    assert lines[3].startswith(f"router divergence: 1 of {changed.layer + 1} MoE layers select different")
    assert f"first at layer {changed.layer}, positions {', '.join(map(str, changed.expected))}" in lines[3]
    p = changed.diff.routing.first.changed[0]  # type: ignore[union-attr]
    assert f"position {p.position}: A {list(p.experts_a)}, B {list(p.experts_b)}" in "\n".join(lines[4:6])
    table = next(i for i, line in enumerate(lines) if "max|diff|" in line)
    assert table > 5
    doc = json_report.trace_diff_doc(changed.diff)["routing"]
    assert doc["diverged"] is True and doc["first_layer"] == changed.layer
    layer = doc["layers"][changed.layer]
    assert [c["position"] for c in layer["changed"]] == changed.expected
    assert json.loads(json_report.dumps(json_report.trace_diff_doc(changed.diff)))["routing"] == doc


def test_diff_check_fails_and_bisect_reports_the_router_first(changed: Case, unchanged: Case) -> None:
    code, out, err = run("diff", str(changed.a.path), str(changed.b.path), "--values", "--check", "--json")
    assert (code, err) == (1, "")
    assert json.loads(out)["routing"]["first_layer"] == changed.layer
    code, out, _ = run("diff", str(unchanged.a.path), str(unchanged.b.path), "--values", "--check", "--json")
    assert json.loads(out)["routing"]["diverged"] is False
    code, out, err = run("bisect", str(changed.a.path), str(changed.b.path))
    assert (code, err) == (1, "")
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("router divergence:"))
    table = next(i for i, line in enumerate(lines) if line.lstrip().startswith("layer  output"))
    assert head < table and "verdict: first divergence at " in out  # said first; the growth analysis goes on
    code, out, _ = run("bisect", str(changed.a.path), str(changed.b.path), "--json")
    assert json.loads(out)["routing"] == json_report.trace_diff_doc(changed.diff)["routing"]


def test_the_html_section_lists_each_changed_position(changed: Case, unchanged: Case) -> None:
    page = routing.render_html(changed.diff.routing)
    assert page.startswith("<h2>Router</h2>") and "router divergence: 1 of" in page
    assert page.count("<tr><td>") == len(changed.expected)
    p = changed.diff.routing.first.changed[0]  # type: ignore[union-attr]
    row = f"<tr><td>{changed.layer}</td><td>{p.position}</td><td>{list(p.experts_a)}</td>"
    assert row in page
    assert "<table>" not in routing.render_html(unchanged.diff.routing)
    assert routing.render_html(None) == ""


def test_bare_traces_without_shapes_say_the_sets_were_not_compared(tmp_path: Path) -> None:
    """aprender's traces (no manifest): k is unknown, so the ids cannot be cut into positions."""
    from apr.trace import format as aprt

    for side in ("a", "b"):
        aprt.write_aprt(tmp_path / side / "layer-0" / "moe_router_indices.bin", 0, np.zeros(6, np.float32))
    d = diff_traces(read_trace(tmp_path / "a"), read_trace(tmp_path / "b"))
    assert d.routing is not None and not d.routing and d.routing.layers == ()
    assert routing.render_text(d.routing) == [
        "router: expert sets not compared: moe_router_indices has no recorded shape or config on either side"
    ]
