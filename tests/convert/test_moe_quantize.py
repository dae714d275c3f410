"""`--quantize` on a MoE: the 3-D expert stacks are quantized like every weight (aprender's dispatch_quantize
skips norms, biases and tiny tensors, never a tensor for its number of dims), so a requantized .apr holds
the same weights as the GGUF `apr convert` writes from it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from apr.models import open_model
from apr.quant.types import QuantType
from tests.fixtures.cli import run
from tests.fixtures.zoo import ZooModel


def test_expert_stacks_are_quantized_as_the_gguf_output_quantizes_them(
    zoo: Callable[[str], ZooModel], tmp_path: Path
) -> None:
    src = tmp_path / "m.apr"
    assert run("import", str(zoo("mixtral").gguf), "-o", str(src))[0] == 0
    q8_apr, q8_gguf = tmp_path / "q8.apr", tmp_path / "q8.gguf"
    code, out, err = run("convert", str(src), "-o", str(q8_apr), "--quantize", "q8_0", "--json")
    assert code == 0, err
    assert run("convert", str(src), "-o", str(q8_gguf), "--quantize", "q8_0")[0] == 0
    a, g = open_model(q8_apr), open_model(q8_gguf)
    stacks = [t for t in a.tensors() if len(t.shape) == 3]
    assert stacks and all(t.qtype is QuantType.Q8_0 for t in stacks)
    quantized = {m["name"] for m in json.loads(out)["quantize"]["matrices"]}
    assert {t.name for t in stacks} <= quantized
    assert {t.name for t in a.tensors()} == {t.name for t in g.tensors()}
    for t in a.tensors():
        assert t.qtype is g.info(t.name).qtype, t.name
        assert np.array_equal(a.read(t.name), g.read(t.name)), t.name


def test_import_quantize_covers_expert_stacks(zoo: Callable[[str], ZooModel], tmp_path: Path) -> None:
    out = tmp_path / "q8.apr"
    code, text, _ = run("import", str(zoo("mixtral").gguf), "-o", str(out), "--quantize", "q8_0")
    assert code == 0 and "  18 matrices: 18 Q8_0\n" in text  # 6 of them expert stacks
    assert open_model(out).info("blk.0.ffn_down_exps.weight").qtype is QuantType.Q8_0
