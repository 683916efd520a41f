"""The field of view of an image (what can hold the foreground) and the region-aware clean-up of a dark foreground.

Both run on a <= 256 px strided copy and scale the result back (nearest): the field of view is the image minus
its dark *outside* (:func:`medsass.pipeline.polarity.dark_outside`: vignette corners of a dermoscope, black frames
and padding, air around a body, the black surround of a fundus photograph); the clean-up drops thin structures
and strips hugging the field of view's edge and optionally replaces each object by its convex hull.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .global_threshold import Values, check_gray, check_valid
from .levels import Levels
from .mask_geometry import convex_hull, dilate, fill_holes, largest, strided, upsample
from .polarity import dark_outside, split_sides

FOV_MAX_SIDE = 256
# Constants of the region-aware clean-up (fractions of the short side of a <= 256 px copy).
CLEAN_MAX_SIDE = 256
THIN = 0.02  # opening half-width: removes hair, thin bridges and strips narrower than ~4% of the image
EDGE_BAND = 0.05  # band along the field-of-view edge ...
EDGE_HUG = 0.5  # ... a component with more than half of its pixels in it is a peripheral strip: dropped


def field_of_view(gray: np.ndarray, *, valid: np.ndarray | None = None, max_side: int = FOV_MAX_SIDE,
                  levels: Levels | None = None) -> np.ndarray:
    """Bool mask of the region that can hold the foreground: the image minus its dark *outside*.

    The outside is found as in :func:`medsass.pipeline.polarity.choose_polarity` (dark pixels below the dark
    side's own Otsu level, connected to the edge, outside the convex hull of the bright side). The field of view
    is the largest remaining connected region with its holes filled, computed on a <= ``max_side`` copy and
    scaled back (nearest). All True when there is no such outside. ``levels``: the image as codes into a table
    (:class:`~medsass.pipeline.levels.Levels`), to histogram the codes instead of the pixels.
    """
    gray = check_gray(gray, levels)
    valid = check_valid(valid, gray.shape)
    full = np.ones(gray.shape, bool) if valid is None else valid.copy()
    small = field_of_view_small(gray, Values(gray, valid, levels), valid, max_side)
    if small is None:
        return full
    inside, step = small
    return upsample(inside, step, gray.shape) & full


def field_of_view_small(gray: np.ndarray, values: Values, valid: np.ndarray | None,
                        max_side: int = FOV_MAX_SIDE) -> tuple[np.ndarray, int] | None:
    """:func:`field_of_view` on the strided copy ``gray[::step, ::step]``: (mask, step), or None when the field of
    view is the whole image (within ``valid``). ``values``: the pixels of ``gray`` within ``valid``."""
    if values.is_constant():
        return None
    s = split_sides(gray, values.threshold("otsu"), valid, max_side)
    if not s.dark.any() or not s.bright.any():
        return None
    inside = ~dark_outside(s.g, s.bright, s.dark, s.edge, rim=0.0)
    if s.valid is not None:
        inside &= s.valid
    return fill_holes(largest(inside)), s.step


def clean(mask: np.ndarray, region: np.ndarray, hull: bool) -> np.ndarray:
    """Drop thin structures and strips hugging the field-of-view edge; optionally hull each object.

    Runs on a <= CLEAN_MAX_SIDE copy (:func:`clean_small`) and scales back: the survivors are grown back inside
    the original mask, or replaced by their convex hulls within ``region``.
    """
    step = strided(mask.shape, CLEAN_MAX_SIDE)
    small = clean_small(mask[::step, ::step], region[::step, ::step], hull)
    return upsample(small, step, mask.shape) & (region if hull else mask)


def clean_small(m: np.ndarray, f: np.ndarray, hull: bool) -> np.ndarray:
    """:func:`clean` of the strided mask ``m`` in the strided field of view ``f``, before scaling back.

    Opening (square, half-width THIN) separates objects from thin bridges and removes hair-like structures;
    components with more than EDGE_HUG of their pixels within EDGE_BAND of the edge of the field of view (image
    border or outside) are dropped; the survivors are grown back (``kept``), or replaced by their convex hulls.
    """
    n = min(m.shape)
    r = max(1, round(THIN * n))
    core = dilate(ndi.minimum_filter(m.view(np.uint8), 2 * r + 1).view(bool), r) & m
    labels, count = ndi.label(core)
    if count == 0:
        return np.zeros(m.shape, bool)
    outer = ~f
    outer[0] = outer[-1] = True
    outer[:, 0] = outer[:, -1] = True
    band = dilate(outer, max(1, round(EDGE_BAND * n)))
    total = np.bincount(labels.ravel(), minlength=count + 1)
    in_band = np.bincount(labels.ravel(), weights=band.ravel(), minlength=count + 1)
    keep = in_band <= EDGE_HUG * total
    keep[0] = False
    kept = dilate(keep[labels], r + 1) & m  # grow back what the opening trimmed
    if not hull:
        return kept
    labels, count = ndi.label(kept)
    hulls = np.zeros(m.shape, bool)
    for i, box in enumerate(ndi.find_objects(labels), start=1):
        hulls[box] |= convex_hull(labels[box] == i)
    return hulls
