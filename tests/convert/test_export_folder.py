"""`apr export -o DIR`: DIR ends up holding exactly what the export wrote, is replaced whole or not at all,
and a folder holding the user's own files is refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import apr.convert.export as export_module
from apr.convert.export import export_safetensors
from apr.errors import AprIOError
from apr.models import open_model
from tests.fixtures.cli import run
from tests.fixtures.zoo import ZooModel


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def qwen2_folder_with_shards(zoo: Callable[[str], ZooModel], tmp_path: Path) -> Path:
    """The qwen2 zoo folder (tokenizer, generation config) plus the shards and index of a sharded save."""
    old = tmp_path / "mix"
    shutil.copytree(zoo("qwen2").hf_dir, old)
    (old / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (old / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    return old


def test_export_into_another_models_folder_leaves_only_what_it_wrote(
    zoo: Callable[[str], ZooModel], tmp_path: Path
) -> None:
    old = qwen2_folder_with_shards(zoo, tmp_path)
    llama = zoo("llama")
    code, out, err = run("export", str(llama.gguf), "-o", str(old), "--json")
    assert code == 0, err
    written = {Path(f).name for f in json.loads(out)["files"]}
    files = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"}
    assert {p.name for p in old.iterdir()} == written == files
    model = open_model(old)
    spec = model.tokenizer_spec()
    assert model.config.architecture == "llama" and spec is not None
    gguf_spec = open_model(llama.gguf).tokenizer_spec()
    assert gguf_spec is not None and list(spec.tokens) == list(gguf_spec.tokens)  # llama's, not qwen2's
    assert [p.name for p in tmp_path.iterdir()] == ["mix"]  # no temporary folder left beside it
    empty, new = tmp_path / "empty", tmp_path / "a" / "new"
    empty.mkdir()
    for folder in (empty, new):
        assert run("export", str(llama.gguf), "-o", str(folder))[0] == 0
        assert {p.name for p in folder.iterdir()} == written


def test_export_refuses_a_folder_holding_other_files_and_leaves_it_alone(
    zoo: Callable[[str], ZooModel], tmp_path: Path
) -> None:
    old = qwen2_folder_with_shards(zoo, tmp_path)
    (old / "notes.txt").write_text("mine")
    (old / "runs").mkdir()
    before = {p.name for p in old.iterdir()}
    files = {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()}
    code, out, err = run("export", str(zoo("llama").gguf), "-o", str(old))
    assert (code, out) == (5, "")
    assert err == (
        f"error: {old} holds files that are not part of a model folder (notes.txt, runs/); an export "
        "replaces the folder whole: choose a new or empty directory\n"
    )
    assert {p.name for p in old.iterdir()} == before
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix"]


@pytest.mark.parametrize(("fault", "raised"), [(KeyboardInterrupt, KeyboardInterrupt), (OSError, AprIOError)])
def test_an_export_cut_short_leaves_the_old_folder_exactly_as_it_was(
    zoo: Callable[[str], ZooModel],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: type[BaseException],
    raised: type[BaseException],
) -> None:
    """Ctrl-C (or a failing write) after the weights and config.json are written, before the tokenizer."""
    old = qwen2_folder_with_shards(zoo, tmp_path)
    before = snapshot(old)

    def cut(*args: object) -> list[str]:
        raise fault("cut short")

    monkeypatch.setattr(export_module, "_write_tokenizer", cut)
    with pytest.raises(raised):
        export_safetensors(open_model(zoo("qwen3").gguf), old)
    assert snapshot(old) == before
    assert [p.name for p in tmp_path.iterdir()] == ["mix"]
