"""Inline SVG for the HTML report (report/html.py): elements, the page-wide chart frame, a log-scale
per-layer line / bar chart and the sequential colour scale. Drawing only: values arrive computed."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any, Final

W: Final = 1000  # SVG user units; every chart is drawn 100% of the page width
PAD_L, PAD_R, PAD_T, PAD_B = 150, 20, 30, 70
MARK: Final = "#d62728"  # the diverging layer's marker
# a sequential scale (viridis stops) from the smallest to the largest error shown
PALETTE: Final = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")


def esc(x: object) -> str:
    return html.escape(str(x))


def color(t: float) -> str:
    """The palette at t ∈ [0, 1], linearly interpolated."""
    t = min(max(t, 0.0), 1.0) * (len(PALETTE) - 1)
    i = min(int(t), len(PALETTE) - 2)
    a, b = (tuple(int(c[k : k + 2], 16) for k in (1, 3, 5)) for c in PALETTE[i : i + 2])
    f = t - i
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b, strict=True))


def el(tag: str, text: str | None = None, **attrs: Any) -> str:
    """One SVG element: `class_` → class, `text_anchor` → text-anchor; floats to 0.1 units; `text` escaped
    (a `<title>` child is passed pre-built through `inner`)."""
    inner = attrs.pop("inner", "")
    parts = []
    for k, v in attrs.items():
        name = k.rstrip("_").replace("_", "-")
        parts.append(f'{name}="{v:.1f}"' if isinstance(v, float) else f'{name}="{esc(v)}"')
    body = (esc(text) if text is not None else "") + str(inner)
    return f"<{tag} {' '.join(parts)}>{body}</{tag}>" if body else f"<{tag} {' '.join(parts)}/>"


def svg(cls: str, height: float, body: list[str], title: str) -> str:
    head = (
        f'<svg class="{cls}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {height:.0f}" role="img">'
        f'<text x="{W / 2}" y="18" text-anchor="middle" font-weight="bold">{esc(title)}</text>'
    )
    return head + "\n".join(body) + "</svg>"


Series = dict[str, tuple[str, list[tuple[int, float]]]]  # name → (colour, [(layer, value)])


def log_chart(cls: str, title: str, series: Series, mark: int | None, bars: bool = False) -> str:
    """Per-layer values on a log10 axis, a tick per layer; zeros are left out (identical, not noise)."""
    pts = [y for _, s in series.values() for _, y in s if y > 0 and math.isfinite(y)]
    if not pts:
        return f"<p>{esc(title)}: every value is 0 (identical).</p>"
    xs = sorted({x for _, s in series.values() for x, _ in s})
    lo, hi = math.floor(math.log10(min(pts))), math.ceil(math.log10(max(pts)))
    hi = hi if hi > lo else lo + 1
    h, top, bottom = 300, PAD_T + 10.0, 250.0
    step = (W - PAD_L - PAD_R) / max(len(xs), 1)

    def sx(x: int) -> float:
        return PAD_L + (xs.index(x) + 0.5) * step

    def sy(v: float) -> float:
        return bottom - (math.log10(v) - lo) / (hi - lo) * (bottom - top)

    body = log_axis(lo, hi, lambda d: sy(10.0**d), bottom)
    for x in xs:
        body.append(el("line", class_="tick", x1=sx(x), y1=bottom, x2=sx(x), y2=bottom + 4, stroke="#888"))
        body.append(el("text", str(x), x=sx(x), y=bottom + 16, text_anchor="middle", font_size=10))
    body.append(el("text", "layer", x=(PAD_L + W) / 2, y=h - 12.0, text_anchor="middle", font_size=11))
    if mark is not None and mark in xs:
        body.append(
            el(
                "line",
                class_="mark",
                x1=sx(mark),
                y1=top,
                x2=sx(mark),
                y2=bottom,
                stroke=MARK,
                stroke_dasharray="4 3",
            )
        )
    for k, (name, (color, s)) in enumerate(series.items()):
        good = [(x, y) for x, y in s if y > 0 and math.isfinite(y)]
        if bars:
            bw = step * 0.8 / len(series)
            body += [
                el(
                    "rect",
                    class_="bar",
                    x=sx(x) - step * 0.4 + k * bw,
                    y=sy(y),
                    width=bw,
                    height=bottom - sy(y),
                    fill=color,
                    inner=f"<title>{esc(f'{name} layer {x}: {y:.3e}')}</title>",
                )
                for x, y in good
            ]
        else:
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
            body.append(
                el("polyline", class_="series", fill="none", stroke=color, stroke_width=2, points=line)
            )
            body += [el("circle", cx=sx(x), cy=sy(y), r=3, fill=color) for x, y in good]
        body.append(el("text", name, x=PAD_L + 10.0 + 260 * k, y=top - 2, fill=color, font_size=11))
    return svg(cls, h, body, title)


def log_axis(lo: int, hi: int, y_of: Callable[[int], float], bottom: float) -> list[str]:
    body = [el("line", x1=float(PAD_L), y1=bottom, x2=float(W - PAD_R), y2=bottom, stroke="#888")]
    for d in range(lo, hi + 1):
        y = y_of(d)
        body.append(el("line", x1=float(PAD_L), y1=y, x2=float(W - PAD_R), y2=y, stroke="#eee"))
        body.append(el("text", f"1e{d}", x=PAD_L - 6.0, y=y + 4, text_anchor="end", font_size=10))
    return body
