"""Where a source frame goes in the stored size x size canvas, and back.

Three modes: ``stretch`` (resize to size x size), ``pad`` (keep the aspect ratio, centre, zero-pad)
and ``tile`` (cut native-resolution size x size tiles; edge tiles are shifted inwards so they are
full, and images smaller than a tile are zero-padded at the bottom/right). Every record keeps its
``Placement`` so a prediction can be mapped back to the source pixels (:func:`to_source`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Placement:
    """Source region (crop_*) and where it lands in the canvas (content_*)."""

    crop_y: int
    crop_x: int
    crop_height: int
    crop_width: int
    content_y: int
    content_x: int
    content_height: int
    content_width: int
    mode: str


def placements(shape: tuple[int, int], size: int, mode: str, overlap: int = 0) -> list[Placement]:
    """One placement per record cut from a frame of ``shape`` (one unless tiling)."""
    h, w = shape
    if mode == "stretch":
        return [Placement(0, 0, h, w, 0, 0, size, size, mode)]
    if mode == "pad":
        scale = size / max(h, w)
        ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
        return [Placement(0, 0, h, w, (size - ch) // 2, (size - cw) // 2, ch, cw, mode)]
    if mode == "tile":
        out = []
        for y in _starts(h, size, overlap):
            for x in _starts(w, size, overlap):
                th, tw = min(size, h - y), min(size, w - x)
                out.append(Placement(y, x, th, tw, 0, 0, th, tw, mode))
        return out
    raise ValueError(f"unknown resize mode {mode!r}; use stretch, pad or tile")


def _starts(length: int, size: int, overlap: int) -> list[int]:
    if length <= size:
        return [0]
    step = size - overlap
    starts = list(range(0, length - size + 1, step))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def n_records(shape: tuple[int, int], size: int, mode: str, overlap: int = 0) -> int:
    return len(placements(shape, size, mode, overlap))


def place_image(img: np.ndarray, p: Placement, size: int) -> np.ndarray:
    """uint8 (H, W) source -> uint8 (size, size) canvas (bilinear with antialiasing when shrinking)."""
    crop = img[p.crop_y : p.crop_y + p.crop_height, p.crop_x : p.crop_x + p.crop_width]
    if p.mode == "stretch" and crop.shape == (size, size):
        return np.ascontiguousarray(crop)
    out = np.zeros((size, size), np.uint8)
    out[_content(p)] = _resize_u8(crop, p.content_height, p.content_width)
    return out


def place_mask(mask: np.ndarray, p: Placement, size: int) -> np.ndarray:
    """bool/0-1 (H, W) source mask -> uint8 {0,1} (size, size): resized as 0/255, then >= 128, so it stays binary."""
    crop = mask[p.crop_y : p.crop_y + p.crop_height, p.crop_x : p.crop_x + p.crop_width]
    crop = crop.astype(bool).view(np.uint8) * np.uint8(255) if crop.dtype == bool else (crop > 0).astype(np.uint8) * 255
    out = np.zeros((size, size), np.uint8)
    out[_content(p)] = _resize_u8(crop, p.content_height, p.content_width) >= 128
    return out


def to_source(canvas: np.ndarray, p: Placement, *, order: int = 1) -> np.ndarray:
    """Map a float or uint8 (size, size) canvas back to the source region (crop_height, crop_width).

    ``order=1`` interpolates bilinearly (probabilities); ``order=0`` takes the nearest pixel (masks)."""
    content = np.asarray(canvas)[_content(p)]
    if content.shape == (p.crop_height, p.crop_width):
        return content.copy()
    resample = Image.BILINEAR if order == 1 else Image.NEAREST
    if content.dtype == np.uint8:
        return np.asarray(Image.fromarray(content).resize((p.crop_width, p.crop_height), resample))
    im = Image.fromarray(content.astype(np.float32), mode="F")
    return np.asarray(im.resize((p.crop_width, p.crop_height), resample))


def _content(p: Placement) -> tuple[slice, slice]:
    return (slice(p.content_y, p.content_y + p.content_height), slice(p.content_x, p.content_x + p.content_width))


def _resize_u8(img: np.ndarray, h: int, w: int) -> np.ndarray:
    if img.shape == (h, w):
        return img
    # reducing_gap=1: shrink by whole factors with a box filter first (fast, area-averaging), then bilinear
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.BILINEAR, reducing_gap=1.0))
