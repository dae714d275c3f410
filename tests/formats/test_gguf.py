"""GGUF reader: field by field against gguf-py's GGUFReader on real files; exact errors on bad ones.

Valid files are written with gguf-py's GGUFWriter; corrupt ones are those bytes patched or
truncated, at offsets taken from GGUFReader (the independent parser), not from apr.
"""

from __future__ import annotations

import functools
import math
import resource
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apr.errors import (
    AprError,
    FormatError,
    NotFoundError,
    UnsupportedQuantError,
    ValidationError,
)
from apr.formats import open_checkpoint
from apr.formats.config import QKLayout
from apr.formats.gguf import GGUFCheckpoint, open_gguf
from apr.formats.gguf_strings import StringArray
from apr.formats.tokenizer import build_tokenizer
from apr.models import open_model
from apr.models.config import ModelConfig
from apr.quant.types import GGML_LAYOUT, QuantType

VT = GGUFValueType
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "Ġ", "ab", "Ġa", "abc"]
TOKEN_TYPES = [3, 3, 3, 1, 1, 1, 1, 1, 1, 1]
MERGES = ["a b", "Ġ a", "ab c"]


def tiny_kv(arch: str = "llama") -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
    return {
        "general.name": ("tiny", VT.STRING, None),
        "general.type": ("model", VT.STRING, None),
        f"{arch}.block_count": (1, VT.UINT32, None),
        f"{arch}.context_length": (32, VT.UINT32, None),
        f"{arch}.embedding_length": (64, VT.UINT32, None),
        f"{arch}.feed_forward_length": (128, VT.UINT32, None),
        f"{arch}.attention.head_count": (4, VT.UINT32, None),
        f"{arch}.attention.head_count_kv": (2, VT.UINT32, None),
        f"{arch}.rope.freq_base": (100000.0, VT.FLOAT32, None),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32, None),
        "tokenizer.ggml.model": ("gpt2", VT.STRING, None),
        "tokenizer.ggml.pre": ("smollm", VT.STRING, None),
        "tokenizer.ggml.tokens": (TOKENS, VT.ARRAY, VT.STRING),
        "tokenizer.ggml.token_type": (TOKEN_TYPES, VT.ARRAY, VT.INT32),
        "tokenizer.ggml.merges": (MERGES, VT.ARRAY, VT.STRING),
        "tokenizer.ggml.bos_token_id": (1, VT.UINT32, None),
        "tokenizer.ggml.add_bos_token": (False, VT.BOOL, None),
    }


def tiny_tensors(seed: int = 0) -> dict[str, tuple[np.ndarray[Any, Any], GT]]:
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray[Any, Any]:
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "token_embd.weight": (w(10, 64), GT.F32),
        "blk.0.attn_norm.weight": (w(64), GT.F32),
        "blk.0.attn_q.weight": (w(64, 64), GT.Q8_0),
        "blk.0.attn_k.weight": (w(32, 64), GT.Q8_0),
        "blk.0.ffn_down.weight": (w(64, 128), GT.F16),
        "output_norm.weight": (w(64), GT.F32),
    }


