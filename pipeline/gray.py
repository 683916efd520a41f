"""Colour -> grayscale conversion (pure numpy).

Gray input keeps its native dtype and is returned as is (no copy, no float). Colour is reduced to
ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` computed in float32, so colour input always gives
float32 output in the input's value range (0..255 for uint8, 0..65535 for uint16).

Alpha is *composited over black*: ``value * alpha / alpha_max`` (alpha_max is the dtype's maximum
for integers, 1.0 for floats). Fully transparent pixels become 0, which is what a viewer shows on a
black background and keeps transparent padding out of the foreground. When the alpha channel is fully
opaque it is simply dropped (no multiply), so LA with opaque alpha stays in its native dtype.
"""
from __future__ import annotations

import numpy as np

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601

# mode name (case-insensitive) -> channel layout
_LAYOUTS = {
    "gray": "gray", "l": "gray", "1": "gray", "i": "gray", "f": "gray", "i;16": "gray",
    "i;16b": "gray", "i;16l": "gray", "i;16s": "gray", "monochrome1": "gray", "monochrome2": "gray",
    "la": "la", "rgb": "rgb", "rgba": "rgba", "rgbx": "rgb", "auto": "auto",
}
_BY_CHANNELS = {2: "la", 3: "rgb", 4: "rgba"}


def layout_of(mode: str, arr: np.ndarray) -> str:
    """Channel layout ('gray', 'la', 'rgb', 'rgba') for a mode name; 'auto' infers it from the shape."""
    layout = _LAYOUTS.get(mode.lower())
    if layout is None:
        raise ValueError(f"unknown colour mode {mode!r}; available: {sorted(_LAYOUTS)}")
    if layout == "auto":
        if arr.ndim == 2:
            return "gray"
        if arr.ndim == 3 and arr.shape[-1] in _BY_CHANNELS:
            return _BY_CHANNELS[arr.shape[-1]]
        raise ValueError(f"cannot infer a colour layout for an array of shape {arr.shape}")
    return layout


def _alpha_scale(alpha: np.ndarray) -> np.ndarray | None:
    """alpha / alpha_max as float32, or None when fully opaque (alpha can then be dropped)."""
    top = np.iinfo(alpha.dtype).max if alpha.dtype.kind in "ui" else 1.0
    if alpha.min() >= top:
        return None
    return np.multiply(alpha, np.float32(1.0 / top), dtype=np.float32)


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an (H, W, >=3) array as float32 (channels beyond the third are ignored)."""
    out = np.multiply(rgb[..., 0], np.float32(LUMA[0]), dtype=np.float32)
    out += np.multiply(rgb[..., 1], np.float32(LUMA[1]), dtype=np.float32)
    out += np.multiply(rgb[..., 2], np.float32(LUMA[2]), dtype=np.float32)
    return out


def to_gray(arr: np.ndarray, *, mode: str) -> np.ndarray:
    """Return a 2-D grayscale array.

    ``mode`` names the channel layout of ``arr``: 'gray' (or a Pillow gray mode such as 'L', 'I;16'),
    'la' (H, W, 2), 'rgb' (H, W, 3), 'rgba' (H, W, 4), or 'auto' (inferred from the shape).
    Palette images must be expanded to RGB (or L) before calling this.
    """
    layout = layout_of(mode, arr)
    want = {"gray": 2, "la": 3, "rgb": 3, "rgba": 3}[layout]
    if arr.ndim != want or (layout != "gray" and arr.shape[-1] != {"la": 2, "rgb": 3, "rgba": 4}[layout]):
        raise ValueError(f"array of shape {arr.shape} does not match colour mode {mode!r}")
    if layout == "gray":
        return arr
    if layout == "la":
        scale = _alpha_scale(arr[..., 1])
        gray = arr[..., 0]
        if scale is None:
            return np.ascontiguousarray(gray)
        return np.multiply(gray, scale, dtype=np.float32)
    out = luma(arr)
    if layout == "rgba":
        scale = _alpha_scale(arr[..., 3])
        if scale is not None:
            out *= scale
    return out
