"""Intensity windows for volumes (``--window``): CT presets in Hounsfield units, a centre/width pair, or the
volume's own percentiles (MR and other data without a physical scale).

A window maps source values linearly onto uint8 as a viewer's window does: ``low -> 0``, ``high -> 255``,
clipped, rounded half up (the arithmetic of :func:`.intensity.to_uint8`). The NIfTI reader windows every slice
of a volume with the same ``low, high``, so the pseudo-mask's Otsu runs on the windowed slice and the stored
image is that slice; predict repeats it from the window recorded in the store's parameters.

Presets, ``(centre, width)`` in HU (Radiopaedia, "Windowing (CT)"): ``lung`` -600/1500, ``soft-tissue`` 40/400,
``bone`` 400/1800. ``C/W`` gives the numbers (``40/400``, ``-600/1500``). ``percentile``: the volume's 0.5th and
99.5th percentiles, one mapping for every slice of the volume (a slice's own percentiles would stretch the noise
of a slice outside the body to full contrast).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

PRESETS: dict[str, tuple[float, float]] = {"lung": (-600.0, 1500.0), "soft-tissue": (40.0, 400.0), "bone": (400.0, 1800.0)}
PERCENTILE = "percentile"
VOLUME_PERCENTILES = (0.5, 99.5)
MAX_SAMPLES = 1 << 20  # values sampled (evenly strided) for a volume's percentiles
_NUMBERS = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*/\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")
CHOICES = f"{', '.join(PRESETS)}, C/W numbers (e.g. 40/400) or {PERCENTILE}"


@dataclass(frozen=True)
class Window:
    """A parsed ``--window``: ``center``/``width`` in source units, or both None for the volume's percentiles."""

    spec: str
    center: float | None = None
    width: float | None = None

    @property
    def fixed(self) -> bool:
        return self.center is not None

    def bounds(self, sample: np.ndarray | None = None) -> tuple[float, float]:
        """``(low, high)``: the source values that map to 0 and 255. ``sample``: the volume's finite values (needed
        for ``percentile`` only)."""
        if self.fixed:
            return self.center - self.width / 2, self.center + self.width / 2
        if sample is None or sample.size == 0:
            return 0.0, 0.0
        low, high = np.percentile(sample, VOLUME_PERCENTILES)
        return float(low), float(high)


def parse_window(spec: str | None) -> Window | None:
    """The window ``spec`` names (None for None or ''); ValueError naming the choices for anything else."""
    if spec is None or str(spec).strip() == "":
        return None
    text = str(spec).strip()
    if text.lower() in PRESETS:
        return Window(text.lower(), *PRESETS[text.lower()])
    if text.lower() == PERCENTILE:
        return Window(PERCENTILE)
    m = _NUMBERS.fullmatch(text)
    if not m:
        raise ValueError(f"window {spec!r}: choose {CHOICES}")
    center, width = float(m.group(1)), float(m.group(2))
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise ValueError(f"window {spec!r}: the width (after the '/') must be a positive number, e.g. 40/400")
    return Window(f"{center:g}/{width:g}", center, width)  # one spelling per window: the store's parameters compare equal


def volume_sample(values: np.ndarray, max_samples: int = MAX_SAMPLES) -> np.ndarray:
    """At most ``max_samples`` finite values of ``values``, evenly strided over its memory order (deterministic)."""
    flat = values.ravel(order="K")
    step = max(1, flat.size // max_samples)
    sample = np.asarray(flat[::step])
    return sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample


def apply_window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` mapped linearly from ``[low, high]`` to uint8 ``[0, 255]``, clipped and rounded; zeros when
    ``high <= low`` (a constant volume)."""
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    np.clip(scaled, 0, 255, out=scaled)
    return (scaled + 0.5).astype(np.uint8)


__all__ = ["CHOICES", "PERCENTILE", "PRESETS", "Window", "apply_window", "parse_window", "volume_sample"]
