"""`apr export` of mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) to an HF folder, on the zoo's
tiny random checkpoints (tests/fixtures/zoo.py: HF folders saved by transformers' save_pretrained, F32 GGUFs
by llama.cpp's converter).

Per family, from the converter's GGUF:
- transformers loads the export with no missing, unexpected or mismatched keys, and its logits on the zoo
  ids equal its logits on the original HF folder (bit-identical: see LOGITS_TOL);
- the export holds exactly the original folder's tensors, under the same names (each stacked GGUF expert
  tensor split into save_pretrained's per-expert ones), with bit-identical values (read by the safetensors
  package, not apr); apr reads it back with the GGUF's config and the HF folder's canonical tensors.
Refusals, one line naming the culprit, nothing written: a rope_freqs no Llama 3 scaling gives;
transformers 5's fused expert gate/up stack; a tensor or config value the variant's transformers class
cannot hold (Mixtral's q/k/v bias, Qwen's per-layer sliding window); and, on reading, part of a set the
class builds from one flag, or Qwen3-MoE without the QK-norm its class always has.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from apr.errors import ModelLoadError
from apr.formats.config import QKLayout
from apr.models import open_model
from tests.fixtures.cli import run
from tests.fixtures.zoo import ZooModel

pytestmark = pytest.mark.oracle
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
# Logits tolerance: 0 (bit-identical; measured 0.0 for all three). The F32 GGUF holds the HF folder's
# float32 values exactly (Mixtral's Q/K rows permuted, which the export undoes exactly) and the config the
# same but for rms_norm_eps, which the GGUF stores as float32 (9.99999997e-07 for 1e-06): 2.5e-15 added to
# a variance of O(1), far below its float32 ulp (1.2e-7), so transformers computes the same bits.
LOGITS_TOL = 0.0


def gguf_copy(
    z: ZooModel,
    out: Path,
    *,
    add: dict[str, np.ndarray] | None = None,
    drop: Callable[[str], bool] = lambda name: False,
    kv: dict[str, tuple[Any, Any]] | None = None,
) -> Path:
    """The zoo's GGUF rewritten by gguf-py: tensors added or dropped, (value, GGUFValueType) keys added."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    src = GGUFReader(z.gguf)
    w = GGUFWriter(out, arch=z.gguf_arch)
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for key, (value, kind) in (kv or {}).items():
        w.add_key_value(key, value, kind)
    for t in src.tensors:
        if not drop(t.name):
            w.add_tensor(t.name, np.array(t.data))
    for name, data in (add or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """transformers' float32 logits (every position), after checking it loaded every tensor it has."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}, info  # missing / unexpected / mismatched keys
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def refused(model: Path, out: Path) -> str:
    """`apr export MODEL -o OUT` fails validation (exit 5) with one line and writes nothing; that line."""
    code, stdout, stderr = run("export", str(model), "-o", str(out))
    assert (code, stdout, stderr.count("\n")) == (5, "", 1), (code, stdout, stderr)
    assert not out.exists()
    return stderr


@pytest.fixture(scope="module", params=MOE)
def exported(
    request: pytest.FixtureRequest, zoo: Callable[[str], ZooModel], tmp_path_factory: pytest.TempPathFactory
) -> tuple[ZooModel, Path]:
    z = zoo(str(request.param))
    out = tmp_path_factory.mktemp(f"export-{z.family}") / "hf"
    code, _, err = run("export", str(z.gguf), "-o", str(out))
    assert code == 0, err
    return z, out


def test_transformers_loads_the_export_with_the_original_folders_logits(
    exported: tuple[ZooModel, Path],
) -> None:
    z, out = exported
    ids = z.token_ids()
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (
        z.hf_config["architectures"],
        z.hf_config["model_type"],
    )
    ours, original = hf_logits(out, ids), hf_logits(z.hf_dir, ids)
    assert ours.shape == (len(ids), z.vocab_size)
    assert float(np.max(np.abs(ours - original))) <= LOGITS_TOL


def test_the_export_holds_the_original_tensors_and_reads_back_as_the_gguf(
    exported: tuple[ZooModel, Path],
) -> None:
    z, out = exported
    ours, original = load_file(out / "model.safetensors"), load_file(z.hf_dir / "model.safetensors")
    assert sorted(ours) == sorted(original)  # per-expert names, router, shared expert and its gate
    for name, value in original.items():
        assert ours[name].dtype == value.dtype and np.array_equal(ours[name], value), name
    back, gguf, hf = open_model(out), open_model(z.gguf), open_model(z.hf_dir)
    # the export writes Q/K rows in HF order whatever the GGUF's; nothing else of the config may differ
    assert back.config == dataclasses.replace(gguf.config, qk_layout=QKLayout.HF)
    assert [t.name for t in back.tensors()] == [t.name for t in hf.tensors()]
    assert back.info("blk.0.ffn_down_exps.weight").shape[0] == gguf.config.n_experts  # stacked again
    for t in hf.tensors():
        assert np.array_equal(back.read(t.name), hf.read(t.name)), t.name


def test_rope_freqs_no_llama3_scaling_gives_is_refused_by_name(
    zoo: Callable[[str], ZooModel], tmp_path: Path
) -> None:
    """A Llama 3 GGUF exports its rope_freqs as config.json's rope_scaling (test_export.py); divisors that
    no Llama 3 scaling gives (one of them 1 % off) have no rope_scaling to say them in."""
    z = zoo("llama3")
    freqs = open_model(z.gguf).read("rope_freqs.weight").copy()
    freqs[1] *= np.float32(1.01)
    odd = gguf_copy(z, tmp_path / "odd.gguf", add={"rope_freqs.weight": freqs}, drop=lambda n: "rope" in n)
    assert refused(odd, tmp_path / "hf") == (
        "error: cannot export rope_freqs.weight: no Llama 3 rope_scaling (factor, low/high_freq_factor, "
        "original_max_position_embeddings) gives its per-frequency divisors\n"
    )


def test_a_fused_expert_gate_up_stack_is_refused_by_name(
    zoo: Callable[[str], ZooModel], tmp_path: Path
) -> None:
    """A folder of transformers 5's own parameters (mlp.experts.gate_up_proj (E, 2F, D)): apr reads it, but
    export does not split a fused stack into save_pretrained's per-expert gate_proj / up_proj yet."""
    z = zoo("qwen3_moe")
    model = transformers.AutoModelForCausalLM.from_pretrained(z.hf_dir, dtype=torch.float32)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
              str(fused / "model.safetensors"))  # fmt: skip
    (fused / "config.json").write_text(json.dumps(z.hf_config))
    assert open_model(fused).info("blk.0.ffn_gate_up_exps.weight").shape == (8, 64, 64)
    assert refused(fused, tmp_path / "hf").startswith(
        "error: tensor blk.0.ffn_gate_up_exps.weight has no Hugging Face name; cannot export it "
        "(apr export writes the tensors Qwen3MoeForCausalLM has: "
    )


