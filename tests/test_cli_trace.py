"""`apr trace` end to end on the real SmolLM2 GGUF: output, layout, manifest, stale files, determinism."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from apr.stages import Stage, StageId
from apr.trace import format as aprt
from apr.trace.estimate import MANIFEST_PER_FILE, human
from apr.trace.plan import TracePlan
from apr.trace.writer import TraceWriter
from apr.version import __version__
from tests.fixtures.cli import run, run_unprivileged, trace_all
from tests.fixtures.traces import run_info

IDS = [1780, 314, 216, 34, 27, 34, 47]


def free(path: Path) -> int:
    return shutil.disk_usage(path).free


def test_save_tensor_output_matches_aprender(smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    before = free(tmp_path)  # the run reads it in between: other processes' writes and deletes move it
    code, stdout, stderr = run(
        "trace", str(smollm2_gguf), "--save-tensor", "embedding,lm_head", "--save-tensor-dir", str(out)
    )
    shown = {human(before), human(free(tmp_path))}
    estimate = 12 + 4 * 7 * 576 + 12 + 4 * 49152 + 2 * MANIFEST_PER_FILE
    assert (code, stderr) == (0, "")
    disk = f"Disk:         ~{human(estimate)} estimated ("
    seen = stdout[stdout.index(disk) + len(disk) :].split(" free)\n", 1)[0]
    assert seen in shown, (seen, shown)
    stdout = stdout.replace(f"({seen} free)", "(FREE free)", 1)
    assert stdout.startswith(
        "=== apr trace --save-tensor (GGUF) ===\n"
        f"Model:        {smollm2_gguf}\nStages:       embedding,lm_head\nLayers:       0..1\n"
        f"Output dir:   {out}\n\n"
        'Test prompt:  "What is 2+2?"\n'
        "Token ids:    [1780, 314, 216, 34, 27, 34, 47] (7 tokens)\n\n"
        f"Disk:         ~{human(estimate)} estimated (FREE free)\n\n"
        "Wrote 2 stage tensor file(s):\n"
        f"  {out}/layer-0/embedding.bin ({12 + 4 * 7 * 576} bytes)\n"
        f"  {out}/lm_head.bin ({12 + 4 * 49152} bytes)\n"
    )
    assert "Forward pass succeeded — 30 layer activations, 49152 logits" in stdout
    assert (out / "lm_head.bin").read_bytes()[:12] == bytes.fromhex("41505254ffffffff") + (49152).to_bytes(
        4, "little"
    )


def test_all_stages_layers_and_manifest(smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    code, stdout, _ = run(
        "trace",
        str(smollm2_gguf),
        "--save-tensor",
        "ALL",
        "--save-tensor-layers",
        "28..30",
        "--save-tensor-dir",
        str(out),
        "--lm-head-all",
    )
    assert code == 0
    assert "Wrote 34 stage tensor file(s):" in stdout  # 2 layers × 16 + final_norm + lm_head (no embedding)
    assert "  qkv_bias at layer(s) 28..30: the model has no QKV bias\n" in stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["schema"] == "apr-trace-manifest-v1" and m["token_ids"] == IDS
    assert m["model"]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert m["qk_layout"] == "gguf-interleaved" and m["engine"]["name"] == "reference"
    files = {f["path"]: f for f in m["files"]}
    assert files["layer-28/attn_scores.bin"]["shape"] == [9, 7, 7]
    assert files["layer-28/attn_scores.bin"]["dims"] == ["head", "query", "key"]
    assert files["lm_head.bin"]["shape"] == [7, 49152]
    for rel, f in files.items():
        data = (out / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
        assert aprt.decode_header(data).count == int(np.prod(f["shape"]))
    scores = np.fromfile(out / "layer-29/attn_scores.bin", "<f4", offset=12).reshape(9, 7, 7)
    probs = np.fromfile(out / "layer-29/attn_softmax.bin", "<f4", offset=12).reshape(9, 7, 7)
    assert np.all(np.triu(scores, 1) == 0) and np.all(np.triu(probs, 1) == 0)
    assert np.allclose(probs.sum(-1), 1, atol=1e-6)


def test_two_runs_are_byte_identical(smollm2_gguf: Path, tmp_path: Path) -> None:
    def digest(d: Path) -> dict[str, str]:
        return {
            p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*"))
            if p.is_file()
        }

    for name in ("a", "b"):
        assert trace_all(smollm2_gguf, tmp_path / name)[0] == 0
    a, b = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert len(a) == 1 + 30 * 16 + 2 + 1 and a == b  # + manifest.json


def test_default_output_dir_is_beside_the_model(smollm2_gguf: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.symlink_to(smollm2_gguf)
    assert run("trace", str(model), "--save-tensor", "final_norm")[0] == 0
    assert (tmp_path / "m-trace" / "final_norm.bin").is_file()


def test_stale_files_are_removed_and_reported(smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    aprt.write_aprt(out / "layer-7" / "ffn_up.bin", 7, np.ones(3, np.float32))
    (out / "notes.txt").write_text("mine")
    code, stdout, _ = run(
        "trace", str(smollm2_gguf), "--save-tensor", "ffn_up", "--save-tensor-dir", str(out)
    )
    assert code == 0 and "Removed 1 stale stage file(s) of an earlier run" in stdout
    assert f"  {out / 'layer-7' / 'ffn_up.bin'}\n" in stdout
    assert not (out / "layer-7" / "ffn_up.bin").exists() and (out / "notes.txt").read_text() == "mine"
    assert "Wrote 1 stage tensor file(s):" in stdout


def test_foreign_file_named_like_a_stage_is_refused(smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    (out / "layer-0").mkdir(parents=True)
    (out / "layer-0" / "ffn_up.bin").write_bytes(b"not a trace")
    code, _, stderr = run(
        "trace", str(smollm2_gguf), "--save-tensor", "ffn_up", "--save-tensor-dir", str(out)
    )
    assert code == 5 and "is named like a stage file but is not an APRT file; refusing" in stderr
    assert (out / "layer-0" / "ffn_up.bin").read_bytes() == b"not a trace"


def test_a_failed_run_leaves_none_of_its_files(tmp_path: Path) -> None:
    plan = TracePlan.from_cli("embedding,attn_norm", "0..2")
    out = tmp_path / "t"
    with pytest.raises(RuntimeError), TraceWriter(out, plan, run_info()) as w:
        w(StageId(Stage.EMBEDDING, 0), np.ones((3, 8), np.float32))
        w(StageId(Stage.ATTN_NORM, 0), np.ones((3, 8), np.float32))
        w.flush()
        assert len(list(tmp_path.rglob("*.bin"))) == 2 and not out.exists()  # in a temporary sibling
        raise RuntimeError("engine failed at layer 1")
    assert list(tmp_path.rglob("*")) == []  # no trace, no temporary directory, no lock file


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--save-tensor", "moe_router"], 5, "stage moe_router exists only in mixture-of-experts models"),
        (
            ["--save-tensor", "ffn_up", "--save-tensor-layers", "29..31"],
            5,
            "layer range 29..31 is outside the model's 30 layers (valid: 0..30)",
        ),
        (["--save-tensor", "bogus"], 5, 'unknown save-tensor stage "bogus"'),
        (["--save-tensor", "ffn_up", "--save-tensor-layers", "1-2"], 5, "expected `START..END`"),
    ],
)
def test_plan_errors(smollm2_gguf: Path, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    got, _, stderr = run("trace", str(smollm2_gguf), "--save-tensor-dir", str(tmp_path / "t"), *args)
    assert got == code and message in stderr and stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert not (tmp_path / "t").exists()


def test_plan_errors_come_before_the_model_is_opened(tmp_path: Path) -> None:
    code, _, stderr = run("trace", str(tmp_path / "missing.gguf"), "--save-tensor", "bogus")
    assert code == 5 and "unknown save-tensor stage" in stderr
    code, _, stderr = run("trace", str(tmp_path / "missing.gguf"), "--save-tensor", "embedding")
    assert (code, stderr) == (3, f"error: File not found: {tmp_path / 'missing.gguf'}\n")


def test_not_a_model_exit_4(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 20)
    code, _, stderr = run("trace", str(bad), "--save-tensor", "embedding")
    assert code == 4 and stderr.startswith("error: ") and stderr.count("\n") == 1


def test_payload_json_has_aprenders_keys(smollm2_gguf: Path) -> None:
    code, stdout, _ = run("trace", str(smollm2_gguf), "--payload", "--json")
    doc = json.loads(stdout)
    assert code == 0 and list(doc) == [
        "format",
        "architecture",
        "num_layers",
        "hidden_dim",
        "vocab_size",
        "num_heads",
        "num_kv_heads",
        "prompt",
        "encoded_tokens",
        "embedding",
        "layers",
        "final_norm",
        "logits_stats",
        "logits",
    ]
    assert doc["encoded_tokens"] == IDS and len(doc["layers"]) == 30
    assert set(doc["layers"][0]) >= {
        "layer_idx",
        "attn_norm",
        "qkv",
        "attn_out",
        "ffn_norm",
        "ffn_out",
        "output",
    }
    assert doc["embedding"]["count"] == 7 * 576 and len(doc["logits"]["top_k"]) == 5


def test_payload_text_and_skeleton(smollm2_apr: Path) -> None:
    code, stdout, _ = run("trace", str(smollm2_apr), "--payload")
    assert code == 0 and "LAYER-BY-LAYER ACTIVATIONS:" in stdout and "Top 5 predictions:" in stdout
    code, stdout, _ = run("trace", str(smollm2_apr), "--json", "--layer", "block_2")
    doc = json.loads(stdout)
    assert doc["stats_source"] == "metadata-only" and [x["name"] for x in doc["layers"]] == [
        "transformer_block_2",
        "transformer_block_20",
        "transformer_block_21",
        "transformer_block_22",
        "transformer_block_23",
        "transformer_block_24",
        "transformer_block_25",
        "transformer_block_26",
        "transformer_block_27",
        "transformer_block_28",
        "transformer_block_29",
    ]
    code, stdout, _ = run("trace", str(smollm2_apr), "--json", "--layer", "nothing")
    assert 'layer filter "nothing" matched 0 of 32 layers' in json.loads(stdout)["notes"]


@pytest.mark.parametrize(("engine", "extra"), [("transformers", "transformers"), ("llama.cpp", "llamacpp")])
def test_missing_extra_names_it_and_exits_9(
    smollm2_gguf: Path, tmp_path: Path, engine: str, extra: str
) -> None:
    """A real process where the extra's package cannot be imported (a shadowing package that raises)."""
    import os
    import subprocess
    import sys

    for pkg in ("torch", "transformers", "llama_cpp"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("raise ImportError('not installed here')\n")
    env = os.environ | {"PYTHONPATH": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "apr",
        "trace",
        str(smollm2_gguf),
        "--engine",
        engine,
        "--save-tensor",
        "lm_head",
        "--save-tensor-dir",
        str(tmp_path / "t"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 9
    assert r.stderr == (  # apr is not on PyPI: say what to run from a checkout and from a wheel
        f"error: --engine {engine} needs the optional extra [{extra}]: from a checkout, "
        f"pip install -e '.[{extra}]' (make dev installs every extra); from a wheel, "
        f"pip install 'apr-{__version__}-py3-none-any.whl[{extra}]'\n"
    )
    assert not (tmp_path / "t").exists()


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    from tests.runtimes import write_tiny_gguf

    return write_tiny_gguf(tmp_path / "tiny.gguf", "llama")


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Callable[[Path, int], Path]]:
    """Make directories unwritable (restored afterwards, so tmp_path can be cleaned up)."""
    done: list[Path] = []

    def lock(d: Path, mode: int) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(mode)
        done.append(d)
        return d

    yield lock
    for d in done:
        d.chmod(0o755)


def test_an_empty_read_only_folder_names_the_file_it_cannot_write(
    tiny_gguf: Path, tmp_path: Path, locked: Callable[[Path, int], Path]
) -> None:
    out = locked(tmp_path / "ro", 0o555)
    code, stdout, stderr = run_unprivileged(
        "trace", str(tiny_gguf), "--save-tensor", "lm_head", "--save-tensor-dir", str(out), "-q"
    )
    assert (code, stdout) == (7, "")
    assert stderr == f"error: cannot write to {out}: Permission denied\n"  # not a temp name


def test_a_folder_it_may_not_change_is_not_called_stale(
    tiny_gguf: Path, tmp_path: Path, locked: Callable[[Path, int], Path]
) -> None:
    """No search permission: even removing an old manifest.json fails, and there are no stale files."""
    out = locked(tmp_path / "r-only", 0o444)
    code, _, stderr = run_unprivileged(
        "trace", str(tiny_gguf), "--save-tensor", "lm_head", "--save-tensor-dir", str(out), "-q"
    )
    assert (code, stderr) == (7, f"error: cannot write to {out}: Permission denied\n")


def test_a_stale_file_it_cannot_remove_is_named(
    tiny_gguf: Path, tmp_path: Path, locked: Callable[[Path, int], Path]
) -> None:
    out = tmp_path / "t"
    stale = out / "layer-1" / "ffn_up.bin"
    aprt.write_aprt(stale, 1, np.ones(3, np.float32))
    locked(stale.parent, 0o555)
    code, _, stderr = run_unprivileged(
        "trace", str(tiny_gguf), "--save-tensor", "lm_head", "--save-tensor-dir", str(out), "-q"
    )
    assert (code, stderr) == (7, f"error: cannot remove stale trace file {stale}: Permission denied\n")


def test_a_quant_type_apr_cannot_read_names_the_tensor_and_exits_4(tmp_path: Path) -> None:
    """A real GGUF holding a Q8_1 tensor (ggml's activation type, which gguf-py cannot dequantize either):
    inspect lists it, trace fails on it with exit 4."""
    from gguf import GGMLQuantizationType, GGUFWriter

    from tests.runtimes import write_tiny_gguf

    src = write_tiny_gguf(tmp_path / "src.gguf", "llama")  # copy its metadata and tensors, change one type
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(src)
    w = GGUFWriter(tmp_path / "iq.gguf", arch="llama")
    for key, field in r.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name == "blk.0.ffn_up.weight":  # 96 rows of 64: 2 Q8_1 blocks of 32 each (gguf-py sizes them
            # at 40 bytes, ggml at 36: apr reads ggml's 72 bytes per row; the rest is padding it never reads)
            w.add_tensor(t.name, np.zeros((96, 80), np.uint8), raw_dtype=GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, out, _ = run("inspect", str(tmp_path / "iq.gguf"))
    assert code == 0 and "Q8_1" in out
    code, _, err = run(
        "trace",
        str(tmp_path / "iq.gguf"),
        "--save-tensor",
        "lm_head",
        "--save-tensor-dir",
        str(tmp_path / "t"),
    )
    assert code == 4 and err.count("\n") == 1
    assert "tensor 'blk.0.ffn_up.weight' has type Q8_1, which apr cannot dequantize" in err
