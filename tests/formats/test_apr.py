"""The .apr v2 container (spec §7): golden bytes built here from the spec, round trips, exact errors.

`_container` below is an independent writer, straight from the spec's tables (struct + zlib), used
as the oracle for the golden-bytes test and to build every corrupt file.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import tempfile
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apr.errors import AprError, FormatError, NotFoundError, UnsupportedQuantError
from apr.formats.apr import FORMAT, AprCheckpoint, open_apr, verify_checkpoint
from apr.formats.aprfooter import FooterCheck, FooterCrc, check_footer
from apr.formats.aprmeta import encode_metadata, serde_float
from apr.formats.aprwrite import AprTensor, metadata_for, write_apr
from apr.formats.base import TokenizerSpec
from apr.formats.config import QKLayout
from apr.models import open_model
from apr.models.config import ModelConfig
from apr.models.exchange import apr_keys_of
from apr.quant.types import QuantType

RNG = np.random.default_rng(0)


def _pad(b: bytes) -> bytes:
    return b + bytes(-len(b) % 64)


def _entry(name: str, code: int, dims: list[int], offset: int, size: int) -> bytes:
    raw = name.encode()
    head = struct.pack("<H", len(raw)) + raw + bytes([code, len(dims)])
    return head + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<QQ", offset, size)


def _container(
    meta: bytes,
    entries: list[bytes],
    data: bytes,
    *,
    magic: bytes = b"APR\x00",
    version: tuple[int, int] = (2, 0),
    flags: int = 0x0400,
    **over: int,
) -> bytes:
    index = b"".join(entries)
    idx_off = 64 + len(_pad(meta))
    f = {"count": len(entries), "meta_off": 64, "meta_size": len(meta), "idx_off": idx_off}
    f |= {"data_off": idx_off + len(_pad(index))} | over
    head = magic + bytes(version) + struct.pack("<HIQIQQ", flags, *f.values())
    head += struct.pack("<I", zlib.crc32(head + bytes(20))) + bytes(20)  # CRC of [0,40)‖[44,64)
    body = head + _pad(meta) + _pad(index) + data
    return body + struct.pack("<I", zlib.crc32(body))


def _json(d: dict[str, Any]) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


CFG = {"model_type": "llama", "hidden_size": 8, "num_layers": 1, "num_heads": 2}
META = _json(CFG | {"vocab_size": 4, "intermediate_size": 16})
EMB = np.arange(32, dtype=np.float32).reshape(4, 8)
EMB_ENTRY = _entry("token_embd.weight", 0, [4, 8], 0, 128)


def _valid(**kw: Any) -> bytes:
    return _container(META, [EMB_ENTRY], _pad(EMB.tobytes()), **kw)


def _open(tmp_path: Path, blob: bytes) -> AprCheckpoint:
    path = tmp_path / "m.apr"
    path.write_bytes(blob)
    return open_apr(path)


# --- golden bytes ------------------------------------------------------------------------------


def test_writer_matches_the_spec_byte_for_byte(tmp_path: Path) -> None:
    a = np.array([1.5, -2.0, 0.25], np.float16)
    b = np.array([1.0, -2.0], np.float32)
    path = tmp_path / "tiny.apr"
    write_apr(path, [AprTensor.from_array("b", b), AprTensor.from_array("a", a)], {"name": "t"})
    meta = b'{"model_type":"","name":"t","license":null,"data_source":null,"data_license":null,'
    meta += b'"total_size":0,"param_count":0}'
    index = [_entry("a", 1, [3], 0, 6), _entry("b", 0, [2], 64, 8)]  # sorted; data in index order
    expected = _container(meta, index, _pad(a.tobytes()) + _pad(b.tobytes()))
    got = path.read_bytes()
    assert got == expected
    assert got[:8] == b"APR\x00\x02\x00\x00\x04"  # magic, v2.0, flags = LAYOUT_ROW_MAJOR
    assert struct.unpack_from("<IQIQQ", got, 8) == (2, 64, len(meta), 192, 256)
    assert got[40:44] == zlib.crc32(got[:40] + got[44:64]).to_bytes(4, "little")
    assert got[64 + len(meta) : 192] == bytes(192 - 64 - len(meta))  # metadata zero padding
    assert got[256 + 6 : 320] == bytes(58) and len(got) == 256 + 64 + 64 + 4
    assert got[-4:] == zlib.crc32(got[:-4]).to_bytes(4, "little")


def test_same_size_as_aprenders_golden_v2_current(tmp_path: Path) -> None:
    """aprender's apr-format/tests/golden_fixtures.rs pins this model at 516 bytes."""
    meta = {"model_type": "linear_regression", "name": "golden-v2", "version": "0.0.0-golden"}
    meta |= {"created_at": "1700000000", "param_count": 8}
    w = np.array([1.0, 2.0, 0.5, -0.5, 4.0, -2.0, 0.25, 8.0], np.float32)
    tensors = [
        AprTensor.from_array("weights", w),
        AprTensor.from_array("bias", np.float32([0.125])),
    ]
    write_apr(tmp_path / "g.apr", tensors, meta)
    assert (tmp_path / "g.apr").stat().st_size == 516


