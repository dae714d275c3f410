"""`apr inspect`, `apr import`, `apr convert`, `apr export` through the CLI, on the three formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apr.models import open_model
from apr.quant.types import QuantType
from tests.fixtures.cli import run, run_unprivileged


@pytest.mark.parametrize("fixture", ["smollm2_gguf", "smollm2_apr", "smollm2_hf"])
def test_inspect_every_format(request: pytest.FixtureRequest, fixture: str) -> None:
    path = request.getfixturevalue(fixture)
    code, out, _ = run("inspect", str(path), "--json")
    doc = json.loads(out)
    assert (
        code == 0
        and doc["format"]
        == {"smollm2_gguf": "gguf", "smollm2_apr": "apr", "smollm2_hf": "safetensors"}[fixture]
    )
    assert doc["config"]["n_layers"] == 30 and doc["config"]["vocab_size"] == 49152
    names = {t["name"]: t for t in doc["tensors"]}
    assert names["blk.0.attn_k.weight"]["shape"] == [192, 576]
    assert doc["tokenizer"] is not None
    code, out, _ = run("inspect", str(path))
    assert code == 0 and "Architecture: llama" in out and "blk.29.ffn_down.weight" in out


def test_inspect_verify_finds_a_corrupt_apr_footer(smollm2_apr: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.apr"
    data = bytearray(smollm2_apr.read_bytes())
    data[-100] ^= 0xFF  # a data byte: the header CRC still verifies, the footer CRC does not
    bad.write_bytes(bytes(data))
    code, out, _ = run("inspect", str(bad), "--verify", "--no-tensors")
    assert code == 4 and "footer CRC32 MISMATCH" in out  # reported, then exit 4 (invalid format)
    code, out, _ = run("inspect", str(smollm2_apr), "--verify", "--no-tensors")
    assert "verified" in out


def test_import_reports_what_it_converted(smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.apr"
    code, stdout, _ = run("import", str(smollm2_gguf), "-o", str(out), "--json")
    doc = json.loads(stdout)
    assert code == 0 and doc["tensors"] == 273 and doc["tied_lm_head"] is True
    assert {(c["from"], c["to"]) for c in doc["converted"]} == {("Q4_1", "F32"), ("Q8_0", "F32")}
    assert len(doc["passthrough"]) == 61  # the F32 norms, byte for byte


def test_import_quantize_q8_0_and_convert_q4_k(smollm2_gguf: Path, tmp_path: Path) -> None:
    q8 = tmp_path / "q8.apr"
    assert run("import", str(smollm2_gguf), "-o", str(q8), "--quantize", "q8_0")[0] == 0
    ck = open_model(q8)
    assert ck.info("blk.0.attn_q.weight").qtype is QuantType.Q8_0
    assert ck.info("blk.0.attn_norm.weight").qtype is QuantType.F32
    q4 = tmp_path / "q4.apr"
    code, out, _ = run("convert", str(q8), "-o", str(q4), "--quantize", "q4_k")
    assert code == 0 and "Q8_0→Q4_K ×30" in out  # only ffn_down rows (1536) are whole 256-blocks
    ck4 = open_model(q4)
    assert ck4.info("blk.0.ffn_down.weight").qtype is QuantType.Q4_K
    w8, w4 = ck.read("blk.0.ffn_down.weight"), ck4.read("blk.0.ffn_down.weight")
    assert np.linalg.norm(w4 - w8) / np.linalg.norm(w8) < 0.1


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["import", "{hf}", "-o", "{tmp}/x.apr"], 4, "apr import reads gguf files; this is safetensors"),
        (["inspect", "{tmp}/missing.gguf"], 3, "File not found"),
        (["export", "{tmp}/missing.gguf", "-o", "{tmp}/hf"], 3, "File not found"),
    ],
)
def test_errors(
    smollm2_gguf: Path, smollm2_hf: Path, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    argv = [a.format(hf=smollm2_hf, gguf=smollm2_gguf, tmp=tmp_path) for a in args]
    got, out, err = run(*argv)
    assert (got, out) == (code, "") and message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "x.apr").exists()


def test_not_a_model(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    code, _, err = run("inspect", str(junk))
    assert code == 4 and "not a model file this tool can read" in err


def test_a_read_only_target_is_named_not_the_temp_file(tmp_path: Path) -> None:
    from tests.runtimes import write_tiny_gguf

    src = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, out, err = run_unprivileged("import", str(src), "-o", str(ro / "x.apr"))
    finally:
        ro.chmod(0o755)
    assert (code, out, err) == (7, "", f"error: cannot write {ro / 'x.apr'}: Permission denied\n")
    assert list(ro.iterdir()) == []


def test_import_quantize_q4_k_falls_back_and_says_so_in_one_line(smollm2_gguf: Path, tmp_path: Path) -> None:
    """Rows of 576 are not whole 256-blocks: llama-quantize would use Q5_0; .apr has no Q5_0, so Q8_0."""
    out = tmp_path / "q4k.apr"
    code, text, _ = run("import", str(smollm2_gguf), "-o", str(out), "--quantize", "q4_k")
    assert code == 0
    assert "  211 matrices: 181 Q8_0, 30 Q4_K (rows of 576 are not a multiple of 256)\n" in text
    assert "blk.0.attn_q.weight" not in text  # the per-tensor list is behind -v / --json
    assert open_model(out).info("blk.0.attn_q.weight").qtype is QuantType.Q8_0
    code, text, _ = run(
        "import", str(smollm2_gguf), "-o", str(tmp_path / "q8.apr"), "--quantize", "q8_0", "-v"
    )
    assert code == 0 and "  211 matrices: 211 Q8_0\n" in text
    assert "    blk.0.attn_q.weight: Q4_1 → Q8_0\n" in text


def test_convert_accepts_any_input_format(smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "from-gguf.apr"
    code, text, _ = run("convert", str(smollm2_gguf), "-o", str(out), "--quantize", "q8_0")
    assert code == 0 and "211 matrices: 211 Q8_0" in text
    assert open_model(out).config == open_model(smollm2_gguf).config
