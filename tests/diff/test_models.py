"""`apr diff MODEL_A MODEL_B`: config, tokenizer and tensor-set differences before any forward pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from apr.diff.models import diff_models, diff_tokenizers
from apr.formats.base import TokenizerSpec
from apr.models import open_model
from tests.fixtures.cli import run
from tests.fixtures.zoo import ZooModel


def edited_copy(hf_dir: Path, out: Path, **changes: Any) -> Path:
    """A copy of an HF folder with config.json values changed (tensors shared by symlink)."""
    out.mkdir()
    for f in hf_dir.iterdir():
        (out / f.name).symlink_to(f) if f.name != "config.json" else None
    cfg = json.loads((hf_dir / "config.json").read_text()) | changes
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_same_model_as_gguf_and_hf_differs_only_in_storage(zoo: Any) -> None:
    z: ZooModel = zoo(
        "granite"
    )  # (llama's SPM GGUF and HF tokenize " Hello" differently: test_tokenizer_probe)
    d = diff_models(open_model(z.gguf), open_model(z.hf_dir))
    assert [(f.name, bool(f.storage)) for f in d.config] == [("qk_layout", True)]
    assert not d.tokenizer.differs and d.tensors == [] and not d.differs and d.verdict == "same"
    code, out, _ = run("diff", str(z.gguf), str(z.hf_dir), "--check")
    assert code == 0 and out.endswith(
        "tensor data: 21 tensors compared, identical\n=> no difference in the math\n"
    )
    assert "qk_layout" in out and "storage only" in out


def test_a_changed_rope_theta_and_eps_are_named_and_fail_check(zoo: Any, tmp_path: Path) -> None:
    z: ZooModel = zoo("llama")
    b = edited_copy(
        z.hf_dir, tmp_path / "b", rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=128
    )
    code, out, _ = run("diff", str(z.hf_dir), str(b), "--check")
    assert code == 1, out
    assert "config: 3 fields differ" in out
    for name in ("max_position", "rope_theta", "rms_eps"):
        assert name in out
    code, out, _ = run("diff", str(z.hf_dir), str(b), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["schema"] == "apr-model-diff-v1" and doc["differs"] is True
    got = {c["field"]: (c["a"], c["b"]) for c in doc["config"]}
    assert got == {"max_position": (64, 128), "rope_theta": (10000.0, 500000.0), "rms_eps": (1e-6, 1e-5)}


def test_tokenizer_and_tensor_set_differences(zoo: Any) -> None:
    a, b = zoo("qwen2"), zoo("llama")
    d = diff_models(open_model(a.gguf), open_model(b.gguf))
    assert d.tokenizer.first_token == (0, "<|endoftext|>", "<unk>")
    assert d.tokenizer.fields and d.tokenizer.differs
    missing = sorted(t.name for t in d.tensors if t.kind == "missing")
    assert missing == [f"blk.{i}.attn_{x}.bias" for i in (0, 1) for x in "kqv"]
    code, out, _ = run("diff", str(a.gguf), str(b.gguf))
    assert code == 0
    assert "first differing token: id 0: '<|endoftext|>' → '<unk>'" in out
    assert "only in A: 6 tensors" in out and "blk.0.attn_q.bias: F32 [64]  →  -" in out


def test_quantized_against_f32_differs_in_types_only(smollm2_gguf: Path, smollm2_f32_gguf: Path) -> None:
    code, out, _ = run("diff", str(smollm2_gguf), str(smollm2_f32_gguf), "--check")
    assert code == 0, out
    assert "type differs: 211 tensors (Q4_1 → F32" in out and "config: identical" in out
    assert (
        "tensor data: 61 tensors compared, identical; 211 not compared: types differ: precision only" in out
    )
    assert out.endswith(
        "=> no difference found in what was compared; not compared: the data of 211 tensors "
        "(types differ: precision only)\n"
    )


def test_a_model_against_a_trace_is_refused(zoo: Any, tmp_path: Path) -> None:
    z: ZooModel = zoo("llama")
    trace = tmp_path / "run"
    trace.mkdir()
    code, _, err = run("diff", str(z.gguf), str(trace))
    assert (code, err) == (5, f"error: cannot compare a file ({z.gguf}) with a directory ({trace})\n")


def test_bisect_prints_the_model_diff_first(zoo: Any, tmp_path: Path) -> None:
    z: ZooModel = zoo("llama")
    b = edited_copy(z.hf_dir, tmp_path / "b", rope_theta=20000.0)
    code, out, _ = run("bisect", str(z.hf_dir), str(b), "--tokens", ",".join(map(str, z.token_ids())))
    assert code == 1
    assert out.index("rope_theta") < out.index("apr bisect") < out.index("verdict")
    code, out, _ = run(
        "bisect", str(z.hf_dir), str(b), "--tokens", ",".join(map(str, z.token_ids())), "--json"
    )
    doc = json.loads(out)
    assert [c["field"] for c in doc["model_diff"]["config"]] == ["rope_theta"]
    shutil.rmtree(b)


def test_a_gemma_gguf_and_its_export_differ_only_in_storage(zoo: Any, tmp_path: Path) -> None:
    """The GGUF leaves Gemma's score scale at 0 (1/sqrt(head_dim), as llama.cpp); the export states
    query_pre_attn_scalar = head_dim: the same math. Its tokenizer.json tokenizes as the GGUF's vocab. A
    query_pre_attn_scalar that is not head_dim is a real difference."""
    z: ZooModel = zoo("gemma2")
    out = tmp_path / "hf"
    assert run("export", str(z.gguf), "-o", str(out))[0] == 0
    d = diff_models(open_model(z.gguf), open_model(out))
    assert [(f.name, f.a, f.b, bool(f.storage)) for f in d.config] == [
        ("attn_scale", 0.0, 0.25, True),
        ("norm_offset", 0.0, 1.0, True),
    ]
    assert not d.tokenizer.differs and d.verdict == "same"
    code, text, _ = run("diff", str(z.gguf), str(out), "--check")
    assert code == 0 and text.endswith("=> no difference in the math\n"), text
    other = edited_copy(out, tmp_path / "other", query_pre_attn_scalar=144)
    d = diff_models(open_model(z.gguf), open_model(other))
    assert [(f.name, bool(f.storage)) for f in d.config if f.name == "attn_scale"] == [("attn_scale", False)]
    assert d.differs


def _spm_spec(types_of: dict[str, int]) -> TokenizerSpec:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "a", "b", *types_of]
    types = [2, 3, 3, *[6] * 256, 1, 1, *types_of.values()]
    return TokenizerSpec(model="llama", tokens=tokens, token_types=types, scores=[0.0] * len(tokens))


def test_token_types_count_as_llama_cpp_acts_on_them() -> None:
    """An "<|endoftext|>" is CONTROL in llama.cpp whatever its stored type (an end-of-generation name), so
    NORMAL (llama.cpp's converter, from a tokenizer.model) against USER_DEFINED (an HF added token) is no
    difference; a user-defined "<tool>" against a normal one is: it is matched whole in text."""
    same = diff_tokenizers(_spm_spec({"<|endoftext|>": 1}), _spm_spec({"<|endoftext|>": 4}))
    assert same.first_type is None and not same.differs
    other = diff_tokenizers(_spm_spec({"<tool>": 1}), _spm_spec({"<tool>": 4}))
    assert other.first_type == (261, "1", "4") and other.differs


def test_an_hf_folder_exported_to_gguf_is_the_same_model_as_llama_cpps_conversion(
    zoo: Any, tmp_path: Path
) -> None:
    """apr's HF→GGUF export types the added "<|endoftext|>" USER_DEFINED where convert_hf_to_gguf.py wrote
    NORMAL (from tokenizer.model): llama.cpp makes both CONTROL, and `diff --check` finds no difference."""
    z: ZooModel = zoo("llama")
    out = tmp_path / "l.gguf"
    assert run("export", str(z.hf_dir), "-o", str(out))[0] == 0
    code, text, _ = run("diff", str(z.gguf), str(out), "--check")
    assert code == 0 and text.endswith("=> no difference in the math\n"), text
