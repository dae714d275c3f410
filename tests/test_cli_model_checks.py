"""What apr refuses to run rather than answer wrongly, end to end: a corrupt .apr (footer CRC), an HF folder
whose weights transformers would load differently, a model format a runtime cannot load, a folder
without config.json. Each is one `error:` line and its documented exit code, and leaves no output."""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from apr.convert.importer import import_gguf
from apr.formats.aprcodec import FOOTER_SIZE
from apr.trace import fingerprint as fp
from tests.fixtures.cli import run
from tests.fixtures.zoo import ZooModel
from tests.runtimes import write_tiny_gguf

TRACE = ("--tokens", "1,2,3", "--save-tensor", "lm_head")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fingerprint cache of this test's own, whose entries are kept at once (no racy window)."""
    monkeypatch.setenv(fp.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(fp, "RACY_NS", 0)
    return tmp_path / "cache" / fp.CACHE_NAME


@pytest.fixture
def flipped(tmp_path: Path) -> tuple[Path, str]:
    """A tiny .apr with one bit of tensor data flipped (the header CRC still holds), and its error line."""
    ok = tmp_path / "ok.apr"
    import_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", "llama"), ok)
    data = bytearray(ok.read_bytes())
    data[len(data) // 2] ^= 0x10
    bad = tmp_path / "flip.apr"
    bad.write_bytes(bytes(data))
    end = len(data) - FOOTER_SIZE
    stored = int.from_bytes(data[end:], "little")
    computed = zlib.crc32(data[:end])
    return bad, (
        f"error: {bad}: footer checksum mismatch: stored 0x{stored:08x}, computed 0x{computed:08x} "
        f"over bytes [0, {end}) (the file is corrupt)\n"
    )


def test_inspect_verify_exits_4_after_its_report(flipped: tuple[Path, str]) -> None:
    bad, error = flipped
    code, out, err = run("inspect", str(bad), "--verify", "--no-tensors")
    assert (code, err) == (4, error) and "footer CRC32 MISMATCH" in out
    code, out, err = run("inspect", str(bad), "--verify", "--no-tensors", "--json")
    assert (code, err) == (4, error) and "MISMATCH" in json.loads(out)["integrity"]  # one JSON document
    assert run("inspect", str(bad))[0] == 0  # without --verify no check is made (nor claimed)
    assert run("inspect", str(bad.with_name("ok.apr")), "--verify")[0] == 0


def test_a_trace_of_a_corrupt_apr_leaves_no_trace(
    flipped: tuple[Path, str], tmp_path: Path, cache: Path
) -> None:
    bad, error = flipped
    out = tmp_path / "t"
    code, _, err = run("trace", str(bad), *TRACE, "--save-tensor-dir", str(out))
    assert (code, err) == (4, error) and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "flip.apr", "ok.apr", "tiny.gguf"]
    assert run("trace", str(bad.with_name("ok.apr")), *TRACE, "--save-tensor-dir", str(out))[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = run("trace", str(bad), *TRACE, "--save-tensor-dir", str(out))  # a cache hit now
    assert (code, err) == (4, error)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the old trace stands
    assert json.loads(cache.read_bytes())["entries"][str(bad.resolve())]["footer"] is not None
    code, _, err = run("trace", str(bad), "--tokens", "1,2,3", "--payload")
    assert (code, err) == (4, error)


@pytest.mark.parametrize(
    "args",
    [
        ["export", "{bad}", "-o", "{tmp}/out-hf"],
        ["export", "{bad}", "-o", "{tmp}/out.gguf", "--format", "gguf"],
        ["convert", "{bad}", "-o", "{tmp}/out.apr", "--quantize", "q8_0"],
        ["convert", "{bad}", "-o", "{tmp}/out.gguf", "--quantize", "f32"],
    ],
)
def test_conversions_refuse_a_corrupt_apr(
    flipped: tuple[Path, str], tmp_path: Path, cache: Path, args: list[str]
) -> None:
    bad, error = flipped
    code, out, err = run(*(a.format(bad=bad, tmp=tmp_path) for a in args))
    assert (code, out, err) == (4, "", error)
    assert not list(tmp_path.glob("out*"))


def _two_weight_sets(zoo: Callable[[str], ZooModel], tmp_path: Path) -> Path:
    """QA's repro: a tiny HF folder split into two shards + index, then a different model.safetensors."""
    folder = tmp_path / "hf"
    shutil.copytree(zoo("llama").hf_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    shards = {f"model-0000{i}-of-00002.safetensors": part for i, part in ((1, names[:5]), (2, names[5:]))}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, folder / shard)
    weight_map = {n: shard for shard, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_file({n: t * 2 for n, t in tensors.items()}, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("engine", ["reference", "transformers"])
def test_a_folder_with_two_weight_sets_is_refused(
    zoo: Callable[[str], ZooModel], tmp_path: Path, engine: str
) -> None:
    folder = _two_weight_sets(zoo, tmp_path)
    error = (
        f"error: {folder}: holds both model.safetensors and model.safetensors.index.json (sharded weights); "
        "transformers would load model.safetensors, apr the shards: remove the stale one\n"
    )
    out = tmp_path / "t"
    code, _, err = run("trace", str(folder), *TRACE, "--engine", engine, "--save-tensor-dir", str(out))
    assert (code, err) == (4, error) and not out.exists()
    assert run("inspect", str(folder))[::2] == (4, error)


def test_llama_cpp_is_refused_what_is_not_a_gguf(zoo: Callable[[str], ZooModel], tmp_path: Path) -> None:
    hf = zoo("llama").hf_dir
    apr = tmp_path / "m.apr"
    import_gguf(zoo("llama").gguf, apr)
    for model, what, stem in ((hf, "a Hugging Face safetensors folder", hf.name), (apr, "an .apr file", "m")):
        error = (
            f"error: {model}: --engine llama.cpp runs .gguf files only, and this is {what}; make one with "
            f"`apr export {model} -o {stem}.gguf --format gguf`\n"
        )
        out = tmp_path / "t"
        code, _, err = run(
            "trace", str(model), *TRACE, "--engine", "llama.cpp", "--save-tensor-dir", str(out)
        )
        assert (code, err) == (5, error) and not out.exists()
        code, _, err = run("bisect", str(model), str(model), "--tokens", "1,2,3", "--engine-a", "llama.cpp")
        assert (code, err) == (5, error)
    code, _, err = run("trace", str(apr), *TRACE, "--engine", "transformers", "--save-tensor-dir", str(out))
    assert (code, err) == (
        5,
        f"error: {apr}: --engine transformers loads Hugging Face folders and .gguf files only, and this is "
        f"an .apr file; make one with `apr export {apr} -o m-hf/`\n",
    )


def test_an_hf_folder_without_config_json_says_so(zoo: Callable[[str], ZooModel], tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(zoo("llama").hf_dir, folder)
    (folder / "config.json").unlink()
    code, out, err = run("inspect", str(folder))
    assert (code, out) == (4, "")
    assert err.startswith(f"error: {folder}: no config.json in this Hugging Face folder (it holds ")
    assert err.endswith("copy the model's config.json into it\n") and err.count("\n") == 1
