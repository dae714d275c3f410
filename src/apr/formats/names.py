"""Canonical weight names (GGUF spelling) that the engine and converters use for every family.

Which file name holds which canonical tensor (HF spelling, fused tensors) is each family's tensor table
(apr.models); this module only names the few tensors every decoder has.
"""

from __future__ import annotations

import re
from typing import Final

TOKEN_EMBD: Final = "token_embd.weight"
OUTPUT_NORM: Final = "output_norm.weight"
OUTPUT: Final = "output.weight"
_CANON_LAYER_RE: Final = re.compile(r"^blk\.(\d+)\.(.+)$")


def blk(layer: int, suffix: str) -> str:
    """`blk(3, "attn_q.weight")` → `"blk.3.attn_q.weight"`."""
    return f"blk.{layer}.{suffix}"


def layer_of(name: str) -> int | None:
    m = _CANON_LAYER_RE.match(name)
    return int(m.group(1)) if m else None
