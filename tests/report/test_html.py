"""The bisect HTML report, rendered by a real browser (Debian's chromium, headless; `make dev` installs it).

A fault is injected into one tensor of the tiny llama's F32 GGUF; the report of `apr bisect --isolate` is
loaded by chromium: no console errors, the charts' SVG elements are in the rendered DOM (a heatmap cell per
compared stage, the diverging row, a tick per layer, isolate bars, both sides' top-1 tokens per position),
and the screenshot is not blank.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fixtures.cli import run
from tests.fixtures.gguf_edit import scale_tensor as corrupt
from tests.fixtures.zoo import ZooModel

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0",
)  # fmt: skip
CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\] (.*)")
FAULT = "blk.1.ffn_up.weight"


def chromium(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    assert exe is not None, "chromium is not installed: run `make dev` (apt-get install -y chromium)"
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def console_messages(stderr: str) -> list[str]:
    return CONSOLE.findall(stderr)


def png_pixels(path: Path) -> np.ndarray:
    """RGB(A) pixels of an 8-bit non-interlaced PNG (what chromium's --screenshot writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body, pos = data[pos + 8 : pos + 8 + n], pos + 12 + n
        header, idat = (body, idat) if kind == b"IHDR" else (header, idat + body if kind == b"IDAT" else idat)
    w, h, depth, color = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and color in (2, 6), (depth, color)
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), np.int32)
    prev = np.zeros(w * bpp, np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 2:
            line = (line + prev) % 256
        elif f in (1, 3, 4):
            line = _unfilter_left(f, line, prev, bpp)
        out[y], prev = line, line
    return out.reshape(h, w, bpp)[:, :, :3].astype(np.uint8)


def _unfilter_left(f: int, line: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    cur = line.copy()
    for i in range(len(cur)):
        a = cur[i - bpp] if i >= bpp else 0
        c = prev[i - bpp] if i >= bpp else 0
        b = prev[i]
        if f == 1:
            pred = a
        elif f == 3:
            pred = (a + b) // 2
        else:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        cur[i] = (cur[i] + pred) % 256
    return cur


@pytest.fixture(scope="module")
def report(zoo: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    z: ZooModel = zoo("llama")
    tmp = tmp_path_factory.mktemp("report")
    b = corrupt(z.gguf, tmp / "b.gguf", FAULT, 1.05)
    page = tmp / "report.html"
    code, out, err = run("bisect", str(z.gguf), str(b), "--isolate", "--report", str(page))
    assert code == 1, out + err
    return page


def test_the_detector_sees_console_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><p>x</p><script>console.error('boom'); missing_fn();</script>")
    msgs = console_messages(chromium(bad.as_uri(), "--dump-dom").stderr)
    assert any("boom" in m for m in msgs) and any("missing_fn" in m for m in msgs), msgs


def test_report_is_self_contained(report: Path) -> None:
    text = report.read_text()
    assert "<script" not in text and not re.search(r"(src|href)=\"?(https?:)?//", text)


def test_report_renders_its_charts_in_chromium(report: Path) -> None:
    result = chromium(report.as_uri(), "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_messages(result.stderr) == []
    dom = result.stdout
    for chart in ("heatmap", "stage-chart", "isolate", "kl"):
        assert f'<svg class="{chart}"' in dom, chart
    heatmap = dom[dom.index('<svg class="heatmap"') : dom.index("</svg>", dom.index('<svg class="heatmap"'))]
    layers = sorted({int(x) for x in re.findall(r'data-layer="(\d+)"', heatmap)})
    assert layers == [0, 1] and len(re.findall(r'class="tick"', heatmap)) == 2  # a tick per layer
    assert len(re.findall(r'class="cell"', heatmap)) >= 2 * 15
    assert heatmap.count('class="diverging-row"') == 1 and heatmap.count('class="diverging-cell"') == 1
    assert re.findall(r'class="diverging-row" data-layer="(\d+)"', heatmap) == ["1"]  # the faulty layer
    assert "ffn_up, the diverging stage" in dom
    assert "<title>own layer 1:" in dom  # the fault is layer 1's own error (layer 0 is exact: no bar)
    agreement = re.search(r"top-1 agreement (\d+)/(\d+)", dom)
    assert agreement is not None and len(re.findall(r'class="top1"', dom)) == 2 * int(agreement.group(2))
    assert "white = identical" in dom


def test_report_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    result = chromium(report.as_uri(), f"--screenshot={shot}", "--window-size=1000,1600")
    assert shot.is_file(), result.stderr[-2000:]
    px = png_pixels(shot)
    ink = (px.astype(np.int32).sum(axis=2) < 600).mean()  # neither white nor near-white
    colors = len(np.unique(px.reshape(-1, 3)[::7], axis=0))
    assert ink > 0.03 and colors > 50, (ink, colors)


def test_report_names_tensor_type_differences(zoo: Any, report: Path, tmp_path: Path) -> None:
    """Config and tokenizer equal but the weights requantized: the report says so (it used to say only
    "identical" for config and tokenizer); the same-types report says the tensors are identical."""
    assert "<p>Tensors: identical names, shapes and types.</p>" in report.read_text()
    z: ZooModel = zoo("llama")
    q8, page = tmp_path / "q8.gguf", tmp_path / "q8.html"
    assert run("convert", str(z.gguf), "-o", str(q8), "--quantize", "q8_0")[0] == 0
    code, _, err = run("bisect", str(z.gguf), str(q8), "--report", str(page))
    assert code in (0, 1), err
    html = page.read_text()
    assert "<p>Config and tokenizer: identical.</p><p>Tensors: type differs: " in html
    shown = re.search(r"type differs: (\d+) tensors \(\w+ → Q8_0 ×(\d+)\)", html)
    assert shown is not None and shown[1] == shown[2] and int(shown[1]) > 0
