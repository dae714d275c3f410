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
from collections.abc import Callable
from pathlib import Path

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