def write_gguf(
    path: Path,
    arch: str = "llama",
    kv: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] | None = None,
    tensors: dict[str, tuple[np.ndarray[Any, Any], GT]] | None = None,
    alignment: int | None = None,
) -> Path:
    w = GGUFWriter(path, arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, (value, vtype, sub) in (tiny_kv(arch) if kv is None else kv).items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, (x, qtype) in (tiny_tensors() if tensors is None else tensors).items():
        if qtype in (GT.F32, GT.F16):
            w.add_tensor(name, x.astype(np.float32 if qtype == GT.F32 else np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf")


def contents(ckpt: GGUFCheckpoint, key: str) -> Any:
    v = ckpt.fields[key].value
    return v.tolist() if isinstance(v, np.ndarray) else list(v) if isinstance(v, StringArray) else v


# ---- against gguf-py on the real SmolLM2 files --------------------------------------------------


@pytest.fixture(scope="module", params=["q4_1", "f32"])
def real(request: pytest.FixtureRequest) -> tuple[GGUFCheckpoint, GGUFReader]:
    path = request.getfixturevalue("smollm2_gguf" if request.param == "q4_1" else "smollm2_f32_gguf")
    return open_gguf(path), GGUFReader(path)


def test_every_kv_equals_gguf_py(real: tuple[GGUFCheckpoint, GGUFReader]) -> None:
    ckpt, reader = real
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert list(ckpt.fields) == keys
    for key in keys:
        f, ours = reader.fields[key], ckpt.fields[key]
        types = [ours.type] + ([ours.elem_type] if ours.elem_type is not None else [])
        assert types == [int(t) for t in f.types], key
        assert contents(ckpt, key) == f.contents(), key
    assert ckpt.version == reader.fields["GGUF.version"].contents()
    assert ckpt.metadata["GGUF.kv_count"] == reader.fields["GGUF.kv_count"].contents()
    assert ckpt.metadata["GGUF.tensor_count"] == reader.fields["GGUF.tensor_count"].contents()


def test_every_tensor_equals_gguf_py(real: tuple[GGUFCheckpoint, GGUFReader]) -> None:
    ckpt, reader = real
    assert [t.name for t in ckpt.tensors()] == [t.name for t in reader.tensors]
    for ours, t in zip(ckpt.tensors(), reader.tensors, strict=True):
        assert int(ours.qtype) == int(t.tensor_type), t.name
        assert ours.shape == tuple(int(n) for n in reversed(t.shape)), t.name
        assert ours.offset == t.data_offset, t.name
        assert ours.nbytes == t.n_bytes, t.name
        assert ckpt.info(t.name) == ours


@pytest.mark.parametrize(
    "name",
    ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight", "output_norm.weight"],
)
def test_read_equals_gguf_py_dequantize(real: tuple[GGUFCheckpoint, GGUFReader], name: str) -> None:
    ckpt, reader = real
    t = next(t for t in reader.tensors if t.name == name)
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ckpt.info(name).shape)
    got = ckpt.read(name)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ckpt.raw(name), np.asarray(t.data).reshape(-1).view(np.uint8))


def test_read_rows_reads_those_rows(real: tuple[GGUFCheckpoint, GGUFReader]) -> None:
    ckpt, _ = real
    full = ckpt.read("token_embd.weight")
    rows = np.array([1780, 0, 49151, 1780, -1], dtype=np.int64)
    np.testing.assert_array_equal(ckpt.read_rows("token_embd.weight", rows), full[rows])
    np.testing.assert_array_equal(ckpt.read_rows("token_embd.weight", slice(5, 90, 7)), full[5:90:7])
    assert ckpt.read_rows("token_embd.weight", np.array([], np.int64)).shape == (0, 576)


def test_smollm2_config_and_metadata(smollm2_gguf: Path) -> None:
    ckpt = open_gguf(smollm2_gguf)
    assert open_model(smollm2_gguf).config == ModelConfig(
        architecture="llama",
        hidden_size=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=49152,
        rope_theta=100000.0,
        rms_eps=float(np.float32(1e-5)),
        qkv_bias=False,
        qk_norm=False,
        tied_embeddings=True,
        qk_layout=QKLayout.INTERLEAVED,
        max_position=8192,
        n_experts=0,
    )
    assert ckpt.metadata["tokenizer.ggml.tokens"] == {"type": "array<string>", "len": 49152}
    assert ckpt.metadata["tokenizer.ggml.token_type"] == {"type": "array<int32>", "len": 49152}
    assert ckpt.metadata["general.languages"] == ["en"]
    assert ckpt.metadata["llama.block_count"] == 30
    spec = ckpt.tokenizer_spec()
    assert spec is not None and spec.model == "gpt2" and spec.pre == "smollm"
    assert (len(spec.tokens), len(spec.merges), spec.bos_id, spec.eos_id) == (49152, 48900, 1, 2)
    assert spec.tokens[1] == "<|im_start|>" and spec.merges[0] == "Ġ t" and not spec.add_bos
    assert [i for i, t in enumerate(spec.token_types) if t == 3] == list(range(17))


def test_open_is_fast(smollm2_gguf: Path) -> None:
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        open_gguf(smollm2_gguf).close()
        best = min(best, time.perf_counter() - t)
    assert best <= 0.3


def test_registry_dispatches_to_gguf(smollm2_gguf: Path) -> None:
    assert isinstance(open_checkpoint(smollm2_gguf), GGUFCheckpoint)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_reads_do_not_keep_other_tensors_resident(smollm2_f32_gguf: Path) -> None:
    ckpt = open_gguf(smollm2_f32_gguf)
    largest = max(t.nbytes for t in ckpt.tensors())
    before = _rss()
    for t in ckpt.tensors():  # 540 MB of F32 in all; each read's buffer is dropped at once
        ckpt.read(t.name)
        ckpt.raw(t.name)[::1024].sum()  # touches every page of the tensor's mapping
        if len(t.shape) == 2:
            ckpt.read_rows(t.name, slice(0, None, 2))
    assert _rss() - before < largest


# ---- the tiny file: config, layout, registry of types -------------------------------------------


def test_tiny_roundtrip(tiny: Path) -> None:
    ckpt = open_gguf(tiny)
    src = tiny_tensors()
    for name, (x, qtype) in src.items():
        info = ckpt.info(name)
        assert info.shape == x.shape and info.qtype == QuantType(int(qtype))
        want = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype) if qtype != GT.F16 else x
        np.testing.assert_allclose(ckpt.read(name), want.reshape(x.shape), rtol=1e-3, atol=1e-3)
    assert ckpt.metadata["tokenizer.ggml.tokens"] == TOKENS  # short arrays are shown in full


