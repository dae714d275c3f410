"""The mixture-of-experts family (Mixtral, Qwen2-MoE, Qwen3-MoE) against its oracles, on the zoo's tiny random
checkpoints (tests/fixtures/zoo.py: HF folders saved by transformers 5.24, GGUFs by llama.cpp's converter).

Per family:
- resolution: the HF folder and the GGUF (Mixtral's says "llama" and is claimed by its expert count) give the
  moe family, the variant's flags and a graph with the MoE stages and none of the dense FFN's;
- the reference on the HF folder vs transformers (eager experts), every stage of every layer: the selected
  experts (`moe_router_indices`) equal at every position and layer, relative L2 ≤ 1e-5 in float32 and ≤ 1e-10
  in float64 (the runtime lifts the routers' float32 softmax);
- the same weights saved under transformers 5's fused expert parameter names: the same selections, every stage
  ≤ 1e-5 of transformers on that folder;
- the reference on the F32 GGUF vs llama.cpp with the family's node table: llama.cpp exposes every stage
  of the graph, the MoE stages included (top-k weights as the input of ffn_moe_weighted, expert ids from
  ggml's I32 view ffn_moe_topk, the MoE output by structure); each ≤ 1e-5, logits of every position, and
  the selected experts equal, in the same order, at every position of every layer;
  the GGUF and HF traces agree (after Q/K alignment), and `apr import` of the GGUF is bit-identical;
- only the selected experts count: a forward pass reads the bytes of exactly the experts some token selects
  (and never a range across two experts) of each merged GGUF expert tensor; a fault in one expert of the
  last layer changes the logits at exactly the positions that select it (GGUF: a slice of the merged
  tensor; HF: one per-expert tensor), the oracle agrees on the faulted model, and a trace diff's first
  divergence is that layer's moe_ffn_out.
Refusals (by name): dense layers between MoE layers, a missing expert, fused and separate expert weights both.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from apr.convert.importer import import_gguf
from apr.diff.align import Side, align
from apr.diff.compare import diff_traces
from apr.engine.weights import Weights
from apr.errors import FormatError, ModelLoadError
from apr.models import model as model_module
from apr.models import open_model
from apr.models.registry import family_named
from apr.runtimes import run_llamacpp, run_transformers
from apr.stages import MOE_STAGES, Stage, StageId
from apr.trace.plan import TracePlan
from apr.trace.reader import read_trace
from apr.trace.run import TraceOptions, prepare_trace
from tests.fixtures.zoo import ZooModel
from tests.runtimes import Recorder

pytestmark = pytest.mark.oracle
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
F32_TOL, F64_TOL = 1e-5, 1e-10
VARIANT = {"mixtral": "mixtral", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
DENSE_FFN = {Stage.FFN_GATE, Stage.FFN_UP, Stage.FFN_SILU, Stage.FFN_SWIGL, Stage.FFN_OUT}
# an expert's down projection as the HF folder stores it (transformers' save_pretrained: one per expert)
HF_DOWN = {
    "mixtral": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
    "qwen2_moe": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
    "qwen3_moe": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
}


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def reference(path: Path, ids: list[int], dtype: Any = np.float32) -> Recorder:
    m = open_model(path)
    rec = Recorder()
    m.family.forward(Weights(m, dtype), m.config, ids, rec, lm_head_all=True)
    return rec


def transformers_run(path: Path, ids: list[int], precision: str = "float32") -> Recorder:
    model, rec = open_model(path), Recorder()
    graph = [n.stage for n in model.graph()]
    run = run_transformers(path, ids, rec, dtype=precision, hooks=model.family.hooks, expected=graph)
    assert set(run.unavailable) <= {Stage.QKV_BIAS}, run.unavailable  # every stage is compared
    assert {sid.stage for sid in rec.order} == {
        s for s in graph if s is not Stage.QKV_BIAS or model.config.qkv_bias
    }
    return rec


def selections(rec: Recorder, layer: int) -> np.ndarray:
    return rec.arrays[StageId(Stage.MOE_ROUTER_INDICES, layer)].astype(np.int64)  # (T, k)


def hf_copy(z: ZooModel, out: Path, tensors: dict[str, np.ndarray] | None = None, **config: Any) -> Path:
    """The zoo's HF folder with its tensors (and config.json keys) replaced."""
    out.mkdir(parents=True)
    save_file(load_file(z.hf_dir / "model.safetensors") if tensors is None else tensors,
              str(out / "model.safetensors"))  # fmt: skip
    (out / "config.json").write_text(json.dumps(z.hf_config | config))
    return out


