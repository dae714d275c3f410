"""Two-phase `apr bisect` (statistics of every layer first, then a window in full) at a 2048-token prompt.

The model: the zoo's tiny llama (tests/fixtures/zoo.py, F32 GGUF from llama.cpp's converter) grown to
`LAYERS` layers — layer i takes the zoo's layer i % 2 tensors, each scaled by its own factor so that no two
layers are alike — with a context of 4096 (the zoo's is 64), written with gguf's GGUFWriter. B is a copy
with one tensor of one layer scaled by 1.01 (the fault); bisect must name that layer and the tensor's first
consuming stage, having traced in full only the two layers of phase 2's window.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import zoo
from tests.fixtures.cli import run
from tests.fixtures.gguf_edit import scale_block_scales
from tests.fixtures.gguf_edit import scale_tensor as corrupt
from tests.fixtures.models import cache_dir

LAYERS = 6
CONTEXT = 4096
N_TOKENS = 2048
CONSUMER = {"ffn_up.weight": "ffn_up", "attn_output.weight": "attn_out", "attn_q.weight": "qkv_matmul"}


def _long_llama(dst: Path) -> Path:
    """The zoo llama with LAYERS layers and a CONTEXT-token context (module docstring)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    src = GGUFReader(zoo.build("llama", cache_dir() / "fixtures").gguf)
    w = GGUFWriter(dst, arch="llama")
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == "llama.block_count":
            value = LAYERS
        elif key == "llama.context_length":
            value = CONTEXT
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, value, field.types[0], sub_type=sub)
    blocks = {t.name: t for t in src.tensors if t.name.startswith("blk.")}
    for t in src.tensors:
        if not t.name.startswith("blk."):
            w.add_tensor(t.name, np.array(t.data))
    for i in range(LAYERS):
        for name, t in blocks.items():
            layer, rest = name.split(".", 2)[1:]
            if int(layer) == i % 2:
                factor = 1.0 if "norm" in rest else 1.0 + 0.05 * (i // 2)
                w.add_tensor(f"blk.{i}.{rest}", (np.array(t.data) * np.float32(factor)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _long_llama(tmp_path_factory.mktemp("long") / "llama-long.gguf")


def long_ids(n: int) -> str:
    """n ordinary ids of the zoo's vocabulary (BOS first), comma-separated."""
    return ",".join(str(1 + (i * 37) % 390) for i in range(n))


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def test_2048_tokens_two_phases_name_the_fault_after_tracing_two_layers(
    long_llama: Path, tmp_path: Path
) -> None:
    """Layer 3's ffn_up scaled by 1.01: its stage's error is 1e-2 exactly (a scaled matmul), with every stage
    before it bit-identical; the growth rule's floor is 1e-4."""
    bad = corrupt(long_llama, tmp_path / "bad.gguf", "blk.3.ffn_up.weight")
    keep = tmp_path / "keep"
    code, out, err = run(
        "bisect", str(long_llama), str(bad), "--tokens", long_ids(N_TOKENS), "--keep", str(keep), "--progress"
    )
    assert code == 1, out + err
    assert "verdict: first divergence at blk.3.ffn_up: relative error 9.9" in out  # 0.01/1.01 = 9.901e-3
    assert "two-phase bisect (2048 tokens)" in out
    # the phases said on stderr, per side
    lines = err.replace("\r", "\n").splitlines()
    for side in "AB":
        assert f"phase 1/2 stats: {side} layer {LAYERS}/{LAYERS}" in lines
        assert f"phase 2/2 full, layers 2..4: {side} layer {LAYERS}/{LAYERS}" in lines
    # phase 1: statistics of every layer, every position; phase 2: two layers in full, 128 positions
    for side in "ab":
        stats = manifest(keep / f"{side}-stats")
        assert stats["plan"]["mode"] == "stats" and stats["files"] == []
        assert {e["layer"] for e in stats["stats"]["stages"]} == {*range(LAYERS), None}
        assert {e["positions"] for e in stats["stats"]["stages"] if e["stage"] != "lm_head"} == {"0..2048"}
        full = manifest(keep / side)
        assert full["plan"]["layers"] == "2..4" and "mode" not in full["plan"]
        assert {f["layer"] for f in full["files"]} == {2, 3, None}
        lo, hi = map(int, full["plan"]["positions"].split(".."))
        assert hi - lo == 128
        assert sum(f["bytes"] for f in full["files"]) < 64 << 20


def test_q_silences_the_progress(long_llama: Path) -> None:
    code, out, err = run("-q", "bisect", str(long_llama), str(long_llama), "--tokens", long_ids(16),
                         "--phases", "2", "--progress")  # fmt: skip
    assert (code, err) == (0, ""), out + err


def test_short_prompts_stay_one_phase(long_llama: Path, tmp_path: Path) -> None:
    """auto: the full traces of 16 tokens are far below 256 MiB, so one phase, as before (no stats traces)."""
    bad = corrupt(long_llama, tmp_path / "bad.gguf", "blk.4.attn_output.weight")
    keep = tmp_path / "keep"
    code, out, _ = run("bisect", str(long_llama), str(bad), "--tokens", long_ids(16), "--keep", str(keep))
    assert code == 1
    assert "verdict: first divergence at blk.4.attn_out" in out
    assert "two-phase" not in out
    assert sorted(p.name for p in keep.iterdir()) == ["a", "b"]
    assert manifest(keep / "a")["plan"]["layers"] == f"0..{LAYERS}"


def test_json_says_what_each_phase_did(long_llama: Path, tmp_path: Path) -> None:
    bad = corrupt(long_llama, tmp_path / "bad.gguf", "blk.4.attn_output.weight")
    ids = long_ids(16)
    code, out, err = run("bisect", str(long_llama), str(bad), "--tokens", ids, "--phases", "2", "--json")
    assert code == 1, out + err
    phases = json.loads(out)["phases"]
    assert phases["count"] == 2 and phases["suspicious"] == "blk.4.attn_out"
    assert phases["full_layers"] == [3, 5] and phases["full_positions"] == [0, 16]
    assert phases["disk_bytes"]["stats"] > 0 and phases["disk_bytes"]["full"] > 0
    code, out, err = run("bisect", str(long_llama), str(bad), "--tokens", ids, "--phases", "1", "--json")
    assert code == 1 and json.loads(out)["phases"] == {"count": 1}, out + err


@pytest.mark.parametrize("tensor", ["blk.0.attn_q.weight", "blk.5.ffn_up.weight"])
def test_two_phases_at_the_edges(long_llama: Path, tmp_path: Path, tensor: str) -> None:
    """The window at the first layer (no layer before it: embedding traced too) and at the last."""
    bad = corrupt(long_llama, tmp_path / "bad.gguf", tensor)
    code, out, _ = run("bisect", str(long_llama), str(bad), "--tokens", long_ids(200), "--phases", "2")
    layer = int(tensor.split(".")[1])
    assert code == 1, out
    assert f"verdict: first divergence at blk.{layer}.{CONSUMER[tensor.split('.', 2)[2]]}" in out
    assert f"phase 2 traced layers {max(layer - 1, 0)}..{layer + 1} at positions" in out


def test_identical_models_two_phases_exit_0(long_llama: Path) -> None:
    code, out, _ = run("bisect", str(long_llama), str(long_llama), "--tokens", long_ids(200), "--phases", "2")
    assert code == 0, out
    assert "no divergence" in out


# --- issue 15: --precision-a ggml against llama.cpp on a Q8_0 GGUF ---------------------------------------

PERTURBED = "blk.1.ffn_up.weight"


@pytest.fixture(scope="module")
def q8_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """The zoo llama quantized to Q8_0 by llama.cpp (llama_model_quantize, pure), and a copy in which every
    block scale of PERTURBED is multiplied by 1.001 (rounded to f16); with the tensor's relative change
    measured by gguf-py's dequantize."""
    import ctypes

    import llama_cpp

    d = tmp_path_factory.mktemp("q8")
    q8, bad = d / "q8_0.gguf", d / "q8_0-bad.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True, 1
    src = zoo.build("llama", cache_dir() / "fixtures").gguf
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(q8).encode(), ctypes.byref(params)) == 0
    return q8, bad, scale_block_scales(q8, bad, PERTURBED, "Q8_0")


@pytest.mark.oracle
def test_precision_a_ggml_finds_a_1e_3_perturbation_llamacpp_hides(q8_pair: tuple[Path, Path, float]) -> None:
    """Measured: the perturbation is 9.2e-4 relative; with the emulation every stage before blk.1.ffn_up
    agrees with llama.cpp within 1e-7 and the budget is 1e-4 + 3e-4, so blk.1.ffn_up (9.2e-4) jumps; the
    plain f32 reference differs from llama.cpp by 5e-3 – 1.5e-2 everywhere (activation quantization), so
    its budgets (2e-2 and more a matmul) hide it."""
    q8, bad, change = q8_pair
    assert 5e-4 < change < 1.5e-3  # a 1e-3 change, as f16 scales allow
    ids = ",".join(map(str, zoo.build("llama", cache_dir() / "fixtures").token_ids(9)))
    common = ("bisect", str(q8), str(bad), "--engine-b", "llama.cpp", "--tokens", ids, "--json")
    code, out, _ = run(*common, "--precision-a", "ggml")
    doc = json.loads(out)
    assert code == 1 and doc["first_divergence"]["id"] == "blk.1.ffn_up", doc["verdict"]
    before = next(s for s in doc["stages"] if s["id"] == "blk.1.ffn_up")
    assert abs(before["error"] - change) < 0.2 * change  # the stage's error is the tensor's change
    code, out, _ = run(*common)
    doc = json.loads(out)
    assert code == 0 and doc["first_divergence"] is None, doc["verdict"]


def test_two_phases_need_two_models(long_llama: Path, tmp_path: Path) -> None:
    """--phases 2 traces each side twice: a trace directory cannot be, nor can --isolate (it needs every layer
    of A in full). One-line errors, exit 5 (a ValidationError)."""
    out = tmp_path / "t"
    code, _, err = run("-q", "trace", str(long_llama), "--save-tensor", "all", "--save-tensor-layers", "all",
                       "--tokens", long_ids(16), "--save-tensor-dir", str(out))  # fmt: skip
    assert code == 0, err
    code, _, err = run("bisect", str(out), str(long_llama), "--phases", "2")
    assert code == 5 and err.startswith("error: --phases 2 traces both sides twice") and err.count("\n") == 1
    code, _, err = run("bisect", str(long_llama), str(long_llama), "--tokens", long_ids(16), "--phases", "2",
                       "--isolate")  # fmt: skip
    assert code == 5 and "--isolate needs every layer of A in full" in err and err.count("\n") == 1


Q4_K_PERTURBED = "blk.3.ffn_down.weight"  # the first Q4_K tensor of SmolLM2's Q4_K_M (llama-quantize's mix)


@pytest.mark.oracle
def test_precision_a_ggml_finds_a_1e_3_perturbation_in_a_q4_k_tensor(tmp_path: Path) -> None:
    """SmolLM2 Q4_K_M (llama_model_quantize) against a copy whose blk.3.ffn_down (Q4_K) has every 4th block's
    d scaled by 1.001 (its relative change measured with gguf-py's dequantize), B in llama.cpp. With the
    emulation every stage before it agrees with llama.cpp bit for bit (tests/engine/test_ggml_precision.py),
    so its consumer, blk.3.ffn_out, is the first divergence; without it the activation-quantization budgets
    (2e-2 a matmul) hide the change."""
    from tests.quant.fixtures import quantized_gguf

    src = quantized_gguf("Q4_K_M", tokenizer=True)
    bad = tmp_path / "q4_k_m-bad.gguf"
    # every 4th block: d·scale − dmin·min amplifies d's change
    change = scale_block_scales(src, bad, Q4_K_PERTURBED, "Q4_K", every=4)
    assert 3e-4 < change < 1.5e-3, change
    common = ("bisect", str(src), str(bad), "--engine-b", "llama.cpp", "--prompt", "What is 2+2?", "--json")
    code, out, err = run(*common, "--precision-a", "ggml")
    doc = json.loads(out) if out else {}
    assert code == 1 and doc["first_divergence"]["id"] == "blk.3.ffn_out", err or doc["verdict"]
    before = [s for s in doc["stages"] if s["layer"] is not None and s["layer"] < 3]
    assert before and max(s["error"] for s in before) == 0.0  # bit for bit up to the perturbed layer
    code, out, _ = run(*common)
    doc = json.loads(out)
    assert code == 0 and doc["first_divergence"] is None, doc["verdict"]
