"""Hostile files get one-line FormatErrors (issue 14, items 1-3): bounded JSON, regular files only,
confined paths, symlink loops named, third-party panics caught at the boundary."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from apr.errors import FormatError
from apr.formats.files import confined, read_regular
from apr.formats.jsonio import parse_json
from apr.formats.tokenizer_bpe import load
from apr.models import open_model
from tests.fixtures.cli import run
from tests.fuzz.seeds import write_all


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_all(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b"[" * 100_000, "x nests 100000 levels deep (at most 64)"),
        (b'{"a": ' + b"7" * 5000 + b"}", "x holds an integer of 5000 digits (at most 40)"),
        (b'{"a": 1e400}', "x holds a number out of range for a 64-bit float: 1e400"),
        (b'{"a": NaN}', "x is not valid JSON: non-standard constant NaN"),
        (b'{"a": "\\ud800"}', "x holds a string with an unpaired surrogate escape"),
        (b'{"a": "\xff"}', "x is not valid UTF-8 (byte 7)"),
        (b'{"a": }', "x is not valid JSON: Expecting value (char 6)"),
    ],
)
def test_bounded_json(doc: bytes, message: str) -> None:
    with pytest.raises(FormatError) as e:
        parse_json(doc, "x")
    assert str(e.value) == message


def test_brackets_inside_strings_do_not_count() -> None:
    assert parse_json(b'{"a": "[[[[\\"[[[", "b": ["]]]"]}', "x", max_depth=2) == {
        "a": '[[[["[[[',
        "b": ["]]]"],
    }


def _hf(seeds: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(seeds["safetensors"], tmp_path / "hf"))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('"a bare string"', "config.json: must be a JSON object, found a string"),
        ("[" * 1000 + "]" * 1000, "config.json nests 1000 levels deep (at most 64)"),
        ('{"hidden_size": ' + "9" * 4400 + "}", "config.json holds an integer of 4400 digits"),
        ('{"rope_theta": 1e400}', "config.json holds a number out of range for a 64-bit float"),
    ],
)
def test_hostile_config_json(seeds: dict[str, Path], tmp_path: Path, config: str, message: str) -> None:
    hf = _hf(seeds, tmp_path)
    (hf / "config.json").write_text(config)
    code, out, err = run("inspect", str(hf))
    assert (code, out) == (4, "") and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_shard_index_paths_stay_inside(seeds: dict[str, Path], tmp_path: Path) -> None:
    hf = _hf(seeds, tmp_path)
    (hf / "model.safetensors").rename(hf / "model-00001-of-00001.safetensors")
    index = {"weight_map": {"model.norm.weight": "../../../../etc/passwd"}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError) as e:
        open_model(hf)
    assert str(e.value) == f"{hf / 'model.safetensors.index.json'}: path '../../../../etc/passwd' leaves {hf}"


def test_confined_resolves_symlinks(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "out").symlink_to("/etc")
    with pytest.raises(FormatError, match="leaves"):
        confined(tmp_path / "d", "out/passwd", "m.json")
    assert confined(tmp_path / "d", "x/../y.bin", "m.json") == tmp_path / "d" / "x/../y.bin"


def test_a_fifo_model_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    code, _, err = run("inspect", str(fifo))
    assert (code, err) == (4, f"error: {fifo}: is a FIFO, not a regular file\n")


def test_a_symlink_to_a_device_is_never_read(tmp_path: Path) -> None:
    link = tmp_path / "zero.gguf"
    link.symlink_to("/dev/zero")
    code, _, err = run("inspect", str(link))
    assert (code, err) == (4, f"error: {link}: is a character device, not a regular file\n")
    with pytest.raises(FormatError, match="is a character device"):
        read_regular(link, 1 << 20)


def test_a_symlink_loop_is_named(tmp_path: Path) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.symlink_to(b)
    b.symlink_to(a)
    code, _, err = run("inspect", str(a))
    assert (code, err) == (4, f"error: {a}: symlink loop\n")


def test_read_regular_refuses_oversized_files(tmp_path: Path) -> None:
    p = tmp_path / "big.json"
    p.write_bytes(b" " * 2000)
    with pytest.raises(FormatError, match=f"{p}: 2000 bytes, more than the 1000 this file may have"):
        read_regular(p, 1000)


class PanicException(BaseException):
    """What pyo3 raises on a Rust panic (its name is what the boundary recognises)."""


def test_a_tokenizers_panic_becomes_a_format_error() -> None:
    def panics() -> None:
        raise PanicException("range end index 18446744073709551609 out of range\nstack backtrace: ...")

    with pytest.raises(FormatError) as e:
        load(panics, "tokenizer.json: ")
    assert str(e.value) == (
        "tokenizer.json: cannot build the tokenizer: the tokenizers library panicked: "
        "range end index 18446744073709551609 out of range"
    )
    with pytest.raises(KeyboardInterrupt):
        load(lambda: (_ for _ in ()).throw(KeyboardInterrupt()))


def test_a_hostile_merge_list_panic_is_one_line(seeds: dict[str, Path], tmp_path: Path) -> None:
    """A real panic inside `tokenizers` (BpeBuilder slices each merged token past a prefix longer than it)."""
    hf = _hf(seeds, tmp_path)
    doc = json.loads((hf / "tokenizer.json").read_text())
    doc["model"]["continuing_subword_prefix"] = "x" * 20
    (hf / "tokenizer.json").write_text(json.dumps(doc))
    code, out, err = run(
        "trace", str(hf), "--prompt", "ab", "--save-tensor", "all", "--save-tensor-dir", str(tmp_path / "t")
    )
    assert (code, out[-1:]) == (4, "\n") and err.count("\n") == 1, err
    assert err.startswith(
        f"error: {hf / 'tokenizer.json'}: cannot build the tokenizer: the tokenizers library panicked"
    )
