"""`apr diff MODEL_A MODEL_B`: both tokenizers encode the probe texts, as `apr trace` tokenizes a prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from apr.diff.models import diff_models
from apr.models import open_model
from tests.fixtures.cli import run
from tests.fixtures.zoo import ZooModel


def test_a_gguf_that_keeps_digits_whole_differs_from_hf_that_splits_them(zoo: Any) -> None:
    z: ZooModel = zoo("qwen2")  # same vocab and merges; tokenizer.ggml.pre "gpt-2" vs Qwen2Tokenizer
    code, out, _ = run("diff", str(z.gguf), str(z.hf_dir), "--check")
    assert code == 1, out
    assert "tokenizer: differs (400 tokens, 141 merges)" in out
    assert (
        "  encodes the 'digits' probe 'Hello world, 12 cats and 3456 do…' differently at position 10: "
        "A […, 389, 20, 223, 69, 67, 86, …] → B […, 223, 19, 20, 223, 69, 67, …]"
    ) in out
    assert out.endswith("=> the models differ in what they compute\n")
    doc = json.loads(run("diff", str(z.gguf), str(z.hf_dir), "--json")[1])
    assert doc["differs"] is True and doc["verdict"] == "differ"
    (probe,) = doc["tokenizer"]["probes"]["differ"]
    assert (probe["probe"], probe["position"]) == ("digits", 10)
    assert probe["a"][10:12] == [389, 20] and probe["b"][10:13] == [223, 19, 20]


def test_spm_gguf_and_hf_part_ways_on_a_leading_space_and_special_tokens(zoo: Any) -> None:
    z: ZooModel = zoo("llama")  # llama.cpp's "▁" prefix before " Hello"; transformers' LlamaTokenizer none
    t = diff_models(open_model(z.gguf), open_model(z.hf_dir)).tokenizer
    assert t.probes is not None and not t.probes.problems
    assert [(p.name, p.position) for p in t.probes.differ] == [("leading space", 1), ("special tokens", 2)]
    assert t.probes.differ[0].a_ids[:3] == (1, 354, 321) and t.probes.differ[0].b_ids[:2] == (1, 321)
    assert t.differs and not t.first_token and not t.fields


def test_the_same_tokenizer_encodes_every_probe_alike(zoo: Any) -> None:
    z: ZooModel = zoo("granite")
    t = diff_models(open_model(z.gguf), open_model(z.hf_dir)).tokenizer
    assert t.probes is not None and (t.probes.compared, t.probes.differ, t.probes.problems) == (11, [], [])
    code, out, _ = run("diff", str(z.gguf), str(z.hf_dir), "--check")
    assert code == 0 and "tokenizer: identical (400 tokens, 141 merges; 11 probe texts encode alike)" in out


def test_a_tokenizer_that_cannot_be_built_is_named_and_never_identical(zoo: Any, tmp_path: Path) -> None:
    z: ZooModel = zoo("qwen3")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in z.hf_dir.iterdir():
        (bad / f.name).symlink_to(f) if f.name != "tokenizer.json" else None
    tok = json.loads((z.hf_dir / "tokenizer.json").read_text()) | {"pre_tokenizer": {"type": "Bogus"}}
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    code, out, _ = run("diff", str(z.hf_dir), str(bad), "--check")
    assert code == 0, out  # nothing compared differs; what was not compared is named
    assert "tokenizer: same vocabulary, encoding not compared (400 tokens, 141 merges)" in out
    assert f"  not compared: B: its tokenizer cannot be built: {bad}/tokenizer.json: cannot build" in out
    verdict = (
        "=> no difference found in what was compared; not compared: the tokenizers' encoding "
        "(a side could not tokenize)\n"
    )
    assert out.endswith(verdict) and "no difference in the math" not in out
    doc = json.loads(run("diff", str(z.hf_dir), str(bad), "--json")[1])
    assert (doc["differs"], doc["verdict"]) == (False, "unverified")
    assert "=> " + doc["verdict_text"] + "\n" == verdict
    assert doc["tokenizer"]["probes"]["not_compared"][0].startswith("B: its tokenizer cannot be built")
