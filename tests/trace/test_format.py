from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from apr.errors import NotFoundError, TraceFormatError
from apr.stages import Stage, StageId
from apr.trace import format as aprt
from apr.trace.layout import default_output_dir, relative_path, stage_files, stage_id_for


def test_golden_headers_from_the_spec() -> None:
    # spec/aprender.md §3: lm_head.bin of the 7B run and layer-0/embedding.bin (7 × 3584)
    assert aprt.encode_header(None, 152064) == bytes.fromhex("41505254 ffffffff 00520200")
    assert aprt.encode_header(0, 25088) == bytes.fromhex("41505254 00000000 00620000")


def test_layout_of_a_whole_file(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    size = aprt.write_aprt(p, 5, np.array([1.0, -2.0], np.float32))
    data = p.read_bytes()
    assert size == len(data) == 12 + 8
    assert data == b"APRT" + (5).to_bytes(4, "little") + (2).to_bytes(4, "little") + bytes.fromhex(
        "0000803f000000c0"
    )


def test_empty_tensor_is_12_bytes(tmp_path: Path) -> None:
    p = tmp_path / "e.bin"
    aprt.write_aprt(p, None, np.zeros(0, np.float32))
    assert p.read_bytes() == bytes.fromhex("41505254ffffffff00000000")
    t = aprt.read_aprt(p)
    assert t.layer is None and t.values.size == 0


def test_nan_inf_and_negative_zero_are_bit_exact(tmp_path: Path) -> None:
    bits = np.array([0x7FC00000, 0x7F800001, 0xFF800000, 0x80000000, 0x7F800000, 0xFFC12345], np.uint32)
    p = tmp_path / "n.bin"
    aprt.write_aprt(p, 0, bits.view(np.float32))
    raw = p.read_bytes()
    assert raw[12:16] == bytes.fromhex("0000c07f")  # 0x7FC00000 LE, the contract's NaN check
    assert np.array_equal(aprt.read_aprt(p).values.view(np.uint32), bits)


@given(
    st.lists(st.integers(0, 2**32 - 1), max_size=64),
    st.one_of(st.none(), st.integers(0, 2**32 - 2)),
)
def test_property_round_trip_any_bits(words: list[int], layer: int | None) -> None:
    bits = np.array(words, np.uint32)
    blob = aprt.encode(layer, bits.view(np.float32))
    h = aprt.decode_header(blob)
    assert (h.layer, h.count, len(blob)) == (layer, bits.size, h.file_size)
    assert np.frombuffer(blob[12:], "<u4").tolist() == words


def test_truncated_header(tmp_path: Path) -> None:
    for n in (0, 11):
        p = tmp_path / f"t{n}.bin"
        p.write_bytes(b"APRT\0\0\0\0\0\0\0"[:n])
        with pytest.raises(TraceFormatError) as e:
            aprt.read_aprt(p)
        assert str(e.value) == f"{p}: save-tensor header truncated: got {n} bytes, need 12"


def test_bad_magic(tmp_path: Path) -> None:
    p = tmp_path / "m.bin"
    p.write_bytes(b"GGUF" + bytes(8))
    with pytest.raises(TraceFormatError) as e:
        aprt.read_aprt(p)
    assert str(e.value) == f'{p}: save-tensor magic mismatch: got "GGUF" (47 47 55 46), expected "APRT"'


def test_short_body_and_ignored_trailing_bytes(tmp_path: Path) -> None:
    p = tmp_path / "s.bin"
    p.write_bytes(aprt.encode_header(1, 4) + bytes(12))
    with pytest.raises(TraceFormatError) as e:
        aprt.read_aprt(p)
    assert str(e.value) == (
        f"{p}: save-tensor body truncated: header says 4 f32 values (16 bytes), "
        "file has 12 bytes after the header"
    )
    p.write_bytes(aprt.encode(1, np.ones(2, np.float32)) + b"trailing")
    assert aprt.read_aprt(p).values.tolist() == [1.0, 1.0]


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="^File not found: "):
        aprt.read_aprt(tmp_path / "nope.bin")
    with pytest.raises(NotFoundError, match="^Not a file: "):
        aprt.read_aprt(tmp_path)


def test_is_aprt(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"APRT")
    (tmp_path / "b").write_bytes(b"APR")
    assert aprt.is_aprt(tmp_path / "a")
    assert not aprt.is_aprt(tmp_path / "b")
    assert not aprt.is_aprt(tmp_path / "missing")


KILLED_WRITER = """
import sys, time
from pathlib import Path
from apr.atomicfile import atomic_output
with atomic_output(Path(sys.argv[1])) as f:
    f.write(b"APRT" + bytes(1 << 20))
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_killed_writer_leaves_no_file_under_the_final_name(tmp_path: Path) -> None:
    final = tmp_path / "layer-0" / "embedding.bin"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(final)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.05)
    assert not final.exists()
    leftovers = list(final.parent.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".embedding.bin.tmp-")
    assert stage_files(tmp_path) == {}  # a temp file is never taken for a stage file


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("a/foo/bar.apr", "a/foo/bar-trace"),
        ("model.apr", "./model-trace"),
        ("a/no_ext", "a/no_ext-trace"),
    ],
)
def test_default_output_dir_vectors(model: str, expected: str) -> None:
    assert default_output_dir(Path(model)) == Path(expected)


def test_layout_paths_round_trip() -> None:
    for sid in (StageId(Stage.FFN_UP, 12), StageId(Stage.EMBEDDING, 0), StageId(Stage.LM_HEAD)):
        assert stage_id_for(relative_path(sid)) == sid
    assert relative_path(StageId(Stage.FFN_UP, 12)) == Path("layer-12/ffn_up.bin")
    assert relative_path(StageId(Stage.FINAL_NORM)) == Path("final_norm.bin")
    assert stage_id_for(Path("layer-01/ffn_up.bin")) is None  # no zero padding
    assert stage_id_for(Path("layer-1/lm_head.bin")) is None  # whole-model stage inside a layer dir
    assert stage_id_for(Path("layer_output.bin")) is None  # the alias is never a file name