def test_ggml_layout_matches_gguf_py() -> None:
    ours = {int(q): (lay.block_size, lay.type_size) for q, lay in GGML_LAYOUT.items()}
    theirs = {int(t): gguf.GGML_QUANT_SIZES[t] for t in GT}
    del ours[GT.Q8_1], theirs[GT.Q8_1]  # ggml's block_q8_1 is 36 bytes (f16 d, s); gguf-py says 40
    assert ours == theirs
    assert GGML_LAYOUT[QuantType.Q8_1].type_size == 36


def test_listed_but_not_dequantizable(tmp_path: Path) -> None:
    tensors = tiny_tensors()
    raw = np.zeros(
        (4, 292), np.uint8
    )  # 4 rows of one Q8_K block (256 elements; gguf-py cannot dequantize it)
    path = tmp_path / "iq.gguf"
    w = GGUFWriter(path, "llama")
    for key, (value, vtype, sub) in tiny_kv().items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, (x, _) in tensors.items():
        w.add_tensor(name, x)
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=GT.Q8_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ckpt = open_gguf(path)
    info = ckpt.info("blk.0.ffn_up.weight")
    assert (info.qtype, info.shape, info.nbytes) == (QuantType.Q8_K, (4, 256), 4 * 292)
    with pytest.raises(UnsupportedQuantError) as e:
        ckpt.read("blk.0.ffn_up.weight")
    assert str(e.value) == (
        f"{path}: tensor 'blk.0.ffn_up.weight' has type Q8_K, which apr cannot dequantize"
    )
    with pytest.raises(UnsupportedQuantError):
        ckpt.read_rows("blk.0.ffn_up.weight", slice(0, 1))
    assert len(ckpt.raw("blk.0.ffn_up.weight")) == 4 * 292


def test_unknown_tensor_name(tiny: Path) -> None:
    with pytest.raises(NotFoundError) as e:
        open_gguf(tiny).info("blk.0.attn_v.weight")
    assert (
        str(e.value) == f"{tiny}: no tensor named 'blk.0.attn_v.weight' (did you mean 'blk.0.attn_q.weight'?)"
    )


