"""`apr export` of a GGUF with a SentencePiece vocab writes a tokenizer.json that transformers loads and that
tokenizes as llama.cpp does on the GGUF (the oracles: `AutoTokenizer` on the export, `Llama(vocab_only=True)`
on the GGUF; tolerance: none). Llama, Mistral, Gemma 2 and Phi-3 GGUFs of the zoo, converted by llama.cpp's
convert_hf_to_gguf.py from tokenizer.model files sentencepiece trained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from apr.cli import cli
from apr.formats.tokenizer_probe import PROBES
from tests.fixtures.zoo import ZooModel

pytestmark = pytest.mark.oracle

TEXTS = [t for _, t in PROBES] + [
    "<s>Hi <s> end </s>",
    "Hello<unk>world",
    "aaaaaaa bbbb    ccc",
    "   ",
    "\n\n\t x",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "phi3"])
def test_the_exported_tokenizer_json_tokenizes_as_llama_cpp(family: str, zoo: Any, tmp_path: Path) -> None:
    import llama_cpp
    from transformers import AutoTokenizer

    z: ZooModel = zoo(family)
    out = tmp_path / "hf"
    r = CliRunner().invoke(cli, ["export", str(z.gguf), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert not [n for n in report["notes"] if n.startswith("tokenizer")], report["notes"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    llm = llama_cpp.Llama(str(z.gguf), vocab_only=True, verbose=False)
    try:
        want = [list(llm.tokenize(t.encode(), add_bos=True, special=True)) for t in TEXTS]
    finally:
        llm.close()
    assert [tok(t)["input_ids"] for t in TEXTS] == want
    # the text comes back (the space prefix stripped again), bytes fallen back to included
    plain = [t for t in TEXTS if "<" not in t]
    assert [tok.decode(tok(t)["input_ids"], skip_special_tokens=True) for t in plain] == plain
