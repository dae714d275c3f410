"""`apr bisect --isolate` re-runs B's layers in B's OWN engine (diff/isolate.py).

A tiny HF model (llama, 2 layers; mistral; gemma3) against a copy whose layer-0 up_proj has half its rows
scaled by 1.01, B in transformers: the faulty stage's own error is the fault; the later layers' own error is
transformers-vs-reference rounding (> 0: a reference re-run of B's unchanged layer would give exactly 0;
< 1e-5: f32 state tolerance) and they inherit the fault. The JSON, text and HTML report carry it. llama.cpp
cannot be fed a hidden state: refused in one line, exit 5, before anything runs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fixtures.cli import run
from tests.fixtures.zoo import ZooModel

FAULT = "model.layers.0.mlp.up_proj.weight"


def faulty_copy(hf_dir: Path, out: Path, tensor: str, factor: float) -> Path:
    from safetensors.numpy import load_file, save_file

    out.mkdir()
    for f in hf_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    tensors = load_file(hf_dir / "model.safetensors")
    half = tensors[tensor].shape[0] // 2  # half the rows: a whole-tensor scale a later norm would undo
    tensors[tensor][:half] *= np.float32(factor)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def bisect_isolated(z: ZooModel, tmp: Path, text: bool = True) -> tuple[int, dict[str, Any], str, str]:
    b = faulty_copy(z.hf_dir, tmp / "b", FAULT, 1.01)
    ids = ",".join(map(str, z.token_ids()))
    page = tmp / "report.html"
    args = ("bisect", str(z.hf_dir), str(b), "--engine-b", "transformers", "--isolate", "--tokens", ids)
    code, out, err = run(*args, "--json", "--report", str(page))
    assert err == "", err
    return code, json.loads(out), page.read_text(), run(*args)[1] if text else ""


@pytest.fixture(scope="module")
def isolated(zoo: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], str, str]:
    return bisect_isolated(zoo("llama"), tmp_path_factory.mktemp("isolate"))


# llama; mistral: a sliding window (4) shorter than the prompt; gemma3: sliding and global layers with their
# own RoPE — the masks and rotary embeddings of the isolated layers are the model's own, or layer 1 would not
# be ~1e-7 from A
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])
def test_own_error_is_bs_engine_on_as_input(family: str, zoo: Any, tmp_path: Path) -> None:
    code, doc, _, _ = bisect_isolated(zoo(family), tmp_path, text=False)
    assert code == 1 and doc["first_divergence"]["id"] == "blk.0.ffn_up"
    own = {x["id"]: x for x in doc["isolated"]}
    assert {x["engine"] for x in doc["isolated"]} == {"transformers"}
    fault = own["blk.0.ffn_up"]
    assert 2e-3 < fault["own_error"] < 1e-2  # the 1 % scale of half the channels, made here
    assert fault["inherited"] < 1e-5
    later = [x for x in doc["isolated"] if not x["id"].startswith("blk.0.")]
    assert len(later) >= 15
    assert all(x["own_error"] < 1e-5 for x in later), later  # f32 state tolerance
    assert any(x["own_error"] > 0 for x in later)  # transformers really ran it (reference: exactly 0)
    assert own["blk.1.post_ffn_residual"]["inherited"] > 1e-4  # the fault carried in from layer 0


def test_isolate_in_text_and_html(isolated: tuple[int, dict[str, Any], str, str]) -> None:
    _, _, page, text = isolated
    assert "isolated: each layer of B run alone in transformers on A's input" in text
    own = re.search(
        r"isolated \(B's layer in transformers on A's input\): own error (\S+), inherited (\S+)", text
    )
    assert own is not None and float(own.group(1)) > 2e-3 and float(own.group(2)) < 1e-5, text
    assert '<svg class="isolate"' in page and "run alone in transformers" in page
    table = page[page.index('<div class="isolate-table">') :]
    cells = [re.findall(r"<td>([^<]*)</td>", row) for row in table.split("</tr>")[1:3]]
    assert [c[0] for c in cells] == ["0", "1"]  # layer, output own, output inherited, stage, own, inherited
    assert float(cells[0][4]) > 2e-3 and float(cells[1][1]) < 1e-5 < float(cells[1][2])


def test_llamacpp_cannot_isolate_exit_5(zoo: Any) -> None:
    z: ZooModel = zoo("llama")
    code, out, err = run("bisect", str(z.gguf), str(z.gguf), "--engine-b", "llama.cpp", "--isolate", "--json")
    expected = (
        "--isolate cannot re-run B's layers in llama.cpp: llama.cpp runs its graph from token ids and cannot "
        "be fed a hidden state (isolate with --engine-b reference or transformers)"
    )
    assert (code, err) == (5, f"error: {expected}\n")
    assert json.loads(out) == {"error": expected, "exit_code": 5}