def test_what_the_variants_transformers_class_cannot_hold_is_refused(
    zoo: Callable[[str], ZooModel], tmp_path: Path
) -> None:
    """llama.cpp reads q/k/v biases in a Mixtral ("llama") GGUF; MixtralForCausalLM has none. A window in a
    Qwen2-MoE GGUF applies to every layer; Qwen's use_sliding_window means a per-layer one."""
    from gguf import GGUFValueType

    mixtral = zoo("mixtral")
    bias = {f"blk.{i}.attn_q.bias": np.full(64, 0.1, np.float32) for i in range(2)}
    with_bias = gguf_copy(mixtral, tmp_path / "bias.gguf", add=bias)
    assert open_model(with_bias).config.qkv_bias  # apr and llama.cpp run it
    assert refused(with_bias, tmp_path / "hf").startswith(
        "error: tensor blk.0.attn_q.bias has no Hugging Face name; cannot export it (apr export writes "
        "the tensors MixtralForCausalLM has: "
    )
    # read from an HF folder, such a bias would be one transformers ignores: refused as unused
    folder = tmp_path / "bias-hf"
    folder.mkdir()
    tensors = load_file(mixtral.hf_dir / "model.safetensors")
    save_file(tensors | {"model.layers.0.self_attn.q_proj.bias": bias["blk.0.attn_q.bias"]},
              str(folder / "model.safetensors"))  # fmt: skip
    (folder / "config.json").write_text(json.dumps(mixtral.hf_config))
    with pytest.raises(ModelLoadError, match=r"tensor model\.layers\.0\.self_attn\.q_proj\.bias is not used"):
        open_model(folder)
    window = {"qwen2moe.attention.sliding_window": (4, GGUFValueType.UINT32)}
    windowed = gguf_copy(zoo("qwen2_moe"), tmp_path / "window.gguf", kv=window)
    assert open_model(windowed).config.sliding_window == 4
    assert refused(windowed, tmp_path / "hf") == (
        "error: cannot export 'qwen2moe' to Hugging Face: its config.json would say 'use_sliding_window' = "
        "True: Qwen's per-layer sliding window (use_sliding_window: true) is not implemented\n"
    )


@pytest.mark.parametrize(
    ("family", "dropped", "message"),
    [
        ("qwen2_moe", "attn_k.bias", r"tensor blk\.0\.attn_k\.bias is missing \(blk\.0\.attn_q\.bias is "
                                     r"present, and Qwen2MoeForCausalLM has 3 such tensors or none\)$"),
        ("qwen3_moe", "attn_q_norm.weight", r"tensor blk\.0\.attn_q_norm\.weight is missing$"),
    ],
)  # fmt: skip
def test_what_the_variants_transformers_class_cannot_build_is_refused_on_reading(
    zoo: Callable[[str], ZooModel], tmp_path: Path, family: str, dropped: str, message: str
) -> None:
    """So that no export can write it: transformers would initialise what is missing (Qwen2-MoE's k bias
    from qkv_bias, Qwen3-MoE's QK-norm always) instead of leaving it out."""
    z = zoo(family)
    partial = gguf_copy(z, tmp_path / "partial.gguf", drop=lambda name: name.endswith(dropped))
    with pytest.raises(ModelLoadError, match=message):
        open_model(partial)
