"""Number formatting shared by the renderers: Rust's `{:e}` style (aprender's text) and JSON-safe floats."""

from __future__ import annotations

import math


def rust_exp(x: float, precision: int = 6, sign: bool = False) -> str:
    """Rust `{:.6e}` / `{:+.6e}`: `5.000000e-1`, `-1.250000e2`, `0.000000e0`, `NaN`, `inf`."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return ("+" if sign and x > 0 else "") + ("inf" if x > 0 else "-inf")
    mantissa, _, exp = f"{x:.{precision}e}".partition("e")
    if sign and not mantissa.startswith("-"):
        mantissa = "+" + mantissa
    return f"{mantissa}e{int(exp)}"


def rust_fixed(x: float, precision: int) -> str:
    """Rust `{:.10}` on f64."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{precision}f}"


def json_float(x: float) -> float | None:
    """serde_json writes non-finite floats as null; so do we."""
    return x if math.isfinite(x) else None


def short(x: float) -> str:
    """Compact human form for tables: 1.234e-05, 0.9999871, inf."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3e}"