def test_read_rows_errors(tiny: Path) -> None:
    ckpt = open_gguf(tiny)
    cases = [
        ("output_norm.weight", np.array([0]), "read_rows needs a tensor of 2 or more dims; "
         "'output_norm.weight' has shape (64,)"),
        ("token_embd.weight", np.array([3, 10]), "tensor 'token_embd.weight': row 10 is out of range "
         "for 10 rows"),
        ("token_embd.weight", np.array([-11]), "tensor 'token_embd.weight': row -11 is out of range "
         "for 10 rows"),
        ("token_embd.weight", np.array([0.5]), "tensor 'token_embd.weight': rows must be a slice or "
         "a 1-D integer array, got float64[1]"),
    ]  # fmt: skip
    for name, rows, message in cases:
        with pytest.raises(ValidationError) as e:
            ckpt.read_rows(name, rows)
        assert str(e.value) == f"{tiny}: {message}"


def test_closed_checkpoint(tiny: Path) -> None:
    with open_gguf(tiny) as ckpt:
        pass
    with pytest.raises(AprError, match="the checkpoint is closed"):
        ckpt.read("output_norm.weight")


# ---- corrupt files: exact messages --------------------------------------------------------------


@dataclass
class Layout:
    """Offsets in the tiny file, from gguf-py's reader (independent of apr)."""

    size: int
    key_at: dict[str, int]
    entry_at: dict[str, int]
    data_offset: int

    def value_at(self, key: str) -> int:  # the value type u32, right after the key string
        return self.key_at[key] + 8 + len(key.encode())

    def dims_at(self, name: str) -> int:  # n_dims u32
        return self.entry_at[name] + 8 + len(name.encode())


def layout_of(path: Path) -> Layout:
    r = GGUFReader(path)
    keys = {k: f.offset for k, f in r.fields.items() if not k.startswith("GGUF.")}
    entries = {t.name: t.field.offset for t in r.tensors}
    return Layout(path.stat().st_size, keys, entries, r.data_offset)


def put(blob: bytearray, at: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, blob, at, value)


Case = Callable[[bytearray, Layout], tuple[bytes, str]]


