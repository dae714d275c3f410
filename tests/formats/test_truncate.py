"""A model file truncated or replaced while apr has it open: a clean one-line error (exit 4), never SIGBUS.

Tensor bytes are read with pread from a descriptor held open (apr.formats.tensorio), so a read past the new
end of a shrunk file comes back short instead of faulting a mapping. The subprocess tests truncate a real
SmolLM2 checkpoint (GGUF, .apr, HF safetensors) during `apr trace`: the run is stopped (SIGSTOP) as soon as it
has written its first stage file, the file is cut to 4 KiB, and the run continued, so the shrink path is
exercised every time, not by luck of timing; the same procedure on the previous (mmap) readers died with
SIGBUS (exit -7, nothing on stderr).
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from apr.convert.importer import import_gguf
from apr.engine.weights import Weights
from apr.errors import FormatError
from apr.models import open_model
from apr.stages import no_tap
from tests.fixtures.zoo import ZooModel

IDS = ",".join(str(100 + 37 * i % 4000) for i in range(128))
CUT = 4096  # bytes left: the header's start, no tensor data
TRUNCATED = r"needs bytes \d+\.\.\d+, but the file now has 4096 bytes \(truncated after apr opened it\?\)"


def _zoo_files(zoo_model: ZooModel, fmt: str, tmp: Path) -> tuple[Path, Path]:
    """(path to open, file to truncate) for a private copy of the zoo llama in `fmt`."""
    if fmt == "gguf":
        path = Path(shutil.copy(zoo_model.gguf, tmp / "m.gguf"))
        return path, path
    if fmt == "apr":
        import_gguf(zoo_model.gguf, tmp / "m.apr")
        return tmp / "m.apr", tmp / "m.apr"
    folder = Path(shutil.copytree(zoo_model.hf_dir, tmp / "hf"))
    return folder, folder / "model.safetensors"


@pytest.mark.parametrize("fmt", ["gguf", "apr", "safetensors"])
def test_every_read_of_a_file_cut_after_opening_is_a_format_error(
    zoo: Callable[[str], ZooModel], fmt: str, tmp_path: Path
) -> None:
    path, data_file = _zoo_files(zoo("llama"), fmt, tmp_path)
    model = open_model(path)
    infos = sorted(model.tensors(), key=lambda t: t.offset)
    first, last = infos[0], [t for t in infos if len(t.shape) == 2][-1]  # the last matrix in the file
    assert first.offset + first.nbytes <= last.offset and last.nbytes > 2
    keep = model.read(first.name)
    os.truncate(data_file, last.offset + 1)  # the last tensor loses all but one byte
    np.testing.assert_array_equal(model.read(first.name), keep)  # bytes still there read as before
    where = rf"tensor '?{last.source_name or last.name}'?: needs bytes (\d+)\.\.(\d+)"
    now = rf", but the file now has {last.offset + 1} bytes \(truncated after apr opened it\?\)$"
    reads = {
        "read": lambda: model.read(last.name),
        "read_rows": lambda: model.read_rows(last.name, np.array([last.shape[0] - 1])),  # its last row
        "raw": lambda: model.raw(last.name),
        "raw_range": lambda: model.raw_range(last.name, last.nbytes - 2, last.nbytes),
    }
    for what, read in reads.items():
        with pytest.raises(FormatError, match=where + now) as err:
            read()
        found = re.search(where, str(err.value))
        assert found is not None, what
        lo, hi = int(found[1]), int(found[2])  # the bytes asked for: inside the tensor, past the cut
        assert last.offset <= lo < hi <= last.offset + last.nbytes and hi > last.offset + 1, what
    model.close()


@pytest.mark.parametrize("fmt", ["gguf", "apr", "safetensors"])
def test_nothing_is_mapped_after_opening(
    zoo: Callable[[str], ZooModel], fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward pass and every read of every tensor, with mmap refused: all of it is pread."""
    family = zoo("llama")
    path, _ = _zoo_files(family, fmt, tmp_path)
    model = open_model(path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"mapped {args[:1]}")

    monkeypatch.setattr(mmap, "mmap", refuse)  # np.memmap maps through it too
    logits = model.family.forward(Weights(model), model.config, family.token_ids(), no_tap)
    assert np.isfinite(logits).all()
    for t in model.tensors():
        assert model.raw(t.name).nbytes == t.nbytes == model.raw_range(t.name, 0, t.nbytes).nbytes
        assert model.read(t.name).shape == t.shape
        if len(t.shape) == 2:
            assert model.read_rows(t.name, np.array([0, t.shape[0] - 1, 0])).shape == (3, t.shape[1])
    model.close()