# --- round trips -------------------------------------------------------------------------------

CFG_FULL = CFG | {"vocab_size": 4, "intermediate_size": 16}
RAW_CASES = [  # (type, shape, bytes by the spec's size rules)
    (QuantType.F32, (3, 5), 60),
    (QuantType.F16, (7,), 14),
    (QuantType.BF16, (2, 3), 12),
    (QuantType.I8, (5,), 5),
    (QuantType.Q4_K, (3, 512), 3 * 2 * 144),
    (QuantType.Q4_K, (2, 300), 2 * 2 * 144),  # each row padded to whole super-blocks (GH-202)
    (QuantType.Q6_K, (2, 256), 2 * 210),
    (QuantType.APR_Q4, (3, 20), 2 * 18),  # 60 elements: blocks run across rows, last one padded
    (QuantType.APR_Q8, (4, 3), 4 + 12),
]


@pytest.mark.parametrize(("qtype", "shape", "nbytes"), RAW_CASES, ids=lambda c: str(c))
def test_raw_bytes_round_trip(tmp_path: Path, qtype: QuantType, shape: tuple[int, ...], nbytes: int) -> None:
    blob = RNG.integers(0, 256, nbytes, np.uint8).tobytes()
    other = np.ones(5, np.float32)
    tensors = [AprTensor("x", qtype, shape, blob), AprTensor.from_array("y", other)]
    write_apr(tmp_path / "m.apr", tensors, CFG_FULL)
    ck = open_apr(tmp_path / "m.apr", verify=True)
    info = ck.info("x")
    assert (info.qtype, info.shape, info.nbytes, info.name) == (qtype, shape, nbytes, "x")
    assert info.offset % 64 == 0
    assert ck.raw("x").tobytes() == blob
    np.testing.assert_array_equal(ck.read("y"), other)


def _with_scales(raw: np.ndarray, block: int, offsets: tuple[int, ...]) -> np.ndarray:
    """Random blocks with their f16 scale fields set to 0.01 (finite, so values compare exactly)."""
    blocks = raw.reshape(-1, block)
    for off in offsets:
        blocks[:, off : off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return raw


KQUANT = {QuantType.Q4_K: (144, (0, 2)), QuantType.Q6_K: (210, (208,))}  # block bytes, f16 fields


@pytest.mark.parametrize("qtype", [QuantType.Q4_K, QuantType.Q6_K])
@pytest.mark.parametrize("cols", [512, 300])
def test_kquant_reads_match_gguf_py(tmp_path: Path, qtype: QuantType, cols: int) -> None:
    block, fields = KQUANT[qtype]
    raw = _with_scales(RNG.integers(0, 256, (3, 2 * block), np.uint8), block, fields)
    oracle = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(qtype)))[:, :cols]
    write_apr(tmp_path / "q.apr", [AprTensor("token_embd.weight", qtype, (3, cols), raw)], CFG_FULL)
    ck = open_apr(tmp_path / "q.apr")
    np.testing.assert_array_equal(ck.read("token_embd.weight"), oracle)
    rows = np.array([2, 0])
    np.testing.assert_array_equal(ck.read_rows("token_embd.weight", rows), oracle[rows])
    np.testing.assert_array_equal(ck.read_rows("token_embd.weight", slice(1, 3)), oracle[1:3])


def _apr_q8(x: np.ndarray) -> np.ndarray:
    scale = np.float32(np.abs(x).max() / 127)
    q = np.clip(np.round(x / scale), -127, 127).astype(np.int8)
    return np.concatenate([np.frombuffer(scale.tobytes(), np.uint8), q.reshape(-1).view(np.uint8)])