def gguf_copy(z: ZooModel, out: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> Path:
    """The zoo's GGUF with some tensors edited in place (gguf's reader, writable memmap, F32 data)."""
    import gguf

    shutil.copy(z.gguf, out)
    reader = gguf.GGUFReader(out, "r+")
    edit({t.name: t.data for t in reader.tensors})
    reader.data.flush()
    return out


@pytest.fixture(scope="module", params=MOE)
def family(request: pytest.FixtureRequest, zoo: Callable[[str], ZooModel]) -> ZooModel:
    return zoo(str(request.param))


def test_both_formats_resolve_to_the_moe_family(family: ZooModel) -> None:
    hf = family.hf_config
    experts = hf.get("num_local_experts") or hf["num_experts"]
    ffn = hf.get("moe_intermediate_size", hf["intermediate_size"])
    shared, norm = hf.get("shared_expert_intermediate_size", 0), hf.get("norm_topk_prob", True)
    want = (VARIANT[family.family], experts, hf["num_experts_per_tok"], ffn, shared, norm)
    for path in (family.hf_dir, family.gguf):
        m = open_model(path)
        c = m.config
        got = (
            c.architecture,
            c.n_experts,
            c.n_experts_used,
            c.expert_ffn,
            c.shared_expert_ffn,
            c.norm_topk_prob,
        )
        assert (m.family.name, got) == ("moe", want), path
        assert m.stages() & DENSE_FFN == set()
        assert m.stages() & MOE_STAGES == MOE_STAGES - (
            {Stage.MOE_SHARED_OUT} if not c.shared_expert_ffn else set()
        )
        assert m.ignored == []
    assert family.gguf_arch == ("llama" if family.family == "mixtral" else VARIANT[family.family])


@pytest.mark.parametrize(("precision", "dtype", "tol"), [("float32", np.float32, F32_TOL),
                                                         ("float64", np.float64, F64_TOL)])  # fmt: skip
def test_hf_every_stage_and_every_selection_matches_transformers(
    family: ZooModel, precision: str, dtype: Any, tol: float
) -> None:
    ids = family.token_ids()
    theirs, ours = transformers_run(family.hf_dir, ids, precision), reference(family.hf_dir, ids, dtype)
    for layer in range(open_model(family.hf_dir).config.n_layers):
        assert np.array_equal(selections(ours, layer), selections(theirs, layer)), layer
    errors = {sid: rel_l2(ours.arrays[sid], theirs.arrays[sid]) for sid in theirs.order}
    worst = max(errors, key=errors.__getitem__)
    moe = max(e for sid, e in errors.items() if sid.stage.moe)
    print(
        f"{family.family} {precision}: {len(errors)} stages, worst {worst} {errors[worst]:.2e}, moe {moe:.2e}"
    )
    assert errors[worst] <= tol, f"{worst}: {errors[worst]:.3e} > {tol:g}"


def test_transformers_fused_expert_parameters(family: ZooModel, tmp_path: Path) -> None:
    """A folder saved from transformers 5's own parameters (mlp.experts.gate_up_proj (E, 2F, D), ...)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(family.hf_dir, dtype=torch.float32)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    fused = hf_copy(family, tmp_path / "fused", state)
    m = open_model(fused)
    assert m.info("blk.0.ffn_gate_up_exps.weight").source_name == "model.layers.0.mlp.experts.gate_up_proj"
    ids = family.token_ids()
    ours, theirs, split = reference(fused, ids), transformers_run(fused, ids), reference(family.hf_dir, ids)
    for layer in range(m.config.n_layers):
        assert np.array_equal(selections(ours, layer), selections(split, layer))
    worst = max(rel_l2(ours.arrays[sid], theirs.arrays[sid]) for sid in theirs.order)
    assert worst <= F32_TOL


def llamacpp_run(path: Path, ids: list[int]) -> Recorder:
    model, rec = open_model(path), Recorder()
    graph = [n.stage for n in model.graph()]
    run = run_llamacpp(path, ids, rec, nodes=model.family.ggml_nodes, expected=graph)
    assert run.unavailable == (), run.unavailable  # every stage of the graph, MoE stages included
    return rec


def test_gguf_every_stage_llamacpp_exposes_matches(family: ZooModel) -> None:
    """Logits of every position, every layer's stages, every MoE stage, the same experts everywhere."""
    ids = family.token_ids()
    ours, theirs = reference(family.gguf, ids), llamacpp_run(family.gguf, ids)
    cfg = open_model(family.gguf).config
    side = Side(cfg.qk_layout, cfg)
    outputs = [sid for sid in theirs.order if sid.stage in (Stage.POST_FFN_RESIDUAL, Stage.LM_HEAD)]
    assert len(outputs) == cfg.n_layers + 1
    moe_graph = {n.stage for n in open_model(family.gguf).graph() if n.stage.moe}
    for i in range(cfg.n_layers):
        assert {sid.stage for sid in theirs.order if sid.stage.moe and sid.layer == i} == moe_graph
        assert np.array_equal(selections(theirs, i), selections(ours, i)), i  # same order too
    errors = {
        sid: rel_l2(*align(sid, ours.arrays[sid], side, theirs.arrays[sid], side)) for sid in theirs.order
    }
    worst = max(errors, key=errors.__getitem__)
    print(f"{family.family} vs llama.cpp: {len(errors)} stages, worst {worst} {errors[worst]:.2e}")
    assert errors[worst] <= F32_TOL, f"{worst}: {errors[worst]:.3e}"


GGML_ROUTER_TOL = 1e-6  # --precision ggml: every matmul in ggml's order except the F32 routers (BLAS)


def test_q8_0_from_llama_quantize_opens_and_the_emulation_matches_llamacpp(
    family: ZooModel, tmp_path: Path
) -> None:
    """llama_model_quantize (pure Q8_0) writes Qwen2-MoE's [1, D] shared-expert gate back as [D] (ggml drops
    ne = 1); apr opens it as llama.cpp does. With --precision ggml the expert path agrees with llama.cpp on
    every stage within GGML_ROUTER_TOL, the same experts selected everywhere."""
    import ctypes

    import llama_cpp

    q8 = tmp_path / "q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True, 1
    status = llama_cpp.llama_model_quantize(str(family.gguf).encode(), str(q8).encode(), ctypes.byref(params))
    assert status == 0
    ids = family.token_ids()
    m, ours = open_model(q8), Recorder()
    m.family.forward(Weights(m, ggml=True), m.config, ids, ours, lm_head_all=True)
    theirs = llamacpp_run(q8, ids)
    side = Side(m.config.qk_layout, m.config)
    for i in range(m.config.n_layers):
        assert np.array_equal(selections(theirs, i), selections(ours, i)), i
    errors = {
        sid: rel_l2(*align(sid, ours.arrays[sid], side, theirs.arrays[sid], side)) for sid in theirs.order
    }
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= GGML_ROUTER_TOL, f"{worst}: {errors[worst]:.3e}"
    assert StageId(Stage.LM_HEAD) in errors and len(errors) > 2 * 15


def test_gguf_and_hf_traces_agree_and_import_is_bit_identical(family: ZooModel, tmp_path: Path) -> None:
    ids = family.token_ids()
    a, b = reference(family.gguf, ids), reference(family.hf_dir, ids)
    side_a, side_b = (
        Side(open_model(p).config.qk_layout, open_model(p).config) for p in (family.gguf, family.hf_dir)
    )
    assert a.order == b.order
    for sid in a.order:
        x, y = align(sid, a.arrays[sid], side_a, b.arrays[sid], side_b)
        assert rel_l2(x, y) <= F32_TOL, (sid, rel_l2(x, y))
    import_gguf(family.gguf, tmp_path / "m.apr")
    c = reference(tmp_path / "m.apr", ids)
    assert c.order == a.order and all(np.array_equal(a.arrays[s], c.arrays[s]) for s in a.order)


class ByteSpy:
    """A model that records the byte ranges [start, stop) read from each tensor (`raw_range`, `raw` views)."""

    def __init__(self, model: Any) -> None:
        self.model, self.reads = model, defaultdict(list)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def raw(self, name: str) -> np.ndarray:
        reads = self.reads[name]

        class View(np.ndarray):
            def __getitem__(self, key: Any) -> Any:
                reads.append((key.start, key.stop))
                return np.asarray(super().__getitem__(key))

        return self.model.raw(name).view(View)

    def raw_range(self, name: str, start: int, stop: int) -> np.ndarray:
        self.reads[name].append((start, stop))
        return self.model.raw_range(name, start, stop)


def test_only_the_selected_experts_bytes_are_read(family: ZooModel) -> None:
    ids = family.token_ids(3)
    m = open_model(family.gguf)
    spy, rec = ByteSpy(m), Recorder()
    m.family.forward(Weights(spy), m.config, ids, rec)  # type: ignore[arg-type]
    for i in range(m.config.n_layers):
        selected = set(selections(rec, i).ravel().tolist())
        assert len(selected) < m.config.n_experts  # the prompt leaves some expert idle
        for part in ("gate", "up", "down"):
            name = f"blk.{i}.ffn_{part}_exps.weight"
            per_expert = m.info(name).nbytes // m.config.n_experts
            read = {(a // per_expert, (b - 1) // per_expert) for a, b in spy.reads[name]}
            assert all(first == last for first, last in read), name  # no read crosses experts
            assert {first for first, _ in read} == selected, name


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_a_fault_in_one_expert_changes_only_the_positions_that_select_it(
    family: ZooModel, fmt: str, tmp_path: Path
) -> None:
    ids = family.token_ids()
    path = family.gguf if fmt == "gguf" else family.hf_dir
    last = open_model(path).config.n_layers - 1
    before = reference(path, ids)
    chosen = selections(before, last)  # (T, k)
    counts = np.bincount(chosen.ravel())
    e = int(np.argmin(np.where(counts > 0, counts, len(ids) + 1)))  # the rarest expert some token uses
    hit = (chosen == e).any(axis=1)  # (T,)
    assert 0 < hit.sum() < len(ids)
    if fmt == "gguf":
        faulted = gguf_copy(family, tmp_path / "faulted.gguf",
                            lambda t: t[f"blk.{last}.ffn_down_exps.weight"][e].__imul__(3.0))  # fmt: skip
    else:
        tensors = load_file(family.hf_dir / "model.safetensors")
        tensors[HF_DOWN[family.family].format(i=last, e=e)] *= 3.0
        faulted = hf_copy(family, tmp_path / "faulted", tensors)
    after = reference(faulted, ids)
    logits = StageId(Stage.LM_HEAD)
    changed = ~np.all(after.arrays[logits] == before.arrays[logits], axis=-1)  # (T,)
    assert np.array_equal(changed, hit), (changed, hit)
    for sid in before.order:
        if sid.layer is not None and sid.sort_key < StageId(Stage.MOE_FFN_OUT, last).sort_key:
            assert np.array_equal(after.arrays[sid], before.arrays[sid]), sid
    # the oracle sees the same faulted model
    oracle = llamacpp_run(faulted, ids) if fmt == "gguf" else transformers_run(faulted, ids)
    assert rel_l2(after.arrays[logits], oracle.arrays[logits]) <= F32_TOL
    if fmt == "gguf":  # and a trace diff points at the faulted layer's MoE output
        a, b = (_trace(p, ids, tmp_path / name) for p, name in ((path, "a"), (faulted, "b")))
        first = diff_traces(a, b).first_divergence
        assert first is not None and first.sid == StageId(Stage.MOE_FFN_OUT, last)


def _trace(model: Path, ids: list[int], out: Path) -> Any:
    """Every stage of every layer traced to `out` (the writer and manifest of `apr trace`), on `ids`."""
    prepared = dataclasses.replace(prepare_trace(model, "-"), token_ids=tuple(ids))
    layers = f"0..{prepared.model.config.n_layers}"
    prepared.run(TracePlan.from_cli("all", layers), out, TraceOptions())
    return read_trace(out)


# ---- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"decoder_sparse_step": 2}, r"'decoder_sparse_step' = 2: dense FFN layers between MoE layers"),
        ({"mlp_only_layers": [1]}, r"'mlp_only_layers' = \[1\]: dense FFN layers \[1\] \(mlp_only_layers\)"),
        ({"use_sliding_window": True}, r"'use_sliding_window' = True: Qwen's per-layer sliding window"),
    ],
)
def test_qwen_moe_configs_apr_does_not_implement_are_refused(
    zoo: Callable[[str], ZooModel], tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message + ".* is not implemented$"):
        open_model(hf_copy(zoo("qwen2_moe"), tmp_path / "m", **config))


def test_expert_tensors_are_accounted_for(zoo: Callable[[str], ZooModel], tmp_path: Path) -> None:
    z = zoo("qwen3_moe")
    tensors = load_file(z.hf_dir / "model.safetensors")
    partial = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.experts.3.up_proj.weight"}
    with pytest.raises(ModelLoadError, match=r"tensor model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight is "
                                             r"missing \(7 of 8 experts present\)$"):  # fmt: skip
        open_model(hf_copy(z, tmp_path / "partial", partial))
    gate_up = np.zeros((8, 64, 64), np.float32)
    both = tensors | {f"model.layers.{i}.mlp.experts.gate_up_proj": gate_up for i in range(2)}
    with pytest.raises(ModelLoadError, match=r"tensors blk\.0\.ffn_gate_up_exps\.weight and "
                                             r"blk\.0\.ffn_gate_exps\.weight are both present"):  # fmt: skip
        open_model(hf_copy(z, tmp_path / "both", both))
    with pytest.raises(FormatError, match=r"9 experts per token, but the model has 8 experts$"):
        open_model(hf_copy(z, tmp_path / "k", num_experts_per_tok=9))


def test_a_llama_gguf_with_experts_is_mixtral_and_the_llama_family_refuses_it(
    zoo: Callable[[str], ZooModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    z = zoo("mixtral")
    m = open_model(z.gguf)
    assert (m.source.architecture, m.family.name, m.variant.name) == ("llama", "moe", "mixtral")
    llama = family_named("llama")
    monkeypatch.setattr(model_module, "find_family", lambda source: (llama, llama.variant("llama")))
    with pytest.raises(ModelLoadError, match=r"tensor blk\.0\.ffn_gate\.weight is missing$"):
        open_model(z.gguf)  # the llama family alone still refuses it


def test_bisect_finds_an_expert_fault_only_for_a_prompt_that_selects_the_expert(
    family: ZooModel, tmp_path: Path
) -> None:
    """`apr bisect good.gguf bad.gguf --tokens …`: one expert of the last layer ×3. On the whole prompt the
    first divergence is that layer's moe_ffn_out; on the prefix before the first position that selects the
    expert (a causal model computes the same states there) bisect finds nothing."""
    from tests.test_cli_bisect import bisect_json

    ids = family.token_ids()
    last = open_model(family.gguf).config.n_layers - 1
    chosen = selections(reference(family.gguf, ids), last)  # (T, k)
    unused_first = [e for e in np.unique(chosen) if e not in chosen[0]]
    e = int(unused_first[0])  # selected somewhere, but not at position 0
    first_hit = int(np.argmax((chosen == e).any(axis=1)))
    faulted = gguf_copy(family, tmp_path / "faulted.gguf",
                        lambda t: t[f"blk.{last}.ffn_down_exps.weight"][e].__imul__(3.0))  # fmt: skip
    tokens = ",".join(map(str, ids))
    code, doc = bisect_json(family.gguf, faulted, "--tokens", tokens)
    assert code == 1 and doc["first_divergence"]["id"] == f"blk.{last}.moe_ffn_out", doc["first_divergence"]
    code, doc = bisect_json(family.gguf, faulted, "--tokens", ",".join(map(str, ids[:first_hit])))
    assert code == 0 and doc["first_divergence"] is None