def test_a_file_replaced_by_rename_is_read_from_the_file_that_was_opened(
    zoo: Callable[[str], ZooModel], tmp_path: Path
) -> None:
    path, _ = _zoo_files(zoo("llama"), "gguf", tmp_path)
    model = open_model(path)
    name = max(model.tensors(), key=lambda t: t.offset).name
    before = model.read(name)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"\0" * path.stat().st_size)  # same size, all zeros
    os.replace(other, path)
    np.testing.assert_array_equal(model.read(name), before)  # exactly: not a byte of the new file
    assert np.abs(before).max() > 0
    model.close()


# ---- a real run -----------------------------------------------------------------------------------


def _trace_and_cut(model: Path, data_file: Path, out: Path) -> tuple[int, bytes]:
    """`apr trace` in a process; once its first stage file exists, stop it, cut `data_file`, continue."""
    args = [
        "trace",
        str(model),
        "--tokens",
        IDS,
        "--save-tensor",
        "attn_norm",
        "--save-tensor-layers",
        "0..30",
    ]
    cmd = [sys.executable, "-m", "apr", *args, "--save-tensor-dir", str(out), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f".{out.name}.apr-tmp-*/layer-0/attn_norm.bin")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)
    os.truncate(data_file, CUT)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


@pytest.fixture
def gguf_copy(smollm2_gguf: Path, tmp_path: Path) -> tuple[Path, Path]:
    path = Path(shutil.copy(smollm2_gguf, tmp_path / "m.gguf"))
    return path, path


@pytest.fixture
def apr_copy(smollm2_apr: Path, tmp_path: Path) -> tuple[Path, Path]:
    path = Path(shutil.copy(smollm2_apr, tmp_path / "m.apr"))
    return path, path


@pytest.fixture
def hf_copy(smollm2_hf: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder = Path(shutil.copytree(smollm2_hf, tmp_path / "hf"))
    return folder, folder / "model.safetensors"


@pytest.mark.parametrize("files", ["gguf_copy", "apr_copy", "hf_copy"])
def test_a_model_truncated_during_a_trace_is_a_one_line_error(
    files: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model, data_file = request.getfixturevalue(files)
    out = tmp_path / "t"
    code, stderr = _trace_and_cut(model, data_file, out)
    text = stderr.decode()
    assert code == 4, (code, text)  # exit 4: invalid file format (not -7: SIGBUS)
    assert text.count("\n") == 1 and text.startswith(f"error: {data_file}: tensor "), text
    assert "Traceback" not in text
    assert re.search(TRUNCATED + r"\n$", text), text
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".t")] == []


def plain(field: Any) -> tuple[Any, ...]:
    value = field.value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, Sequence) and not isinstance(value, str):
        value = list(value)
    return field.key, field.type, value


@pytest.mark.parametrize("first", [64, 4096, 1 << 20])
def test_the_header_read_in_growing_prefixes_parses_as_the_whole_file(
    first: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_gguf reads the header from a prefix of the file (never a mapping), growing it when the parse
    runs past it: SmolLM2's 1.6 MB header from a 64-byte, 4 KiB or 1 MiB first read gives exactly the
    metadata and tensor index gguf_parse gives over the whole file (mapped here, as the oracle)."""
    from apr.formats import gguf as gguf_module
    from apr.formats.gguf_parse import parse_header
    from tests.fixtures.models import smollm2_gguf

    path = smollm2_gguf()
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        whole = parse_header(mm, os.fstat(f.fileno()).st_size, str(path))
    monkeypatch.setattr(gguf_module, "HEADER_FIRST_READ", first)
    with gguf_module.open_gguf(path) as ckpt:
        assert tuple(ckpt.tensors()) == whole.tensors
        assert [plain(f) for f in ckpt.fields.values()] == [plain(f) for f in whole.fields.values()]
        assert ckpt.tokenizer_spec() is not None and len(ckpt.tokenizer_spec().tokens) == 49152


def test_a_file_cut_inside_its_header_is_a_clean_error(tmp_path: Path) -> None:
    from apr.formats.gguf import open_gguf
    from tests.fixtures.models import smollm2_gguf

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_gguf().read_bytes()[: 1 << 20])  # the vocabulary runs past the end
    with pytest.raises(FormatError, match=r"cut.gguf: .*left"):
        open_gguf(cut)
