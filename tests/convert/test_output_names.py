"""`apr import/convert/export -o`: never over the input, never under a name that says another format."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from apr.models import open_model
from tests.fixtures.cli import run
from tests.fixtures.zoo import ZooModel


@pytest.fixture
def models(zoo: Callable[[str], ZooModel], tmp_path: Path) -> Path:
    """tmp_path with m.gguf (the llama zoo GGUF), m.apr (its import) and hf/ (its HF folder)."""
    shutil.copy(zoo("llama").gguf, tmp_path / "m.gguf")
    assert run("import", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "m.apr"))[0] == 0
    shutil.copytree(zoo("llama").hf_dir, tmp_path / "hf")
    return tmp_path


def contents(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import", "m.gguf", "-o", "m.gguf"], "-o m.gguf is the input model itself: choose another output"),
        (["convert", "m.apr", "-o", "m.apr", "--quantize", "q8_0"], "-o m.apr is the input model itself"),
        (["convert", "m.gguf", "-o", "m.gguf", "--quantize", "q8_0"], "-o m.gguf is the input model itself"),
        (["export", "m.gguf", "-o", "m.gguf"], "-o m.gguf is the input model itself"),
        (["export", "hf", "-o", "hf"], "-o hf is the input model itself"),
        (
            ["export", "m.gguf", "-o", "out.gguf", "--format", "safetensors"],
            "--format safetensors contradicts the suffix of -o out.gguf: drop --format, or choose another "
            "name",
        ),
        (
            ["export", "m.gguf", "-o", "out.apr"],
            "-o out.apr names an apr file, but a Hugging Face export writes a folder",
        ),
        (
            ["export", "m.gguf", "-o", "out.safetensors", "--format", "gguf"],
            "--format gguf contradicts the suffix of -o out.safetensors",
        ),
        (
            ["import", "m.gguf", "-o", "x.gguf"],
            "-o x.gguf names a gguf file, but apr import writes an .apr file: choose a name ending in .apr",
        ),
        (
            ["convert", "m.apr", "-o", "c.safetensors", "--quantize", "q8_0"],
            "-o c.safetensors names a safetensors file, but apr convert writes an .apr file, or a GGUF for "
            "-o NAME.gguf (a Hugging Face folder: apr export)",
        ),
        (  # the output kind is what is wrong, not the type
            ["convert", "m.apr", "-o", "c4.safetensors", "--quantize", "f16"],
            "-o c4.safetensors names a safetensors file, but apr convert writes an .apr file",
        ),
        (
            ["convert", "m.apr", "-o", "c4.apr", "--quantize", "f16"],
            "--quantize f16: an .apr file takes q4_k, q6_k, q8_0 (other types: a .gguf output)",
        ),
        (  # the trailing / says folder: neither written as the file out.gguf nor as an HF folder so named
            ["export", "m.gguf", "-o", "out.gguf/"],
            "-o out.gguf/ names a folder, but a folder named out.gguf would pass for a gguf file: choose a "
            "folder name without a model suffix",
        ),
        (
            ["export", "m.gguf", "-o", "out/", "--format", "gguf"],
            "-o out/ names a folder, but --format gguf writes one file: name the file",
        ),
    ],
)
def test_refused_outputs_change_nothing(
    models: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(models)
    before = contents(models)
    code, out, err = run(*args)
    assert (code, out) == (5, "") and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert contents(models) == before


def test_export_to_a_gguf_name_writes_a_gguf(models: Path) -> None:
    """No --format: the .gguf suffix says gguf. A name without a model suffix is taken as given."""
    out = models / "out.gguf"
    old = os.umask(0o022)
    try:
        code, _, err = run("export", str(models / "m.apr"), "-o", str(out))
    finally:
        os.umask(old)
    assert code == 0, err
    assert out.is_file() and open_model(out).format_name == "gguf"
    assert out.stat().st_mode & 0o777 == 0o644  # as open() makes it, not mkstemp's 0600
    assert run("import", str(models / "m.gguf"), "-o", str(models / "plain"))[0] == 0
    assert open_model(models / "plain").format_name == "apr"
    assert run("export", str(models / "m.gguf"), "-o", str(models / "plain.d"), "--format", "gguf")[0] == 0
    assert open_model(models / "plain.d").format_name == "gguf"


@pytest.mark.parametrize(
    "args",
    [
        ["import", "m.gguf", "-o", "out/"],
        ["convert", "m.apr", "-o", "out/", "--quantize", "q8_0"],
        ["bisect", "m.gguf", "m.gguf", "--report", "out/"],
    ],
    ids=["import", "convert", "bisect-report"],
)
def test_a_file_output_ending_in_a_slash_is_a_usage_error(
    models: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """`-o out/` used to write the file `out` (pathlib drops the slash)."""
    monkeypatch.chdir(models)
    before = contents(models)
    code, out, err = run(*args)
    option = "'-o' / '--output'" if args[0] != "bisect" else "'--report'"
    assert (code, out) == (2, "")
    assert err.startswith(
        f"error: Invalid value for {option}: out/ names a folder (it ends in /), but this writes one file: "
        "name the file."
    ), err
    assert contents(models) == before and not (models / "out").exists()


def test_export_to_a_name_ending_in_a_slash_writes_a_folder(models: Path) -> None:
    code, _, err = run("export", str(models / "m.gguf"), "-o", f"{models / 'new'}/")
    assert code == 0, err
    assert open_model(models / "new").format_name == "safetensors"