READ_ROWS_CASES = {
    "F32": (QuantType.F32, 8, lambda x: x),
    "F16": (QuantType.F16, 8, lambda x: x.astype(np.float16)),
    "APR_Q8": (QuantType.APR_Q8, 8, _apr_q8),
    "APR_Q4": (
        QuantType.APR_Q4,
        64,
        lambda x: _with_scales(RNG.integers(0, 256, x.size // 32 * 18, np.uint8), 18, (0,)),
    ),
}


@pytest.mark.parametrize("case", READ_ROWS_CASES)
def test_read_rows_equals_read(tmp_path: Path, case: str) -> None:
    qtype, cols, encode = READ_ROWS_CASES[case]
    data = encode(RNG.standard_normal((6, cols)).astype(np.float32))
    write_apr(tmp_path / "r.apr", [AprTensor("token_embd.weight", qtype, (6, cols), data)], CFG_FULL)
    ck = open_apr(tmp_path / "r.apr")
    rows = np.array([5, 1, 1])
    whole = ck.read("token_embd.weight")
    np.testing.assert_array_equal(ck.read_rows("token_embd.weight", rows), whole[rows])


def _model(cfg: ModelConfig, names: Callable[[str], str]) -> list[AprTensor]:
    d, f, v, kv = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.kv_dim
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,), "output.weight": (v, d)}
    layer = {"attn_norm.weight": (d,), "attn_q.weight": (d, d), "attn_k.weight": (kv, d)}
    layer |= {"attn_v.weight": (kv, d), "attn_output.weight": (d, d), "ffn_norm.weight": (d,)}
    layer |= {"ffn_gate.weight": (f, d), "ffn_up.weight": (f, d), "ffn_down.weight": (d, f)}
    if cfg.qkv_bias:
        layer |= {"attn_q.bias": (d,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)}
    for i in range(cfg.n_layers):
        shapes |= {f"blk.{i}.{suffix}": shape for suffix, shape in layer.items()}
    return [
        AprTensor.from_array(names(n), RNG.standard_normal(s).astype(np.float32)) for n, s in shapes.items()
    ]


TOK = TokenizerSpec(
    "gpt2",
    "qwen2",
    ("a", "b", "ab", "<|im_end|>"),
    ("a b",),
    (1, 1, 1, 3),
    None,
    3,
    False,
    chat_template="{{ x }}",
)
F32_1E5, F32_1E6 = float(np.float32(1e-5)), float(np.float32(1e-6))  # eps is an f32 field
LLAMA = ModelConfig("llama", 8, 2, 2, 1, 4, 16, 4, rms_eps=F32_1E5, max_position=64)
LLAMA = replace(LLAMA, qk_layout=QKLayout.INTERLEAVED)
QWEN = ModelConfig("qwen2", 8, 1, 2, 2, 4, 12, 4, rope_theta=1e6, rms_eps=F32_1E6, max_position=128)
QWEN = replace(QWEN, qkv_bias=True, tied_embeddings=True)


