"""HF safetensors folders: every tensor against the `safetensors` package; strict header checks."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from apr.errors import FormatError, ModelLoadError
from apr.formats import detect_format, open_checkpoint
from apr.formats.config import QKLayout
from apr.formats.safetensors import parse_header
from apr.models import open_model
from apr.quant.types import QuantType
from tests.fixtures.zoo import ZooModel


def test_every_tensor_equals_the_safetensors_package(smollm2_hf: Path) -> None:
    ck = open_model(smollm2_hf)
    ref = load_file(smollm2_hf / "model.safetensors")
    assert ck.format_name == "safetensors" and len(ck.tensors()) == len(ref) == 272
    for t in ck.tensors():
        assert np.array_equal(ck.read(t.name), ref[t.source_name]), t.name
    rows = np.array([1780, 3, 1780], np.int64)
    emb = ck.read_rows("token_embd.weight", rows)
    assert np.array_equal(emb, ref["model.embed_tokens.weight"][rows])
    assert ck.info("blk.3.attn_q.weight").source_name == "model.layers.3.self_attn.q_proj.weight"


def test_config_from_config_json(smollm2_hf: Path, smollm2_gguf: Path) -> None:
    hf, gguf = open_model(smollm2_hf).config, open_model(smollm2_gguf).config
    assert hf.qk_layout is QKLayout.HF and gguf.qk_layout is QKLayout.INTERLEAVED
    for field in (
        "hidden_size",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
        "rope_theta",
        "tied_embeddings",
        "qkv_bias",
        "qk_norm",
    ):
        assert getattr(hf, field) == getattr(gguf, field), field
    assert hf.rms_eps == pytest.approx(gguf.rms_eps)


def _folder(tmp_path: Path, tensors: dict[str, torch.Tensor], cfg: dict | None = None) -> Path:
    save_file(tensors, tmp_path / "model.safetensors")
    base = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 8,
        "vocab_size": 3,
    }
    (tmp_path / "config.json").write_text(json.dumps(base | (cfg or {})))
    return tmp_path


def test_f16_and_bf16_are_read_exactly(tmp_path: Path) -> None:
    x = torch.randn(3, 4)
    ck = open_checkpoint(
        _folder(
            tmp_path,
            {"model.embed_tokens.weight": x.to(torch.bfloat16), "model.norm.weight": x[0].to(torch.float16)},
        )
    )
    assert ck.info("model.embed_tokens.weight").qtype is QuantType.BF16
    assert np.array_equal(ck.read("model.embed_tokens.weight"), x.to(torch.bfloat16).float().numpy())
    assert np.array_equal(ck.read("model.norm.weight"), x[0].to(torch.float16).float().numpy())
    assert np.array_equal(
        ck.read_rows("model.embed_tokens.weight", slice(1, 3)), x[1:3].to(torch.bfloat16).float().numpy()
    )


def test_sharded_folder(tmp_path: Path) -> None:
    save_file({"model.embed_tokens.weight": torch.ones(3, 4)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"model.norm.weight": torch.ones(4) * 2}, tmp_path / "model-00002-of-00002.safetensors")
    index = {
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
        }
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["Qwen2ForCausalLM"],
                "hidden_size": 4,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 8,
                "vocab_size": 3,
            }
        )
    )
    assert detect_format(tmp_path).name == "safetensors"
    ck = open_checkpoint(tmp_path)
    assert ck.source.architecture == "Qwen2ForCausalLM" and ck.read("model.norm.weight").tolist() == [2.0] * 4


def _raw(tmp_path: Path, header: bytes, body: bytes = b"") -> Path:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return p


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"\x01\x02"), "safetensors header length truncated: 2 of 8 bytes"),
        (
            lambda p: p.write_bytes(struct.pack("<Q", 1 << 40)),
            "safetensors header length 1099511627776 exceeds the file (8 bytes)",
        ),
        (lambda p: p.write_bytes(struct.pack("<Q", 3) + b"{x}"), "safetensors header is not valid JSON"),
        (lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]"), "safetensors header is not a JSON object"),
    ],
)
def test_hostile_headers(tmp_path: Path, make: object, message: str) -> None:
    p = tmp_path / "x.safetensors"
    make(p)  # type: ignore[operator]
    with pytest.raises(FormatError) as e:
        parse_header(p)
    assert str(e.value).startswith(f"{p}: {message}")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},
            "data_offsets [0, 4] hold 4 bytes, shape [2] × F32 needs 8",
        ),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "data ends at byte"),
        ({"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, "unsupported dtype C64"),
        ({"dtype": "F32", "shape": "x"}, "'shape' must be an array, found a string"),
        (
            {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
            "'dtype' must be a string, found an array",
        ),
        (
            {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]},
            "'shape'[0] must be an integer, found a number",
        ),
        (
            {"dtype": "F32", "shape": [1 << 63, 0], "data_offsets": [0, 0]},
            "shape [9223372036854775808, 0] has a dimension above 1099511627776",
        ),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "'data_offsets' must be [begin, end]"),
    ],
)
def test_hostile_entries(tmp_path: Path, entry: dict, message: str) -> None:
    header = json.dumps({"model.norm.weight": entry}).encode()
    (tmp_path / "config.json").write_text("{}")
    p = _raw(tmp_path, header, b"\0\0\0\0")
    with pytest.raises(FormatError) as e:
        open_model(p)
    assert f"{p}: tensor model.norm.weight: {message}" in str(e.value)


def test_unsupported_architecture_and_rope_scaling(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"model.norm.weight": torch.ones(4)}, {"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ModelLoadError, match=r"architecture 'GPT2LMHeadModel' is not supported"):
        open_model(folder)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": 4,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 8,
                "vocab_size": 3,
                "rope_scaling": {"rope_type": "longrope", "factor": 8.0},
            }
        )
    )
    with pytest.raises(ModelLoadError, match="rope scaling type 'longrope' is not implemented"):
        open_model(folder)


def test_folder_without_config_is_a_clear_error(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, tmp_path / "w.safetensors")
    with pytest.raises(FormatError, match="no config.json next to the safetensors weights"):
        open_model(tmp_path / "w.safetensors")


def _sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """`tensors` split over two shards and an index, as transformers' save_pretrained writes them."""
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[:1], "model-00002-of-00002.safetensors": names[1:]}
    for shard, part in halves.items():
        save_file({n: tensors[n] for n in part}, folder / shard)
    index = {"weight_map": {n: shard for shard, part in halves.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_stale_model_safetensors_beside_a_sharded_index_is_refused(
    zoo: Callable[[str], ZooModel], tmp_path: Path
) -> None:
    """transformers loads model.safetensors when it exists and apr read the index's shards: `apr trace DIR`
    and `--engine transformers` traced different weights, silently. Such a folder is refused."""
    folder = tmp_path / "hf"
    shutil.copytree(zoo("llama").hf_dir, folder)
    tensors = {k: torch.from_numpy(v) for k, v in load_file(folder / "model.safetensors").items()}
    _sharded(folder, tensors)
    save_file({k: v * 2 for k, v in tensors.items()}, folder / "model.safetensors")  # different weights
    message = (
        f"{folder}: holds both model.safetensors and model.safetensors.index.json (sharded weights); "
        "transformers would load model.safetensors, apr the shards: remove the stale one"
    )
    for opens in (open_checkpoint, open_model):
        with pytest.raises(FormatError) as e:
            opens(folder)
        assert str(e.value) == message
    from apr.runtimes.transformers import run_transformers

    with pytest.raises(FormatError) as e:  # the runtime's own loader checks too (a library caller)
        run_transformers(folder, [1], lambda sid, x: None)
    assert str(e.value) == message
    (folder / "model.safetensors").unlink()  # the shards alone: what both load
    assert {t.name for t in open_checkpoint(folder).tensors()} == set(tensors)


def test_an_index_naming_only_model_safetensors_is_one_set_of_weights(tmp_path: Path) -> None:
    save_file({"model.norm.weight": torch.ones(4)}, tmp_path / "model.safetensors")
    index = {"weight_map": {"model.norm.weight": "model.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    assert open_checkpoint(tmp_path).read("model.norm.weight").tolist() == [1.0] * 4


def test_unindexed_shards_beside_pytorch_weights_are_refused(tmp_path: Path) -> None:
    """transformers never loads shards without their index: it takes pytorch_model.bin."""
    _sharded(tmp_path, {"a": torch.ones(1), "b": torch.ones(1)})
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    assert {t.name for t in open_checkpoint(tmp_path).tensors()} == {"a", "b"}
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FormatError) as e:
        open_checkpoint(tmp_path)
    assert str(e.value) == (
        f"{tmp_path}: holds model-00001-of-00002.safetensors... without model.safetensors.index.json, and "
        "pytorch_model.bin; transformers would load pytorch_model.bin, apr the shards: remove the stale one "
        "or add the index"
    )


@pytest.mark.parametrize(
    ("files", "holds"),
    [
        (("model.safetensors", "tokenizer.json"), "model.safetensors, tokenizer.json"),
        (("tokenizer_config.json", "tokenizer.model"), "tokenizer.model, tokenizer_config.json"),
    ],
)
def test_an_hf_folder_without_config_json_says_so(tmp_path: Path, files: tuple[str, ...], holds: str) -> None:
    for name in files:
        if name.endswith(".safetensors"):
            save_file({"a": torch.ones(1)}, tmp_path / name)
        else:
            (tmp_path / name).write_text("{}")
    with pytest.raises(FormatError) as e:
        open_model(tmp_path)
    assert str(e.value) == (
        f"{tmp_path}: no config.json in this Hugging Face folder (it holds {holds}); "
        "copy the model's config.json into it"
    )


def test_a_folder_of_something_else_is_still_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FormatError, match="not a model file this tool can read"):
        detect_format(tmp_path)
