"""Every zoo family (tests/fixtures/zoo.py): apr's ids equal llama.cpp's on the GGUF that llama.cpp's own
converter wrote, and transformers' on the HF folder it was converted from. SentencePiece families (llama,
mistral, mixtral, gemma2/3, phi3) and byte-level ones (llama3, qwen2/3, granite, olmo2, MoEs) alike.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from apr.formats.gguf import open_gguf
from apr.formats.tokenizer import build_tokenizer
from apr.formats.tokenizer_hf import hf_spec
from tests.fixtures.zoo import FAMILIES, ZooModel
from tests.formats.test_tokenizer_spm import HARD, corpus

_POOL = ["<s>", "</s>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<bos>", "<eos>",
         "<start_of_turn>", "<end_of_turn>", "<|end|>", "<|user|>", " ", "  ", "\n", "\t", "a", "the",
         " quick", "日本", "🤖", "\u200d", "é", "e\u0301", "1", "23", "x", "▁"]  # fmt: skip


def texts() -> list[str]:
    rng = random.Random(3)
    mixed = ["".join(rng.choice(_POOL) for _ in range(rng.randint(0, 12))) for _ in range(300)]
    return [*HARD, *corpus(150, seed=9), *mixed]


@pytest.mark.oracle
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_equals_llama_cpp(zoo: Callable[[str], ZooModel], family: str) -> None:
    import llama_cpp as llama_cpp

    model = zoo(family)
    spec = open_gguf(model.gguf).tokenizer_spec()
    assert spec is not None
    tok = build_tokenizer(spec)
    llm: Any = llama_cpp.Llama(model_path=str(model.gguf), vocab_only=True, verbose=False)
    sample = texts()
    assert [tok.encode(t) for t in sample] == [
        llm.tokenize(t.encode(), add_bos=True, special=True) for t in sample
    ]


@pytest.mark.oracle
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_equals_transformers(zoo: Callable[[str], ZooModel], family: str) -> None:
    import transformers as transformers

    model = zoo(family)
    spec = hf_spec(model.hf_dir)
    assert spec is not None
    tok = build_tokenizer(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoTokenizer.from_pretrained(model.hf_dir)
    sample = texts()
    assert [tok.encode(t) for t in sample] == [hf.encode(t) for t in sample]
