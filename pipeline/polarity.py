"""The ``polarity="auto"`` rule: which side of a global threshold is the foreground (docs/pseudo_masks.md).

In words: the background is the side that touches the edge of the field of view more. The edge is the image
border (or the border of ``valid``), but a dark *outside* region touching it -- vignette corners, black frames,
air around a body -- is set aside first (:func:`dark_outside`). The rule and the field of view
(:mod:`.field_of_view`) both look at a strided copy of the image split at the threshold (:func:`split_sides`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import filters

from .mask_geometry import convex_hull, dilate, strided, touching

POLARITY_MAX_SIDE = 128  # the auto-polarity rule runs on a strided copy no larger than this

# Constants of the rule (fractions, so they do not depend on image size or dataset).
RIM = 0.02  # the dark "outside" region is grown by this fraction of the short side (its soft rim)
NEGLIGIBLE_DARK = 0.05  # dark side covering < 5% of the field of view: no dark object inside it
MIN_EDGE = 0.10  # if < 10% of the edge is left once the outside is set aside, keep the whole edge
TIE_MARGIN = 0.20  # edge votes closer than 20% of the touching edge are a tie: the minority side wins


@dataclass(frozen=True)
class Sides:
    """A strided copy ``g`` of the image split at a threshold, within ``valid`` (strided) when given."""

    g: np.ndarray
    bright: np.ndarray
    dark: np.ndarray
    edge: np.ndarray  # the border of the image, or of valid
    valid: np.ndarray | None
    step: int


def split_sides(gray: np.ndarray, threshold: float, valid: np.ndarray | None, max_side: int) -> Sides:
    step = strided(gray.shape, max_side)
    g = gray[::step, ::step]
    bright = g > threshold
    if valid is None:
        dark = ~bright
        edge = np.zeros(g.shape, bool)
        edge[0] = edge[-1] = edge[:, 0] = edge[:, -1] = True
        return Sides(g, bright, dark, edge, None, step)
    v = np.asarray(valid, bool)[::step, ::step]
    bright &= v
    dark = v & ~bright
    edge = v & ~ndi.binary_erosion(v, border_value=0)
    return Sides(g, bright, dark, edge, v, step)


def choose_polarity(
    gray: np.ndarray,
    threshold: float,
    *,
    valid: np.ndarray | None = None,
    max_side: int = POLARITY_MAX_SIDE,
) -> str:
    """``"bright"`` or ``"dark"``: the side of ``threshold`` that is the foreground.

    The outside is the part of the dark side that is darker than the dark side's own Otsu level, connected to
    the edge, and outside the convex hull of the bright side (plus a thin rim). Two guards: if the dark side
    inside the field of view is negligible (< 5%), the threshold only separated the field of view from its
    surroundings and the field of view (bright) is the foreground; if the outside covers nearly the whole edge
    (> 90%), it *is* the background and the whole edge counts. When the two sides touch the remaining edge
    about equally (within 20%; objects cut by a tile border), the side with fewer pixels inside the field of
    view is the foreground.
    """
    s = split_sides(np.asarray(gray), threshold, valid, max_side)
    bright, dark, edge = s.bright, s.dark, s.edge
    n_dark = int(np.count_nonzero(dark))
    n_field = n_dark + int(np.count_nonzero(bright))
    if n_dark == 0 or n_dark == n_field:
        return "bright"

    outside = dark_outside(s.g, bright, dark, edge)
    n_out = int(np.count_nonzero(outside))
    if n_dark - n_out < NEGLIGIBLE_DARK * (n_field - n_out):
        return "bright"
    touch = edge & ~outside
    if np.count_nonzero(touch) < MIN_EDGE * np.count_nonzero(edge):
        touch = edge
    dark_touch = np.count_nonzero(dark & touch)
    bright_touch = np.count_nonzero(bright & touch)
    if abs(dark_touch - bright_touch) < TIE_MARGIN * (dark_touch + bright_touch):
        # Near tie on the edge (e.g. microscopy tiles whose objects are cut by the tile border):
        # the smaller side inside the field of view is the foreground.
        return "dark" if n_dark - n_out < np.count_nonzero(bright) else "bright"
    return "dark" if dark_touch < bright_touch else "bright"


def dark_outside(g: np.ndarray, bright: np.ndarray, dark: np.ndarray, edge: np.ndarray, rim: float = RIM) -> np.ndarray:
    """Dark pixels that look like the surroundings of the field of view (vignette, frame, air)."""
    dark_values = g[dark]
    lo, hi = dark_values.min(), dark_values.max()
    if lo == hi:
        return np.zeros(g.shape, bool)
    very_dark = dark & (g <= filters.threshold_otsu(dark_values))
    outside = touching(very_dark, edge)
    if not outside.any():
        return outside
    opened = dilate(~dilate(~bright, 1), 1)  # 3x3 opening: drop isolated bright specks before the hull
    outside &= ~convex_hull(opened if opened.any() else bright)
    if outside.any() and rim > 0:
        outside = dilate(outside, max(1, round(rim * min(g.shape)))) & dark
    return outside
