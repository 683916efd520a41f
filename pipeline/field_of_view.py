"""The field of view of an image (what can hold the foreground) and the region-aware clean-up of a dark foreground.

Both run on a <= 256 px strided copy and scale the result back (nearest): the field of view is the image minus
its dark *outside* (:func:`medsass.pipeline.polarity.dark_outside`: vignette corners of a dermoscope, black frames
and padding, air around a body, the black surround of a fundus photograph); the clean-up drops thin structures
and strips hugging the field of view's edge and optionally replaces each object by its convex hull.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .global_threshold import check_gray, check_valid, threshold_value
from .mask_geometry import convex_hull, dilate, fill_holes, largest, strided, upsample
from .polarity import dark_outside, split_sides

FOV_MAX_SIDE = 256
# Constants of the region-aware clean-up (fractions of the short side of a <= 256 px copy).
CLEAN_MAX_SIDE = 256
THIN = 0.02  # opening half-width: removes hair, thin bridges and strips narrower than ~4% of the image
EDGE_BAND = 0.05  # band along the field-of-view edge ...
EDGE_HUG = 0.5  # ... a component with more than half of its pixels in it is a peripheral strip: dropped


def field_of_view(gray: np.ndarray, *, valid: np.ndarray | None = None, max_side: int = FOV_MAX_SIDE) -> np.ndarray:
    """Bool mask of the region that can hold the foreground: the image minus its dark *outside*.

    The outside is found as in :func:`medsass.pipeline.polarity.choose_polarity` (dark pixels below the dark
    side's own Otsu level, connected to the edge, outside the convex hull of the bright side). The field of view
    is the largest remaining connected region with its holes filled, computed on a <= ``max_side`` copy and
    scaled back (nearest). All True when there is no such outside.
    """
    gray = check_gray(gray)
    valid = check_valid(valid, gray.shape)
    values = gray if valid is None else gray[valid]
    full = np.ones(gray.shape, bool) if valid is None else valid.copy()
    if values.size == 0 or values.min() == values.max():
        return full
    s = split_sides(gray, threshold_value(values, "otsu"), valid, max_side)
    if not s.dark.any() or not s.bright.any():
        return full
    inside = ~dark_outside(s.g, s.bright, s.dark, s.edge, rim=0.0)
    if s.valid is not None:
        inside &= s.valid
    inside = fill_holes(largest(inside))
    return upsample(inside, s.step, gray.shape) & full


def clean(mask: np.ndarray, region: np.ndarray, hull: bool) -> np.ndarray:
    """Drop thin structures and strips hugging the field-of-view edge; optionally hull each object.

    Runs on a <= CLEAN_MAX_SIDE copy: opening (square, half-width THIN) separates objects from thin bridges and
    removes hair-like structures; components with more than EDGE_HUG of their pixels within EDGE_BAND of the edge
    of the field of view (image border or outside) are dropped; the survivors are grown back inside the original
    mask (or replaced by their convex hulls) and scaled back.
    """
    step = strided(mask.shape, CLEAN_MAX_SIDE)
    m = mask[::step, ::step]
    f = region[::step, ::step]
    n = min(m.shape)
    r = max(1, round(THIN * n))
    core = dilate(ndi.minimum_filter(m.view(np.uint8), 2 * r + 1).view(bool), r) & m
    labels, count = ndi.label(core)
    if count == 0:
        return np.zeros(mask.shape, bool)
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
        return upsample(kept, step, mask.shape) & mask
    labels, count = ndi.label(kept)
    hulls = np.zeros(m.shape, bool)
    for i, box in enumerate(ndi.find_objects(labels), start=1):
        hulls[box] |= convex_hull(labels[box] == i)
    return upsample(hulls, step, mask.shape) & region
