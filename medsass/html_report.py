"""Small helpers for self-contained HTML reports (``medsass-prep report``, ``medsass-train report``).

A report is one HTML file that opens offline: images are embedded as base64 PNG ``data:`` URIs,
the style sheet is inline, and there is no script and no external URL. Plots use matplotlib's Agg
canvas directly (no pyplot, no display needed).
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion

from medsass.manifest import atomic_write_bytes

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto; max-width: 1200px;
       padding: 0 1em; color: #222; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; max-width: 260px; } figure img { display: block; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { font-size: 0.75em; color: #444; word-break: break-all; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.muted { color: #666; font-size: 0.9em; } .legend span { display: inline-block; margin-right: 1.2em; }
"""


def esc(value: Any) -> str:
    """HTML-escaped text of ``value`` (quotes included)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A short display string: floats rounded, None/NaN as an em dash."""
    if value is None:
        return "\u2014"
    if isinstance(value, (float, np.floating)):
        return "\u2014" if not np.isfinite(value) else f"{float(value):.{digits}g}" if abs(value) >= 1e4 else f"{float(value):.{digits}f}"
    return str(value)


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG encoding of a uint8 (H, W) or (H, W, 3) array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb.astype(np.uint8))).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, *, width: int | None = None) -> str:
    """An ``<img>`` with the PNG embedded."""
    size = f' width="{int(width)}"' if width else ""
    return f'<img src="{data_uri(png)}" alt="{esc(alt)}"{size}>'


def figure(png: bytes, caption: str, *, width: int | None = None) -> str:
    return f"<figure>{img(png, caption, width=width)}<figcaption>{esc(caption)}</figcaption></figure>"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, digits: int = 4) -> str:
    """An HTML table; numbers are right-aligned and rounded, every cell escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for v in row:
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            cells.append(f'<td class="num">{esc(fmt(v, digits))}</td>' if num else f"<td>{esc(fmt(v, digits))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def kv_table(items: Mapping[str, Any]) -> str:
    """A two-column key/value table; dict values are shown as ``k=v, ...``."""
    def show(v: Any) -> Any:
        return ", ".join(f"{k}={x}" for k, x in v.items()) or "none" if isinstance(v, Mapping) else v

    return table(["", "value"], [(k, show(v)) for k, v in items.items()])


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def page(title: str, body: Sequence[str], *, subtitle: str = "") -> str:
    """The whole document: inline CSS, no script, no external resource."""
    sub = f'<p class="muted">{esc(subtitle)}</p>' if subtitle else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{STYLE}</style></head>\n<body><h1>{esc(title)}</h1>{sub}\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write(path: str | Path, document: str) -> Path:
    """Write the page atomically; returns its path."""
    atomic_write_bytes(path, document.encode("utf-8"))
    return Path(path)


# -- plots (matplotlib Agg, no pyplot) --------------------------------------------------------


def new_figure(width: float = 6.0, height: float = 3.2):
    """A matplotlib Figure on an Agg canvas (works without a display)."""
    # matplotlib (~0.7 s to import) loads when a figure is drawn: suggest's gallery uses this module without one
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def histogram_png(values: Sequence[float] | np.ndarray, *, title: str, xlabel: str, bins: int = 40,
                  value_range: tuple[float, float] | None = (0.0, 1.0)) -> bytes:
    """A histogram of the finite ``values`` as PNG bytes."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    fig = new_figure()
    ax = fig.add_subplot()
    ax.hist(v, bins=bins, range=value_range, color="#4477aa", edgecolor="white")
    ax.set(title=f"{title} (n={v.size})", xlabel=xlabel, ylabel="records")
    return figure_png(fig)


def outline(mask: np.ndarray) -> np.ndarray:
    """The one-pixel inner boundary of a boolean mask."""
    mask = mask.astype(bool)
    return mask & ~binary_erosion(mask, iterations=1, border_value=0)


def contour_overlay(image: np.ndarray, masks: Sequence[tuple[np.ndarray, tuple[int, int, int]]], *, size: int = 160) -> bytes:
    """PNG of a uint8 gray ``image`` resized to about ``size`` px with each mask's outline in its colour.

    Masks are resized with nearest neighbour to the same grid before their outlines are drawn, so
    the lines stay one pixel wide at display size."""
    h, w = image.shape
    scale = size / max(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    gray = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((tw, th), Image.BILINEAR))
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for mask, colour in masks:
        m = np.asarray(Image.fromarray(mask.astype(bool).view(np.uint8) * 255).resize((tw, th), Image.NEAREST)) > 0
        rgb[outline(m)] = colour
    return png_bytes(rgb)
