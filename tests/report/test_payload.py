"""`apr trace --payload` warnings are calibrated on the model's own layers (trace/payload.py).

The real SmolLM2-135M (Q4_1 and its F32 copy by gguf-py) is healthy and has a layer-output std of ~393 from
layer 11 on: 0 warnings (aprender's fixed "output std > 50" is only reported, as information). A copy with
one layer's ffn_norm weight scaled by 100 — the layer drawn at random, the seed printed — is flagged there.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np

from tests.fixtures.cli import run


def warnings(model: Path) -> tuple[list[str], str]:
    code, out, err = run("trace", str(model), "--payload")
    assert code == 0, err
    summary = out[out.index("TRACE SUMMARY:") :]
    return re.findall(r"WARNING: (.*)", summary), summary


def test_healthy_smollm2_has_no_warnings(smollm2_gguf: Path) -> None:
    found, summary = warnings(smollm2_gguf)
    assert found == [] and "no anomalies" in summary
    assert "aprender's fixed rule (output std > 50) fires on 19 of 30 layers (first: layer 11)" in summary


def test_a_x100_fault_in_one_layer_is_flagged_there(smollm2_f32_gguf: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader

    assert warnings(smollm2_f32_gguf)[0] == []  # the unfaulted F32 copy is healthy too
    seed = int.from_bytes(os.urandom(4), "little")
    layer = random.Random(seed).randrange(30)
    print(f"seed {seed}: blk.{layer}.ffn_norm.weight × 100")
    bad = tmp_path / "bad.gguf"
    shutil.copyfile(smollm2_f32_gguf, bad)
    t = next(t for t in GGUFReader(smollm2_f32_gguf).tensors if t.name == f"blk.{layer}.ffn_norm.weight")
    data = np.memmap(bad, dtype="<f4", mode="r+", offset=int(t.data_offset), shape=(int(t.n_elements),))
    data *= np.float32(100)
    data.flush()
    del data
    found, _ = warnings(bad)
    assert found, "no warning for the faulty layer"
    layers = [int(m) for w in found for m in re.findall(r"^layer (\d+) ", w)]
    assert layers[0] == layer and min(layers) == layer, found  # flagged there, nothing before it
    assert any(w.startswith(f"layer {layer} ffn_out std ") for w in found), found
