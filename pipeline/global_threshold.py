"""Global thresholds of one grayscale image: scikit-image's, called on the image's own values.

- integer images (uint8, uint16, int16): one histogram bin per integer value (skimage's behaviour for integer
  dtypes), so ``otsu`` equals ``skimage.filters.threshold_otsu`` exactly; integer dtypes wider than 16 bits are
  thresholded as float64;
- float images: skimage's default 256 bins over the data range;
- ``multiotsu`` (three classes, thresholds low < high) always uses 256 bins (skimage's multi-Otsu builds an
  nbins x nbins table, too big for a per-value uint16 histogram).

Polarity: ``"bright"`` keeps ``gray > threshold``, ``"dark"`` keeps ``gray <= threshold`` (skimage's convention:
pixels equal to the threshold belong to the dark side).
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from skimage import filters

from .methods import METHODS


def check_gray(gray: np.ndarray) -> np.ndarray:
    gray = np.asarray(gray)
    if gray.ndim != 2:
        raise ValueError(f"gray must be a 2-D array, got shape {gray.shape}; convert colour to gray first")
    if gray.dtype == bool:
        return gray.view(np.uint8)
    if not (np.issubdtype(gray.dtype, np.integer) or np.issubdtype(gray.dtype, np.floating)):
        raise ValueError(f"gray must be integer or float, got dtype {gray.dtype}")
    if np.issubdtype(gray.dtype, np.floating) and not np.isfinite(gray).all():
        raise ValueError("gray contains NaN or inf; replace them or exclude them with valid=")
    return gray


def check_valid(valid: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if valid is None:
        return None
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != shape:
        raise ValueError(f"valid has shape {valid.shape} but gray has shape {shape}")
    return valid


def threshold_value(values: np.ndarray, method: str) -> float:
    """skimage's threshold of the given values (any shape, not constant)."""
    if np.issubdtype(values.dtype, np.integer) and values.dtype.itemsize > 2:
        values = values.astype(np.float64)
    if method == "otsu":
        if values.dtype == np.uint8:
            return float(filters.threshold_otsu(hist=histogram_u8(values)))
        return float(filters.threshold_otsu(values))
    if method == "li":
        return float(filters.threshold_li(values))
    if method == "yen":
        return float(filters.threshold_yen(values))
    if method == "triangle":
        return float(filters.threshold_triangle(values))
    raise ValueError(f"unknown method {method!r}. Available options are: {', '.join(METHODS)}")


def histogram_u8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """skimage's uint8 histogram (one bin per value, trimmed to [min, max]) via Pillow's C histogram,
    ~10x faster than ``np.bincount`` on a 512x512 image; ``threshold_otsu(hist=...)`` then gives exactly
    ``threshold_otsu(values)``."""
    v = np.ascontiguousarray(values.reshape(1, -1) if values.ndim != 2 else values)
    counts = np.asarray(Image.fromarray(v, mode="L").histogram(), dtype=np.int64)
    nz = np.flatnonzero(counts)
    lo, hi = int(nz[0]), int(nz[-1])
    return counts[lo : hi + 1], np.arange(lo, hi + 1)


def multiotsu(values: np.ndarray) -> tuple[float, float]:
    """Three-class Otsu over 256 bins: (low, high). Falls back to Otsu twice if it cannot split."""
    v = values.astype(np.float64) if np.issubdtype(values.dtype, np.integer) else values
    try:
        low, high = filters.threshold_multiotsu(v, classes=3, nbins=256)
    except ValueError:  # fewer than three distinct levels
        t = threshold_value(values, "otsu")
        return t, t
    return float(low), float(high)


def apply_threshold(gray: np.ndarray, threshold: float, polarity: str, valid: np.ndarray | None) -> np.ndarray:
    mask = gray > threshold if polarity == "bright" else gray <= threshold
    if valid is not None:
        mask &= valid
    return mask