def _empty(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    return b"", "truncated GGUF header: 0 bytes, the fixed header needs 24"


def _magic(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    b[0:4] = b"GGML"
    return bytes(b), "not a GGUF file: magic b'GGML', expected b'GGUF'"


def _version(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    put(b, 4, "<I", 1)
    return bytes(b), "unsupported GGUF version 1; supported: 2, 3"


def _big_endian(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    put(b, 4, ">I", 3)
    return bytes(b), (
        "unsupported GGUF version 50331648 (a big-endian file? those are not supported); supported: 2, 3"
    )


def _kv_count(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    put(b, 16, "<Q", 1 << 40)
    return bytes(b), (
        f"kv_count {1 << 40} at offset 16 cannot fit: each entry needs at least 13 bytes, "
        f"only {lay.size - 24} left"
    )


def _tensor_count(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    put(b, 8, "<Q", 1 << 40)
    return bytes(b), (
        f"tensor_count {1 << 40} at offset 8 cannot fit: each entry needs at least 24 bytes, "
        f"only {lay.size - 24} left"
    )


def _key_length(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    at = lay.key_at["general.name"]
    put(b, at, "<Q", 1 << 50)
    index = list(lay.key_at).index("general.name")
    return bytes(b), (
        f"metadata key #{index} at offset {at}: string length {1 << 50} exceeds the "
        f"{lay.size - at - 8} bytes left"
    )


def _key_utf8(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    at = lay.key_at["general.name"]
    b[at + 8] = 0xFF
    index = list(lay.key_at).index("general.name")
    return bytes(b), f"metadata key #{index} at offset {at}: invalid UTF-8"


def _value_type(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    at = lay.value_at("general.name")
    put(b, at, "<I", 13)
    return bytes(b), f"metadata key 'general.name' at offset {at}: unknown value type 13"


def _value_length(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    at = lay.value_at("general.name") + 4
    put(b, at, "<Q", 1 << 40)
    return bytes(b), (
        f"metadata key 'general.name' at offset {at}: string length {1 << 40} exceeds the "
        f"{lay.size - at - 8} bytes left"
    )


def _elem_type(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    at = lay.value_at("tokenizer.ggml.tokens") + 4
    put(b, at, "<I", 99)
    return bytes(b), f"metadata key 'tokenizer.ggml.tokens' at offset {at}: unknown array element type 99"


def _nested_array(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    at = lay.value_at("tokenizer.ggml.tokens") + 4
    put(b, at, "<I", 9)
    return bytes(
        b
    ), f"metadata key 'tokenizer.ggml.tokens' at offset {at}: arrays of arrays are not supported"


def _array_count(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    at = lay.value_at("tokenizer.ggml.token_type") + 4
    put(b, at + 4, "<Q", 1 << 40)
    return bytes(b), (
        f"metadata key 'tokenizer.ggml.token_type' at offset {at}: {1 << 40} × int32 needs at "
        f"least {4 << 40} bytes, only {lay.size - at - 12} left"
    )


def _array_string(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    at = lay.value_at("tokenizer.ggml.tokens") + 4 + 12 + 8 + len(TOKENS[0])  # element 1
    put(b, at, "<Q", 1 << 40)
    return bytes(b), (
        f"metadata key 'tokenizer.ggml.tokens'[1] at offset {at}: string length {1 << 40} "
        f"exceeds the {lay.size - at - 8} bytes left"
    )


def _duplicate_key(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    at = lay.key_at["general.type"]
    b[at + 8 : at + 8 + 12] = b"general.name"
    return bytes(b), f"duplicate metadata key 'general.name' at offset {at}"


def _n_dims(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    put(b, lay.dims_at("token_embd.weight"), "<I", 5)
    at = lay.entry_at["token_embd.weight"]
    return bytes(b), f"tensor 'token_embd.weight' at offset {at}: n_dims 5 exceeds the maximum 4"


def _ggml_type(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    put(b, lay.dims_at("blk.0.attn_q.weight") + 4 + 16, "<I", 99)
    at = lay.entry_at["blk.0.attn_q.weight"]
    return bytes(b), f"tensor 'blk.0.attn_q.weight' (entry at offset {at}): unknown GGML type id 99"


def _row_length(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    put(b, lay.dims_at("blk.0.attn_q.weight") + 4, "<Q", 33)
    at = lay.entry_at["blk.0.attn_q.weight"]
    return bytes(b), (
        f"tensor 'blk.0.attn_q.weight' (entry at offset {at}): row length 33 is not a multiple "
        "of the Q8_0 block size 32"
    )


def _misaligned(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    put(b, lay.dims_at("token_embd.weight") + 4 + 16 + 4, "<Q", 1)
    at = lay.entry_at["token_embd.weight"]
    return bytes(b), (
        f"tensor 'token_embd.weight' (entry at offset {at}): data offset 1 is not a multiple of "
        "the alignment 32"
    )


def _truncated_data(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    at = lay.entry_at["output_norm.weight"]
    start = lay.size - 64 * 4
    return bytes(b[:-1]), (
        f"tensor 'output_norm.weight' (entry at offset {at}): data [{start}, {lay.size}) runs past "
        f"the end of the file ({lay.size - 1} bytes)"
    )


def _duplicate_tensor(b: bytearray, lay: Layout) -> tuple[bytes, str]:
    at = lay.entry_at["blk.0.attn_k.weight"]
    b[at + 8 : at + 8 + 19] = b"blk.0.attn_q.weight"
    return bytes(b), f"duplicate tensor name 'blk.0.attn_q.weight' (entry at offset {at})"


CASES: dict[str, Case] = {
    f.__name__.lstrip("_"): f
    for f in [
        _empty, _magic, _version, _big_endian, _kv_count, _tensor_count, _key_length, _key_utf8,
        _value_type, _value_length, _elem_type, _nested_array, _array_count, _array_string,
        _duplicate_key, _n_dims, _ggml_type, _row_length, _misaligned, _truncated_data,
        _duplicate_tensor,
    ]
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_corrupt_file_message(tiny: Path, case: str) -> None:
    data, message = CASES[case](bytearray(tiny.read_bytes()), layout_of(tiny))
    bad = tiny.with_name("bad.gguf")
    bad.write_bytes(data)
    with pytest.raises(FormatError) as e:
        open_gguf(bad)
    assert str(e.value) == f"{bad}: {message}"


def test_bad_alignment(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "a.gguf", alignment=64)
    blob = bytearray(path.read_bytes())
    put(blob, layout_of(path).value_at("general.alignment") + 4, "<I", 48)
    path.write_bytes(blob)
    with pytest.raises(FormatError) as e:
        open_gguf(path)
    assert str(e.value) == f"{path}: general.alignment must be a uint32 power of two, got uint32 48"


def test_other_alignment(tmp_path: Path) -> None:
    ckpt = open_gguf(write_gguf(tmp_path / "a.gguf", alignment=64))
    assert ckpt.alignment == 64 and all(t.offset % 64 == 0 for t in ckpt.tensors())
    np.testing.assert_array_equal(ckpt.read("output_norm.weight"), tiny_tensors()["output_norm.weight"][0])


@pytest.mark.parametrize("n_tokens", [len(TOKENS), 100])
def test_invalid_utf8_token(tmp_path: Path, n_tokens: int) -> None:
    """A short array is decoded at open (for `metadata`), a long one when first used."""
    tokens = TOKENS + [f"t{i}" for i in range(n_tokens - len(TOKENS))]
    kv = {**tiny_kv(), "tokenizer.ggml.tokens": (tokens, VT.ARRAY, VT.STRING)}
    kv["tokenizer.ggml.token_type"] = ([1] * n_tokens, VT.ARRAY, VT.INT32)
    path = write_gguf(tmp_path / "t.gguf", kv=kv)
    lay, blob = layout_of(path), bytearray(path.read_bytes())
    at = lay.value_at("tokenizer.ggml.tokens") + 4 + 12  # element 0's length prefix
    at += sum(8 + len(t) for t in TOKENS[:3]) + 8  # element 3's bytes
    blob[at] = 0xFF
    path.write_bytes(blob)
    message = f"{path}: metadata key 'tokenizer.ggml.tokens'[3] at offset {at}: invalid UTF-8"
    with pytest.raises(FormatError) as e:
        spec = open_gguf(path).tokenizer_spec()
        assert spec is not None and n_tokens > 64
        spec.tokens[0]
    assert str(e.value) == message


def _without(key: str) -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
    kv = tiny_kv()
    del kv[key]
    return kv


def test_tokenizer_spec_type_errors(tmp_path: Path) -> None:
    kv = {**tiny_kv(), "tokenizer.ggml.merges": ([1, 2], VT.ARRAY, VT.INT32)}
    ckpt = open_gguf(write_gguf(tmp_path / "t.gguf", kv=kv))
    with pytest.raises(FormatError) as e:
        ckpt.tokenizer_spec()
    assert str(e.value) == (
        f"{ckpt.path}: metadata key 'tokenizer.ggml.merges' must be an array of strings, got array<int32>"
    )


# ---- fuzz: truncations and byte flips only ever raise AprError ----------------------------------


def _exercise(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        try:
            ckpt = open_gguf(Path(f.name))
            for t in ckpt.tensors():
                ckpt.read(t.name)
                if len(t.shape) == 2:
                    ckpt.read_rows(t.name, np.array([0, -1]))
            spec = ckpt.tokenizer_spec()
            if spec is not None:
                build_tokenizer(spec).encode("abc <|im_end|> a")
            ckpt.close()
        except AprError:
            pass


@functools.cache
def tiny_bytes() -> tuple[bytes, int]:
    """The tiny file's bytes, and where its data section starts."""
    with tempfile.TemporaryDirectory() as d:
        path = write_gguf(Path(d) / "t.gguf")
        return path.read_bytes(), layout_of(path).data_offset


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_truncation(data: st.DataObject) -> None:
    blob, _ = tiny_bytes()
    _exercise(blob[: data.draw(st.integers(0, len(blob) - 1))])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_byte_flips(data: st.DataObject) -> None:
    """Flips in the header and tensor index (past it they only change tensor values)."""
    blob, header_end = tiny_bytes()
    flips = st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), min_size=1, max_size=4)
    patched = bytearray(blob)
    for at, value in data.draw(flips):
        patched[at] = value
    _exercise(bytes(patched))
