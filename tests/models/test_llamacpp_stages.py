"""Every stage llama.cpp materializes, per dense family, against the reference engine on the same F32 GGUF.

The zoo's GGUFs (tests/fixtures/zoo.py: written by llama.cpp's own converter) run once through llama.cpp with
the family's node table (`Family.ggml_nodes`) and once through the reference engine; after Q/K-layout
alignment every stage of every layer is within 1e-5 relative L2 (‖llama.cpp − ref‖ / ‖ref‖). Gemma 2/3: 5e-4
for `blk.0.ffn_swigl` and everything after it — ggml's CPU GELU rounds its input to f16 and looks it up in a
table (GGML_GELU_FP16), measured ~3.9e-4 on ffn_swigl, ~1e-4 on the logits; what comes before the first GELU
stays within 1e-5.

What llama.cpp exposes must be the family's graph minus `UNAVAILABLE`, and nothing else: every family here
computes act(gate)·up as one fused GLU op (SWIGLU for llama/qwen/granite/phi3/olmo2, GEGLU for Gemma), so
`ffn_silu` — act(gate) alone — never exists in its graph. Sliding-window layers (Gemma 2/3) zero exactly the
scores llama.cpp's mask hides.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from apr.diff.align import Side, align
from apr.engine.ops import hidden_keys
from apr.models import open_model
from apr.runtimes import ENGINE_LLAMACPP, run_llamacpp
from apr.stages import Stage, StageId
from apr.trace.run import ENGINES, TraceOptions
from tests.fixtures.zoo import ZooModel
from tests.models.test_families import DENSE, reference, rel_l2
from tests.runtimes import Recorder

pytestmark = pytest.mark.oracle
TOL = 1e-5
GELU_TOL = 5e-4  # from the first GELU on (module docstring)
GELU_FAMILIES = ("gemma2", "gemma3")
FIRST_GELU = StageId(Stage.FFN_SWIGL, 0)
FUSED_GLU = frozenset({Stage.FFN_SILU})
UNAVAILABLE: dict[str, frozenset[Stage]] = {family: FUSED_GLU for family in DENSE}
SLIDING = ("gemma2", "gemma3")  # zoo families whose GGUF has sliding-window layers


@pytest.fixture(scope="module", params=DENSE)
def family(request: pytest.FixtureRequest, zoo: Callable[[str], ZooModel]) -> ZooModel:
    return zoo(str(request.param))


def tolerance(family: str, sid: StageId) -> float:
    downstream = family in GELU_FAMILIES and sid.sort_key >= FIRST_GELU.sort_key
    return GELU_TOL if downstream else TOL


def test_every_exposed_stage_matches_the_reference(family: ZooModel) -> None:
    ids = family.token_ids()
    model = open_model(family.gguf)
    graph = [n.stage for n in model.graph()]
    theirs = Recorder()
    run = run_llamacpp(family.gguf, ids, theirs, nodes=model.family.ggml_nodes, expected=graph)
    ours = reference(family.gguf, ids)
    lacking = UNAVAILABLE[family.family]
    assert set(run.unavailable) == lacking
    assert theirs.stages() == set(graph) - lacking
    assert set(theirs.arrays) == {sid for sid in ours.arrays if sid.stage not in lacking}
    assert theirs.order == sorted(theirs.order, key=lambda sid: sid.sort_key)
    side_l, side_r = Side(run.qk_layout, model.config), Side(model.config.qk_layout, model.config)
    errors = {}
    for sid in theirs.order:
        a, b = align(sid, theirs.arrays[sid], side_l, ours.arrays[sid], side_r)
        errors[sid] = rel_l2(a, b)
    worst = max(errors, key=errors.__getitem__)
    print(f"{family.family}: {len(errors)} stages, worst {worst} {errors[worst]:.2e}")
    bad = {str(sid): f"{e:.2e}" for sid, e in errors.items() if e > tolerance(family.family, sid)}
    assert not bad, bad


@pytest.mark.parametrize("name", SLIDING)
def test_sliding_layers_zero_what_the_mask_hides(name: str, zoo: Callable[[str], ZooModel]) -> None:
    fam = zoo(name)
    ids = fam.token_ids()
    model = open_model(fam.gguf)
    rec = Recorder()
    run_llamacpp(fam.gguf, ids, rec, nodes=model.family.ggml_nodes, expected=[n.stage for n in model.graph()])
    windows = [model.config.layer_window(i) for i in range(model.config.n_layers)]
    assert any(windows) and not all(windows)  # both kinds of layer, and the window bites at len(ids)
    assert min(w for w in windows if w) < len(ids)
    for layer, window in enumerate(windows):
        scores = rec.arrays[StageId(Stage.ATTN_SCORES, layer)]
        zero = (scores == 0).all(axis=0)
        assert (zero == hidden_keys(len(ids), window)).all(), (layer, window)


def test_trace_engine_passes_the_family_table(zoo: Callable[[str], ZooModel]) -> None:
    fam = zoo("gemma2")
    model = open_model(fam.gguf)
    rec = Recorder()
    ran = ENGINES[ENGINE_LLAMACPP](
        fam.gguf, model, tuple(fam.token_ids()), rec, TraceOptions(ENGINE_LLAMACPP)
    )
    assert set(ran.unavailable) == {Stage.FFN_SILU.value}
    assert ran.unavailable[Stage.FFN_SILU.value].startswith(
        "ffn_silu: llama.cpp computes act(gate)·up as one"
    )
    assert {Stage.ATTN_POST_NORM, Stage.FFN_POST_NORM} <= rec.stages()
    n_layers = model.config.n_layers
    assert sum(sid.stage is Stage.FFN_POST_NORM for sid in rec.order) == n_layers
    logits = rec.arrays[StageId(Stage.LM_HEAD)]
    assert np.abs(logits).max() <= model.config.final_softcap  # the soft-capped logits
