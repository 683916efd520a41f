"""Map full-precision grayscale to the stored uint8 image.

* uint8 sources are stored unchanged (low=0, high=255); 8-bit colour sources store their luma, rounded;
* everything else (12/16-bit, signed CT after rescale, float) is mapped linearly from
  [low, high] to [0, 255] and clipped, where low/high are the 0.5th/99.5th percentiles
  (``percentile``, robust to hot pixels and padding) or the min/max (``minmax``);
* a constant image maps to zeros.

``low``/``high`` are recorded per record in the manifest, so the mapping can be inverted.
The pseudo-mask is never computed on this uint8 image: prep thresholds the full-precision pixels.
An image given with its :class:`~medsass.pipeline.levels.Levels` (codes into a table of values) is mapped by
mapping the table and looking the codes up: the same bytes, without float temporaries the size of the image.
"""
from __future__ import annotations

import numpy as np

from .levels import Levels, take

PERCENTILES = (0.5, 99.5)
_MAX_SAMPLES = 1 << 18


def intensity_window(gray: np.ndarray, mode: str = "percentile", source_dtype: str | None = None) -> tuple[float, float]:
    if gray.dtype == np.uint8 or source_dtype == "uint8":  # 8-bit sources (also colour -> float luma) keep their scale
        return 0.0, 255.0
    if gray.dtype == bool:
        return 0.0, 1.0
    flat = gray.reshape(-1)
    if mode == "minmax":
        return float(flat.min()), float(flat.max())
    if mode != "percentile":
        raise ValueError(f"unknown intensity mode {mode!r}; use percentile or minmax")
    step = max(1, flat.size // _MAX_SAMPLES)
    sample = flat[::step]
    low, high = np.percentile(sample, PERCENTILES)
    if high <= low:  # very peaked histograms: fall back to the full range
        low, high = float(flat.min()), float(flat.max())
    return float(low), float(high)


def to_uint8(gray: np.ndarray, mode: str = "percentile", source_dtype: str | None = None,
             levels: Levels | None = None) -> tuple[np.ndarray, float, float]:
    """Return (uint8 image, low, high). ``source_dtype`` 'uint8' keeps the 0..255 scale of 8-bit colour sources.
    ``levels``: the same image as codes into a table (``gray == levels.values[levels.codes]``)."""
    low, high = intensity_window(gray, mode, source_dtype)
    if gray.dtype == np.uint8:
        return gray, low, high
    if gray.dtype == bool:
        return gray.astype(np.uint8) * np.uint8(255), low, high
    if high <= low:
        return np.zeros(gray.shape, np.uint8), low, high
    if levels is None and gray.dtype in (np.uint16, np.int16):
        levels = Levels.of_integers(gray)
    if levels is not None:
        return take(linear_uint8(levels.values, low, high), levels.codes), low, high
    return linear_uint8(gray, low, high), low, high


def linear_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """[low, high] -> [0, 255], clipped and rounded, value by value in float32."""
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    np.clip(scaled, 0, 255, out=scaled)
    return (scaled + 0.5).astype(np.uint8)