def HF_NAME(canonical: str) -> str:
    """The HF spelling of the few canonical names these tests use (written out, not taken from apr)."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}  # fmt: skip
    if canonical in fixed:
        return fixed[canonical]
    _, layer, suffix = canonical.split(".", 2)
    layer_names = {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }
    for x in "qkv":
        layer_names[f"attn_{x}.weight"] = f"self_attn.{x}_proj.weight"
        layer_names[f"attn_{x}.bias"] = f"self_attn.{x}_proj.bias"
    return f"model.layers.{layer}.{layer_names[suffix]}"


@pytest.mark.parametrize(("cfg", "names"), [(LLAMA, str), (QWEN, HF_NAME)], ids=["llama-gguf", "qwen2-hf"])
def test_config_and_tokenizer_round_trip(
    tmp_path: Path, cfg: ModelConfig, names: Callable[[str], str]
) -> None:
    tensors = _model(cfg, names)
    meta = metadata_for(apr_keys_of(cfg), TOK, shapes={t.name: t.shape for t in tensors})
    write_apr(tmp_path / "m.apr", tensors, meta)
    ck = open_apr(tmp_path / "m.apr")
    model = open_model(tmp_path / "m.apr")
    assert model.config == cfg
    assert ck.tokenizer_spec() == TOK
    assert ck.warnings == ()
    q = model.info("blk.0.attn_q.weight")
    assert (q.source_name or q.name) == names("blk.0.attn_q.weight")
    shapes = ck.full_metadata["tensor_shapes"]
    assert ck.metadata["tensor_shapes"] == (f"<{len(shapes)} keys>" if len(shapes) > 16 else shapes)
    assert ck.full_metadata["tensor_shapes"][names("token_embd.weight")] == [4, 8]


def test_metadata_for_is_aprenders_key_set_in_serde_order() -> None:
    meta = metadata_for(apr_keys_of(QWEN), None, shapes={"lm_head.weight": (4, 8), "model.norm.weight": (8,)})
    assert encode_metadata(meta).decode() == (
        '{"model_type":"qwen2","name":"qwen2","description":"GGUF Q4_K model imported with native'
        ' quantization","license":null,"data_source":null,"data_license":null,"version":"1.0.0",'
        '"original_format":"gguf","total_size":0,"param_count":40,"architecture":"qwen2",'
        '"hf_architecture":"Qwen2ForCausalLM","hidden_size":8,"num_layers":1,"num_heads":2,'
        '"num_kv_heads":2,"vocab_size":4,"intermediate_size":12,"max_position_embeddings":128,'
        '"rope_theta":1000000.0,"rope_type":2,"rms_norm_eps":0.000001,"head_dim":4,'
        '"model.architecture":"qwen2","model.hidden_size":8,"model.intermediate_size":12,'
        '"model.max_position_embeddings":128,"model.num_heads":2,"model.num_kv_heads":2,'
        '"model.num_layers":1,"model.rms_norm_eps":9.999999974752427e-7,'
        '"model.rope_theta":1000000.0,"model.rope_type":2,"model.vocab_size":4,'
        '"tensor_shapes":{"lm_head.weight":[4,8],"model.norm.weight":[8]},"tied_embeddings":true}'
    )


@pytest.mark.parametrize(
    ("x", "f32", "text"),
    [
        (1e-6, True, "0.000001"),
        (1e-7, True, "1e-7"),
        (1e13, True, "1e13"),
        (1e6, True, "1000000.0"),
        (1e-6, False, "1e-6"),
        (1e-5, False, "0.00001"),
        (1e16, False, "1e16"),
        (1e15, False, "1000000000000000.0"),
        (-0.0, False, "-0.0"),
        (123.456, False, "123.456"),
        (2.5e-300, False, "2.5e-300"),
    ],
)
def test_floats_print_as_serde_json_does(x: float, f32: bool, text: str) -> None:
    assert serde_float(x, f32=f32) == text


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_serde_floats_round_trip(x: float) -> None:
    assert float(serde_float(x)) == x


def test_writer_streams_one_tensor_at_a_time(tmp_path: Path) -> None:
    calls: list[str] = []

    def producer(name: str, i: int) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            calls.append(name)
            return np.full(1 << 18, i, np.float32)  # 1 MiB

        return make

    names = [f"t{i:03d}" for i in range(48)]
    tensors = (AprTensor(n, QuantType.F32, (1 << 18,), producer(n, i)) for i, n in enumerate(names))
    tracemalloc.start()
    write_apr(tmp_path / "s.apr", reversed(list(tensors)), {})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20  # 48 MiB written, at most ~one tensor alive
    assert calls == names
    blob = (tmp_path / "s.apr").read_bytes()
    meta = len(_pad(encode_metadata({})))
    assert len(blob) == 64 + meta + 48 * 32 + 48 * (1 << 20) + 4
    assert blob[-4:] == zlib.crc32(blob[:-4]).to_bytes(4, "little")


def test_gguf_to_apr_keeps_config_tokenizer_and_bytes(tmp_path: Path, smollm2_f32_gguf: Path) -> None:
    """SmolLM2 (LLaMA, tied) through the import path of spec §8: GGUF names, lm_head synthesized."""
    from apr.formats.gguf import open_gguf

    src = open_gguf(smollm2_f32_gguf)
    tensors = [AprTensor(t.name, t.qtype, t.shape, partial(src.raw, t.name)) for t in src.tensors()]
    emb = src.info("token_embd.weight")
    tensors.append(AprTensor("lm_head.weight", emb.qtype, emb.shape, partial(src.raw, emb.name)))
    src_cfg = open_model(smollm2_f32_gguf).config
    meta = metadata_for(apr_keys_of(src_cfg), src.tokenizer_spec(), shapes={t.name: t.shape for t in tensors})
    write_apr(tmp_path / "smol.apr", tensors, meta)
    ck = open_apr(tmp_path / "smol.apr", verify=True)
    cfg = open_model(tmp_path / "smol.apr").config
    assert cfg == src_cfg and cfg.qk_layout is QKLayout.INTERLEAVED
    a, b = ck.tokenizer_spec(), src.tokenizer_spec()
    assert a is not None and b is not None
    assert (a.model, a.pre, a.bos_id, a.eos_id, a.add_bos) == (
        b.model,
        b.pre,
        b.bos_id,
        b.eos_id,
        b.add_bos,
    )
    assert (tuple(a.tokens), tuple(a.merges), tuple(a.token_types), a.chat_template) == (
        tuple(b.tokens),
        tuple(b.merges),
        tuple(b.token_types),
        b.chat_template,
    )
    for name in ("blk.7.attn_q.weight", "output_norm.weight"):
        assert ck.raw(name).tobytes() == src.raw(name).tobytes()
    ids = np.array([1, 9707, 49151])
    np.testing.assert_array_equal(ck.read_rows("token_embd.weight", ids), src.read_rows(emb.name, ids))
    np.testing.assert_array_equal(ck.read("lm_head.weight"), src.read("token_embd.weight"))


# --- every corrupt case, with its exact message ------------------------------------------------

IDX = 64 + len(_pad(META))  # index offset of `_valid()`
DATA = IDX + 64
END = DATA + 128  # where the footer starts
A4 = np.ones(4, np.float32).tobytes()


def _two(a: str, b: str, off_b: int = 64) -> bytes:
    entries = [_entry(a, 0, [4], 0, 16), _entry(b, 0, [4], off_b, 16)]
    return _container(META, entries, _pad(A4) + _pad(A4))


def _meta(meta: bytes) -> bytes:
    return _container(meta, [EMB_ENTRY], _pad(EMB.tobytes()))


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0xFF]) + blob[at + 1 :]


def _header_crc(blob: bytes) -> tuple[int, int]:
    return int.from_bytes(blob[40:44], "little"), zlib.crc32(blob[:40] + blob[44:64])


E0 = f"tensor index entry 0 at byte {IDX}"
CORRUPT: dict[str, tuple[Callable[[], bytes], str]] = {
    "short": (
        lambda: b"APR\x00" + bytes(6),
        "file too short for an .apr header: 10 bytes, need 64",
    ),
    "magic": (
        lambda: b"GGUF" + _valid()[4:],
        "not an .apr file: magic b'GGUF', expected b'APR\\x00'",
    ),
    "legacy": (
        lambda: _valid(magic=b"APRN"),
        "magic b'APRN' is an older APR container; this reader accepts only b'APR\\x00' (APR v2): "
        "re-import the model with a current `apr import`",
    ),
    "version": (
        lambda: _valid(version=(1, 0)),
        "unsupported .apr version 1.0: this reader reads 2.x",
    ),
    "header-crc": (
        lambda: _flip(_valid(), 50),
        "header checksum mismatch: stored 0x{0:08x}, computed 0x{1:08x}",  # filled in below
    ),
    "column-major": (
        lambda: _valid(flags=0x0C00),
        "header flag LAYOUT_COLUMN_MAJOR (0x0800) set: the tensors are column-major (a dirty "
        "import); re-import the model",
    ),
    "lz4": (
        lambda: _valid(flags=0x0401),
        "header flag LZ4_COMPRESSED (0x0001) set: compressed files are not supported; "
        "`apr convert --compress none` first",
    ),
    "encrypted": (
        lambda: _valid(flags=0x0404),
        "header flag ENCRYPTED (0x0004) set: encrypted files are not supported",
    ),
    "no-footer": (lambda: _valid()[:64], "file too short: 64 bytes, need 68 (header + footer)"),
    "metadata-size": (
        lambda: _valid(meta_size=(16 << 20) + 1),
        "metadata is 16777217 bytes, over the 16 MiB limit",
    ),
    "metadata-offset": (
        lambda: _valid(meta_off=65),
        f"metadata offset 65: expected a multiple of 64 in [64, {END - len(META)}]",
    ),
    "index-overlaps-metadata": (
        lambda: _valid(idx_off=64),
        f"tensor index offset 64: expected a multiple of 64 in [{64 + len(META)}, {END}]",
    ),
    "data-past-end": (
        lambda: _valid(data_off=1 << 40),
        f"file is {END + 4} bytes, too short for what its header declares (metadata [64, "
        f"{64 + len(META)}), index at {IDX}, data at {1 << 40}, then a 4-byte footer): truncated?",
    ),
    "data-before-index": (
        lambda: _valid(data_off=IDX - 64),
        f"data section offset {IDX - 64}: expected a multiple of 64 in [{IDX}, {END}]",
    ),
    "count": (
        lambda: _valid(count=1000),
        "1000 tensors need at least 20000 index bytes, the index section has 64",
    ),
    "json": (
        lambda: _meta(b'{"model_type":'),
        "metadata is not valid JSON: Expecting value (char 14)",
    ),
    "json-array": (lambda: _meta(b"[1]"), "metadata must be a JSON object, found an array"),
    "json-utf8": (lambda: _meta(b'{"a":"\xff"}'), "metadata is not valid UTF-8 (byte 6)"),
    "json-nan": (
        lambda: _meta(b'{"a":NaN}'),
        "metadata is not valid JSON: non-standard constant NaN",
    ),
    "name-length": (
        lambda: _container(META, [_entry("x" * 300, 0, [4], 0, 16)], _pad(A4)),
        f"{E0}: name length 300 exceeds the maximum 256",
    ),
    "entry-truncated": (
        lambda: _valid(count=2),
        f"tensor index entry 1 at byte {IDX + 53}: truncated: need 20 bytes, 11 remain",
    ),
    "ndim": (
        lambda: _container(META, [_entry("t", 0, [1] * 9, 0, 4)], _pad(A4)),
        f"{E0} ('t'): ndim 9 exceeds the maximum 8",
    ),
    "dtype": (
        lambda: _container(META, [_entry("t", 2, [4], 0, 8)], _pad(A4)),
        f"{E0} ('t'): unknown dtype code 2",
    ),
    "unsorted": (lambda: _two("b", "a"), "tensor index not sorted: 'a' (entry 1) after 'b'"),
    "duplicate": (lambda: _two("a", "a"), "duplicate tensor name 'a' (entries 0 and 1)"),
    "misaligned": (
        lambda: _two("a", "b", off_b=32),
        "tensor 'b': data offset 32 is not 64-aligned",
    ),
    "overlap": (
        lambda: _two("a", "b", off_b=0),
        "tensor 'b' at data offset 0 overlaps 'a' (ends at 16)",
    ),
    "size": (
        lambda: _container(META, [_entry("t", 0, [4, 8], 0, 100)], _pad(EMB.tobytes())),
        "tensor 't' (dtype code 0, shape [4, 8]): 100 bytes, expected 128 (F32)",
    ),
    "legacy-code-8": (
        lambda: _container(META, [_entry("t", 8, [64], 0, 10)], _pad(A4)),
        "tensor 't' (dtype code 8, shape [64]): 10 bytes, expected 36 (APR_Q4) or 68 (Q8_0)",
    ),
    "huge-shape": (
        lambda: _container(META, [_entry("t", 0, [1 << 62, 0], 0, 0)], b""),
        f"tensor 't': shape [{1 << 62}, 0] is too large",
    ),
    "past-data-end": (
        lambda: _container(META, [_entry("t", 0, [4, 8], 64, 128)], _pad(EMB.tobytes())),
        f"tensor 't': bytes [64, 192) of the data section extend past its end 128 (file is "
        f"{END + 4} bytes: truncated?)",
    ),
    "truncated": (
        lambda: _valid()[:-40],
        f"tensor 'token_embd.weight': bytes [0, 128) of the data section extend past its end 88 "
        f"(file is {END - 36} bytes: truncated?)",
    ),
    "trailing-bytes": (
        lambda: _container(META, [EMB_ENTRY], _pad(EMB.tobytes()) + bytes(64)),
        f"file is {END + 68} bytes, but its index implies {END + 4} (data ends at {END}, then a "
        "4-byte footer CRC)",
    ),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_file_is_refused_with_a_specific_message(tmp_path: Path, case: str) -> None:
    make, message = CORRUPT[case]
    blob = make()
    if case == "header-crc":
        message = message.format(*_header_crc(blob))
    path = tmp_path / "m.apr"
    path.write_bytes(blob)
    with pytest.raises(FormatError) as err:
        open_apr(path)
    assert str(err.value) == f"{path}: {message}"


def test_footer_crc_is_checked_on_demand(tmp_path: Path) -> None:
    blob = _flip(_valid(), DATA + 3)  # a data byte: open stays cheap and succeeds
    ck = _open(tmp_path, blob)
    check = ck.check_footer()
    assert not check.ok and check.stored == int.from_bytes(blob[-4:], "little")
    with pytest.raises(FormatError) as err:
        ck.verify()
    path = tmp_path / "m.apr"
    assert str(err.value) == (
        f"{path}: footer checksum mismatch: stored 0x{check.stored:08x}, computed "
        f"0x{zlib.crc32(blob[:-4]):08x} over bytes [0, {END}) (the file is corrupt)"
    )
    with pytest.raises(FormatError):
        open_apr(path, verify=True)


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 63, 64, 1 << 20])
def test_the_footer_check_is_the_same_whatever_the_chunks(chunk: int) -> None:
    """FooterCrc (which the trace's fingerprint feeds its sha256 chunks) is zlib's CRC32 of all but the
    last 4 bytes against those 4, for chunks shorter than the footer too."""
    blob = _flip(_valid(), DATA + 3)
    crc = FooterCrc()
    for i in range(0, len(blob), chunk):
        crc.update(blob[i : i + chunk])
    assert crc.result() == FooterCheck(int.from_bytes(blob[-4:], "little"), zlib.crc32(blob[:-4]), END)
    assert check_footer(io.BytesIO(blob), len(blob), chunk) == crc.result()


def test_a_checked_footer_is_remembered_by_the_open_file(tmp_path: Path) -> None:
    """`apr inspect --verify` reports the check, then exits on it: one read of the file, not two."""
    ck = _open(tmp_path, _flip(_valid(), DATA + 3))
    first = ck.check_footer()
    (tmp_path / "m.apr").write_bytes(b"")  # a second read would now see nothing
    assert ck.check_footer() is first
    with pytest.raises(FormatError, match="footer checksum mismatch"):
        verify_checkpoint(ck)
    verify_checkpoint(object())  # other formats keep no whole-file checksum


def test_warnings_name_realizars_duplicate_field_trap(tmp_path: Path) -> None:
    ck = _open(tmp_path, _meta(_json(CFG_FULL | {"hidden_dim": 8})))
    assert ck.source.get("hidden_size") == 8
    assert ck.warnings == (
        "metadata spells 'hidden_size' 2 ways (hidden_size, hidden_dim): realizar fails on the "
        "duplicate field and runs this file with empty metadata",
    )


WRITE_ERRORS: dict[str, tuple[list[AprTensor], dict[str, object], type[Exception], str]] = {
    "q4_0": (
        [AprTensor("t", QuantType.Q4_0, (32,), bytes(18))],
        {},
        UnsupportedQuantError,
        "tensor 't' is Q4_0, which .apr cannot hold (aprender has no dtype code for it); "
        "requantize it to Q4_K or Q6_K, or store F16",
    ),
    "alias": (
        [],
        {"n_embd": 8},
        FormatError,
        "metadata key 'n_embd' is realizar's alias of 'hidden_size': write 'hidden_size' only "
        "(realizar drops all metadata of a file that spells a field twice)",
    ),
    "size": (
        [AprTensor("t", QuantType.Q4_K, (2, 256), bytes(100))],
        {},
        FormatError,
        "tensor 't': 100 bytes, but Q4_K [2, 256] needs 288",
    ),
    "dtype": (
        [AprTensor("t", QuantType.F16, (2,), np.ones(2, np.float32))],
        {},
        FormatError,
        "tensor 't' is F16, data is float32",
    ),
    "duplicate": (
        [AprTensor.from_array("t", np.ones(1))] * 2,
        {},
        FormatError,
        "two tensors are named 't'",
    ),
    "name": (
        [AprTensor.from_array("n" * 257, np.ones(1))],
        {},
        FormatError,
        f"tensor name '{'n' * 40}…' is over 256 bytes",
    ),
    "typed": ([], {"num_heads": -1}, FormatError, "metadata 'num_heads' must be uint, found -1"),
}


@pytest.mark.parametrize("case", WRITE_ERRORS)
def test_writer_refuses_what_it_cannot_write_exactly(tmp_path: Path, case: str) -> None:
    tensors, meta, kind, message = WRITE_ERRORS[case]
    path = tmp_path / "w.apr"
    with pytest.raises(kind) as err:
        write_apr(path, tensors, meta)
    assert message in str(err.value)
    assert not path.exists() and list(tmp_path.iterdir()) == []  # atomic: nothing left behind


def test_sniff_claims_apr_magics_only() -> None:
    assert FORMAT.sniff(b"APR\x00\x02\x00", Path("x"))
    assert FORMAT.sniff(b"APRN", Path("x"))  # so that open explains the legacy container
    assert not FORMAT.sniff(b"APRT\x00\x00", Path("x.apr"))  # a stage tensor file
    assert not FORMAT.sniff(b"GGUF", Path("x.apr"))


# --- fuzz: damaged files raise AprError subclasses, never anything else ------------------------


def _fuzz_seed() -> bytes:
    q4k = _with_scales(RNG.integers(0, 256, (2, 144), np.uint8), 144, (0, 2))
    tensors = [
        AprTensor.from_array("token_embd.weight", RNG.standard_normal((4, 8)).astype(np.float16)),
        AprTensor("blk.0.ffn_up.weight", QuantType.Q4_K, (2, 256), q4k),
        AprTensor("blk.0.ffn_down.weight", QuantType.APR_Q8, (2, 4), _apr_q8(np.ones(8))),
        AprTensor.from_array("output_norm.weight", np.ones(8, np.float32)),
    ]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "seed.apr"
        write_apr(
            path, tensors, metadata_for(apr_keys_of(LLAMA), TOK, shapes={t.name: t.shape for t in tensors})
        )
        return path.read_bytes()


SEED = _fuzz_seed()


def _exercise(path: Path) -> None:
    ck = open_apr(path)
    for info in ck.tensors():
        ck.read(info.name)
        if len(info.shape) == 2 and info.shape[0]:
            ck.read_rows(info.name, np.array([0]))
    ck.tokenizer_spec()
    ck.verify()


def _damage(seed: bytes, cut: int | None, flips: list[tuple[int, int]], rehash: bool) -> bytes:
    blob = bytearray(seed[:cut])
    for at, mask in flips:
        if at < len(blob):
            blob[at] ^= mask
    if rehash and len(blob) >= 64:  # re-sign the header so damaged fields get past its CRC
        blob[40:44] = zlib.crc32(bytes(blob[:40] + blob[44:64])).to_bytes(4, "little")
    return bytes(blob)


@settings(max_examples=500, deadline=None)
@given(
    cut=st.none() | st.integers(0, len(SEED) - 1),
    flips=st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(1, 255)), max_size=4),
    rehash=st.booleans(),
)
def test_damaged_files_raise_only_apr_errors(
    cut: int | None, flips: list[tuple[int, int]], rehash: bool
) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.apr"
        path.write_bytes(_damage(SEED, cut, flips, rehash))
        with contextlib.suppress(AprError):
            _exercise(path)


def test_lookups_and_lifecycle(tmp_path: Path) -> None:
    path = tmp_path / "m.apr"
    path.write_bytes(
        _container(META, [_entry("model.embed_tokens.weight", 0, [4, 8], 0, 128)], _pad(EMB.tobytes()))
    )
    with open_apr(path) as ck:
        assert [t.name for t in ck.tensors()] == ["model.embed_tokens.weight"]  # stored names
        with pytest.raises(NotFoundError) as err:
            ck.info("model.embed_tokens.weigth")
        assert str(err.value) == (
            f"{path}: no tensor named 'model.embed_tokens.weigth' (did you mean 'model.embed_tokens.weight'?)"
        )
        name = "model.embed_tokens.weight"
        np.testing.assert_array_equal(ck.read_rows(name, slice(None, None, -1)), EMB[::-1])
        assert ck.read(name).flags.writeable
    with pytest.raises(AprError, match="the checkpoint is closed"):
        ck.read("token_embd.weight")


@pytest.mark.parametrize(
    ("code", "size", "qtype"),
    [(8, 2 * 18, QuantType.APR_Q4), (8, 2 * 34, QuantType.Q8_0), (9, 4 + 64, QuantType.APR_Q8)],
)
def test_pre_gh438_codes_are_resolved_by_size(tmp_path: Path, code: int, size: int, qtype: QuantType) -> None:
    blob = _container(META, [_entry("t", code, [64], 0, size)], _pad(bytes(size)))
    assert _open(tmp_path, blob).info("t").qtype is qtype


def test_an_empty_tensor_may_share_an_offset(tmp_path: Path) -> None:
    """aprender's streaming writer keeps insertion order: an empty tensor shares the next one's offset."""
    entries = [_entry("a", 0, [4], 0, 16), _entry("z", 0, [0], 0, 0)]
    ck = _open(tmp_path, _container(META, entries, _pad(A4)))
    assert ck.read("z").shape == (0,) and ck.raw("z").size == 0


def test_q8_0_is_written_as_code_8_and_read_back_by_size(tmp_path: Path) -> None:
    """realizar reads dtype code 8 as GGML Q8_0 when the size fits; so does our reader."""
    from gguf.quants import dequantize as gguf_dequantize

    from apr.quant import quantize

    values = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    blocks = quantize(values, QuantType.Q8_0)
    path = tmp_path / "q.apr"
    write_apr(path, [AprTensor("w", QuantType.Q8_0, (4, 64), blocks)], CFG_FULL)
    raw = path.read_bytes()
    index = int.from_bytes(raw[24:32], "little")
    assert raw[index + 2 + 1] == 8  # name_len u16, name "w", then the dtype code
    ck = open_apr(path)
    assert ck.info("w").qtype == QuantType.Q8_0
    expected = gguf_dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).reshape(4, 64)
    assert np.array_equal(ck.read("w"), expected)
