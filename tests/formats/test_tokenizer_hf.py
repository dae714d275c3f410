"""HF tokenizer folders: apr's ids equal transformers' `AutoTokenizer.from_pretrained(folder).encode(text)`.

The folders are Llama-2 style: a SentencePiece model trained here (tests/formats/test_tokenizer_spm.py),
converted to tokenizer.json by transformers itself, with a tokenizer_config.json stating add_bos_token. Also
the older tokenizer.json layout (normalizer Prepend + Replace, no pre-tokenizer) that transformers 5
rebuilds for LlamaTokenizer, the legacy / add_prefix_space / add_eos_token switches, and a folder whose
class keeps tokenizer.json as it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import transformers as transformers
from hypothesis import given, settings

from apr.formats.base import TokenizerSpec
from apr.formats.tokenizer import Tokenizer, build_tokenizer
from apr.formats.tokenizer_hf import hf_spec
from tests.formats.test_tokenizer_spm import HARD, TEXT, corpus, train

LLAMA2_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "add_bos_token": True, "add_eos_token": False, "legacy": False, "clean_up_tokenization_spaces": False,
}  # fmt: skip
# transformers 4's tokenizer.json for Llama-2: the "▁" comes from the normalizer, there is no pre-tokenizer
V4_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ],
}
VARIANTS: dict[str, tuple[bool, dict[str, Any]]] = {  # name → (transformers 4 layout, config changes)
    "llama2": (False, {}),
    "llama2-eos": (False, {"add_eos_token": True}),  # transformers 5 ignores it: the file's template rules
    "v4": (True, {}),
    "v4-legacy": (True, {"legacy": True}),
    "v4-no-prefix": (True, {"add_prefix_space": False, "add_bos_token": False}),
    "generic": (True, {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": None}),
    "no-post-processor": (False, {}),  # and add_bos_token true: transformers 5 adds no BOS
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.json written by transformers from a trained tokenizer.model."""
    src, out = tmp_path_factory.mktemp("spm-src"), tmp_path_factory.mktemp("spm-hf")
    src.joinpath("tokenizer.model").write_bytes(train().serialized_model_proto())
    src.joinpath("tokenizer_config.json").write_text(json.dumps(LLAMA2_CONFIG))
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out / "tokenizer.json"


@pytest.fixture(scope="module", params=list(VARIANTS))
def folder(request: pytest.FixtureRequest, converted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    v4, changes = VARIANTS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    doc = json.loads(converted.read_text())
    if v4:
        doc["normalizer"], doc["pre_tokenizer"] = V4_NORMALIZER, None
    if request.param == "no-post-processor":
        doc["post_processor"] = None
    out.joinpath("tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False))
    config = {k: v for k, v in {**LLAMA2_CONFIG, **changes}.items() if v is not None}
    out.joinpath("tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def pair(folder: Path) -> tuple[Tokenizer, Any]:
    spec = hf_spec(folder)
    assert spec is not None
    return build_tokenizer(spec), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.oracle
def test_fixed_texts_equal_transformers(pair: tuple[Tokenizer, Any]) -> None:
    tok, hf = pair
    texts = [*HARD, *corpus(300, seed=4)]
    assert [tok.encode(t) for t in texts] == [hf.encode(t) for t in texts]


@pytest.mark.oracle
@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_random_text_equals_transformers(pair: tuple[Tokenizer, Any], text: str) -> None:
    tok, hf = pair
    assert tok.encode(text) == hf.encode(text)


@pytest.mark.oracle
def test_llama2_folder_gets_its_bos(folder: Path, pair: tuple[Tokenizer, Any]) -> None:
    """BOS comes from tokenizer.json's post-processor, whatever tokenizer_config.json says."""
    tok, hf = pair
    ids = tok.encode("hello")
    assert (ids[0] == 1) == (folder.name.startswith("no-post-processor") is False)
    assert ids == hf.encode("hello")


@pytest.mark.oracle
def test_spec_has_the_real_vocab(folder: Path, pair: tuple[Tokenizer, Any]) -> None:
    """What `apr inspect` shows: the vocab size, merges, special tokens, BOS / EOS and their flags."""
    _, hf = pair
    spec = hf_spec(folder)
    assert spec is not None
    doc = json.loads(folder.joinpath("tokenizer.json").read_text())
    assert len(spec.tokens) == len(hf) and len(spec.merges) == len(doc["model"]["merges"])
    assert (spec.bos_id, spec.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert spec.add_bos == (hf.encode("")[:1] == [hf.bos_token_id])
    assert spec.add_eos == (hf.encode("")[-1:] == [hf.eos_token_id])
    assert sum(t in (3, 4) for t in spec.token_types) == len(doc["added_tokens"])


def test_no_tokenizer_json_is_no_spec(tmp_path: Path) -> None:
    assert hf_spec(tmp_path) is None


def test_inspect_of_an_hf_folder(converted: Path, tmp_path: Path) -> None:
    """`apr inspect` of an HF folder shows the tokenizer's size and BOS (it said 0 tokens, bos None)."""
    from safetensors.numpy import save_file

    from tests.fixtures.cli import run

    shutil.copy(converted, tmp_path / "tokenizer.json")
    tmp_path.joinpath("tokenizer_config.json").write_text(json.dumps(LLAMA2_CONFIG))
    n, d, f = len(json.loads(converted.read_text())["model"]["vocab"]), 16, 32
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
           "intermediate_size": f, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
           "vocab_size": n, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
    tmp_path.joinpath("config.json").write_text(json.dumps(cfg))
    p = "model.layers.0."
    shapes = {"model.embed_tokens.weight": (n, d), "model.norm.weight": (d,),
              p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
              p + "mlp.gate_proj.weight": (f, d),
              p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
              **{p + f"self_attn.{x}_proj.weight": (d, d) for x in "qkvo"}}  # fmt: skip
    save_file({k: np.zeros(s, np.float32) for k, s in shapes.items()}, str(tmp_path / "model.safetensors"))
    code, out, err = run("inspect", "--json", str(tmp_path))
    assert code == 0, err
    t = json.loads(out)["tokenizer"]
    assert (t["model"], t["vocab_size"], t["bos_id"], t["eos_id"], t["add_bos"]) == (
        "tokenizer.json",
        n,
        1,
        2,
        True,
    )
    assert t["merges"] > 0 and t["special_tokens"] == len(json.loads(converted.read_text())["added_tokens"])


def test_tokenizer_json_spec_without_folder_files(converted: Path, tmp_path: Path) -> None:
    """A bare tokenizer.json (no tokenizer_config.json beside it) is used as the file says."""
    shutil.copy(converted, tmp_path / "tokenizer.json")
    tok = build_tokenizer(TokenizerSpec(model="tokenizer.json", json_path=tmp_path / "tokenizer.json"))
    assert tok.encode("hello")[0] == 1  # transformers' converted file adds BOS in its post-processor
