"""Global thresholding of one grayscale image into a binary pseudo-mask (MedSASS's free labels).

Pure numpy / scikit-image: no Dask, no Zarr, no file I/O. The threshold and the mask are computed at
native resolution and full precision; the ``polarity="auto"`` decision looks at a <=128 px strided copy,
and the region-aware methods find the field of view and clean up on a <=256 px copy.

Methods: the paper's plain global thresholds (``otsu`` is exactly the paper's Otsu) and region-aware
variants (``fov_*``) that first find the field of view (dark vignette corners, black frames or air around
the body set aside), threshold inside it and optionally clean up; see :func:`field_of_view`.

Thresholds are scikit-image's, called on the image's own values:
- integer images (uint8, uint16, int16): one histogram bin per integer value (skimage's behaviour for
  integer dtypes), so ``otsu`` equals ``skimage.filters.threshold_otsu`` exactly; integer dtypes wider
  than 16 bits are thresholded as float64;
- float images: skimage's default 256 bins over the data range;
- ``multiotsu`` (three classes, thresholds low < high) always uses 256 bins (skimage's multi-Otsu builds
  an nbins x nbins table, too big for a per-value uint16 histogram). Its polarity is decided at the plain
  Otsu threshold; the foreground is the two classes away from the background end: ``gray > low`` when
  bright, ``gray <= high`` when dark, and that threshold is the one recorded.

Polarity: ``"bright"`` keeps ``gray > threshold``, ``"dark"`` keeps ``gray <= threshold`` (skimage's
convention: pixels equal to the threshold belong to the dark side). ``"auto"`` applies
:func:`choose_polarity`; see docs/pseudo_masks.md for the rule and how it was measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import filters

from .methods import METHODS, PLAIN_METHODS, POLARITIES, REGION_METHODS  # noqa: F401 (re-exported)

FG_LOW = 0.005  # flag "fg_low" below this foreground fraction
FG_HIGH = 0.995  # flag "fg_high" above it
POLARITY_MAX_SIDE = 128  # the auto-polarity rule runs on a strided copy no larger than this

# Constants of the auto-polarity rule (fractions, so they do not depend on image size or dataset).
_RIM = 0.02  # the dark "outside" region is grown by this fraction of the short side (its soft rim)
_NEGLIGIBLE_DARK = 0.05  # dark side covering < 5% of the field of view: no dark object inside it
_MIN_EDGE = 0.10  # if < 10% of the edge is left once the outside is set aside, keep the whole edge
_TIE_MARGIN = 0.20  # edge votes closer than 20% of the touching edge are a tie: the minority side wins

# Constants of the region-aware clean-up (fractions of the short side of a <=256 px copy).
CLEAN_MAX_SIDE = 256
_THIN = 0.02  # opening half-width: removes hair, thin bridges and strips narrower than ~4% of the image
_EDGE_BAND = 0.05  # band along the field-of-view edge ...
_EDGE_HUG = 0.5  # ... a component with more than half of its pixels in it is a peripheral strip: dropped


@dataclass(frozen=True)
class PseudoMask:
    mask: np.ndarray  # bool (H, W), same shape as the input
    threshold: float  # in the input's intensity units; for multiotsu the one actually used
    polarity: str  # "bright" or "dark": the side that is foreground
    fg_fraction: float  # mask.mean()
    flags: tuple[str, ...]  # QC: "constant", "fg_low", "fg_high"
    method: str

    @property
    def degenerate(self) -> bool:
        return bool(self.flags)


def pseudo_mask(
    gray: np.ndarray,
    *,
    method: str = "otsu",
    polarity: str = "auto",
    valid: np.ndarray | None = None,
) -> PseudoMask:
    """Threshold one 2-D grayscale image into a foreground mask.

    ``gray``: 2-D, native resolution, full precision (uint8/uint16/int16/float32/float64), finite.
    ``valid``: optional bool mask of the same shape; the threshold is computed from these pixels only
    and the mask is False outside them. A constant image (or an empty ``valid``) gives an all-False
    mask flagged ``"constant"``; it never raises.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}. Available options are: {', '.join(METHODS)}")
    if polarity not in POLARITIES:
        raise ValueError(f"unknown polarity {polarity!r}. Available options are: {', '.join(POLARITIES)}")
    gray = _check_gray(gray)
    valid = _check_valid(valid, gray.shape)
    values = gray if valid is None else gray[valid]
    if values.size == 0 or values.min() == values.max():
        level = float(values.flat[0]) if values.size else 0.0
        pol = "bright" if polarity == "auto" else polarity
        return PseudoMask(np.zeros(gray.shape, bool), level, pol, 0.0, ("constant",), method)

    if method in REGION_METHODS:
        return _region_aware(gray, values, method, polarity, valid)
    if method == "multiotsu":
        low, high = _multiotsu(values)
        pol = polarity
        if pol == "auto":
            pol = choose_polarity(gray, _threshold(values, "otsu"), valid=valid)
        # Foreground = the two classes away from the background end: only the most background-like
        # class is dropped (measured better than keeping the single extreme class; docs/pseudo_masks.md).
        threshold = low if pol == "bright" else high
    else:
        threshold = _threshold(values, method)
        pol = choose_polarity(gray, threshold, valid=valid) if polarity == "auto" else polarity
    mask = _apply(gray, threshold, pol, valid)
    return _result(mask, threshold, pol, method)


def choose_polarity(
    gray: np.ndarray,
    threshold: float,
    *,
    valid: np.ndarray | None = None,
    max_side: int = POLARITY_MAX_SIDE,
) -> str:
    """The ``polarity="auto"`` rule: which side of ``threshold`` is the foreground.

    In words: the background is the side that touches the edge of the field of view more. The edge is
    the image border (or the border of ``valid``), but a dark *outside* region touching it -- vignette
    corners, black frames, air around a body -- is set aside first: it is the part of the dark side that
    is darker than the dark side's own Otsu level, connected to the edge, and outside the convex hull of
    the bright side (plus a thin rim). Two guards: if the dark side inside the field of view is
    negligible (< 5%), the threshold only separated the field of view from its surroundings and the
    field of view (bright) is the foreground; if the outside covers nearly the whole edge (> 90%), it
    *is* the background and the whole edge counts. When the two sides touch the remaining edge about
    equally (within 20%; objects cut by a tile border), the side with fewer pixels inside the field of
    view is the foreground.
    """
    gray = np.asarray(gray)
    step = max(1, -(-max(gray.shape) // max_side))
    g = gray[::step, ::step]
    bright = g > threshold
    if valid is None:
        dark = ~bright
        edge = np.zeros(g.shape, bool)
        edge[0] = edge[-1] = edge[:, 0] = edge[:, -1] = True
    else:
        v = np.asarray(valid, bool)[::step, ::step]
        bright &= v
        dark = v & ~bright
        edge = v & ~ndi.binary_erosion(v, border_value=0)
    n_dark = int(np.count_nonzero(dark))
    n_field = n_dark + int(np.count_nonzero(bright))
    if n_dark == 0 or n_dark == n_field:
        return "bright"

    outside = _dark_outside(g, bright, dark, edge)
    n_out = int(np.count_nonzero(outside))
    if n_dark - n_out < _NEGLIGIBLE_DARK * (n_field - n_out):
        return "bright"
    touch = edge & ~outside
    if np.count_nonzero(touch) < _MIN_EDGE * np.count_nonzero(edge):
        touch = edge
    dark_touch = np.count_nonzero(dark & touch)
    bright_touch = np.count_nonzero(bright & touch)
    if abs(dark_touch - bright_touch) < _TIE_MARGIN * (dark_touch + bright_touch):
        # Near tie on the edge (e.g. microscopy tiles whose objects are cut by the tile border):
        # the smaller side inside the field of view is the foreground.
        return "dark" if n_dark - n_out < np.count_nonzero(bright) else "bright"
    return "dark" if dark_touch < bright_touch else "bright"


def field_of_view(gray: np.ndarray, *, valid: np.ndarray | None = None, max_side: int = 256) -> np.ndarray:
    """Bool mask of the region that can hold the foreground: the image minus its dark *outside*.

    The outside is found as in :func:`choose_polarity` (dark pixels below the dark side's own Otsu level,
    connected to the edge, outside the convex hull of the bright side): vignette corners of a dermoscope,
    black frames and padding, air around a body, the black surround of a fundus photograph. The field of
    view is the largest remaining connected region with its holes filled, computed on a <= ``max_side``
    copy and scaled back (nearest). All True when there is no such outside.
    """
    gray = _check_gray(gray)
    valid = _check_valid(valid, gray.shape)
    values = gray if valid is None else gray[valid]
    full = np.ones(gray.shape, bool) if valid is None else valid.copy()
    if values.size == 0 or values.min() == values.max():
        return full
    step = max(1, -(-max(gray.shape) // max_side))
    g = gray[::step, ::step]
    bright = g > _threshold(values, "otsu")
    if valid is None:
        dark = ~bright
        edge = np.zeros(g.shape, bool)
        edge[0] = edge[-1] = edge[:, 0] = edge[:, -1] = True
    else:
        v = valid[::step, ::step]
        bright &= v
        dark = v & ~bright
        edge = v & ~ndi.binary_erosion(v, border_value=0)
    if not dark.any() or not bright.any():
        return full
    inside = ~_dark_outside(g, bright, dark, edge, rim=0.0)
    if valid is not None:
        inside &= v
    inside = _fill_holes(_largest(inside))
    return _upsample(inside, step, gray.shape) & full


# ----------------------------------------------------------------------------- thresholds


def _check_gray(gray: np.ndarray) -> np.ndarray:
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


def _check_valid(valid: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if valid is None:
        return None
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != shape:
        raise ValueError(f"valid has shape {valid.shape} but gray has shape {shape}")
    return valid


def _threshold(values: np.ndarray, method: str) -> float:
    """skimage's threshold of the given values (any shape, not constant)."""
    if np.issubdtype(values.dtype, np.integer) and values.dtype.itemsize > 2:
        values = values.astype(np.float64)
    if method == "otsu":
        if values.dtype == np.uint8:
            return float(filters.threshold_otsu(hist=_histogram_u8(values)))
        return float(filters.threshold_otsu(values))
    if method == "li":
        return float(filters.threshold_li(values))
    if method == "yen":
        return float(filters.threshold_yen(values))
    if method == "triangle":
        return float(filters.threshold_triangle(values))
    raise ValueError(f"unknown method {method!r}. Available options are: {', '.join(METHODS)}")


def _histogram_u8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """skimage's uint8 histogram (one bin per value, trimmed to [min, max]) via Pillow's C histogram,
    ~10x faster than ``np.bincount`` on a 512x512 image; ``threshold_otsu(hist=...)`` then gives exactly
    ``threshold_otsu(values)``."""
    from PIL import Image

    v = np.ascontiguousarray(values.reshape(1, -1) if values.ndim != 2 else values)
    counts = np.asarray(Image.fromarray(v, mode="L").histogram(), dtype=np.int64)
    nz = np.flatnonzero(counts)
    lo, hi = int(nz[0]), int(nz[-1])
    return counts[lo : hi + 1], np.arange(lo, hi + 1)


def _multiotsu(values: np.ndarray) -> tuple[float, float]:
    """Three-class Otsu over 256 bins: (low, high). Falls back to Otsu twice if it cannot split."""
    v = values.astype(np.float64) if np.issubdtype(values.dtype, np.integer) else values
    try:
        low, high = filters.threshold_multiotsu(v, classes=3, nbins=256)
    except ValueError:  # fewer than three distinct levels
        t = _threshold(values, "otsu")
        return t, t
    return float(low), float(high)


def _apply(gray: np.ndarray, threshold: float, polarity: str, valid: np.ndarray | None) -> np.ndarray:
    mask = gray > threshold if polarity == "bright" else gray <= threshold
    if valid is not None:
        mask &= valid
    return mask


def _result(mask: np.ndarray, threshold: float, polarity: str, method: str) -> PseudoMask:
    fg = float(np.count_nonzero(mask)) / mask.size
    flags = ("fg_low",) if fg < FG_LOW else ("fg_high",) if fg > FG_HIGH else ()
    return PseudoMask(mask, float(threshold), polarity, fg, flags, method)


# ----------------------------------------------------------------------------- polarity helpers


def _dark_outside(
    g: np.ndarray, bright: np.ndarray, dark: np.ndarray, edge: np.ndarray, rim: float = _RIM
) -> np.ndarray:
    """Dark pixels that look like the surroundings of the field of view (vignette, frame, air)."""
    dark_values = g[dark]
    lo, hi = dark_values.min(), dark_values.max()
    if lo == hi:
        return np.zeros(g.shape, bool)
    very_dark = dark & (g <= filters.threshold_otsu(dark_values))
    outside = _touching(very_dark, edge)
    if not outside.any():
        return outside
    opened = _dilate(~_dilate(~bright, 1), 1)  # 3x3 opening: drop isolated bright specks before the hull
    outside &= ~_convex_hull(opened if opened.any() else bright)
    if outside.any() and rim > 0:
        outside = _dilate(outside, max(1, round(rim * min(g.shape)))) & dark
    return outside


def _dilate(x: np.ndarray, width: int) -> np.ndarray:
    """Binary dilation by a (2 width + 1)^2 square, as shifted ORs (cheaper than ndimage on small arrays)."""
    out = x
    for _ in range(width):
        rows = out.copy()
        rows[1:] |= out[:-1]
        rows[:-1] |= out[1:]
        cols = rows.copy()
        cols[:, 1:] |= rows[:, :-1]
        cols[:, :-1] |= rows[:, 1:]
        out = cols
    return out


def _touching(x: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The connected components of ``x`` that contain a ``seed`` pixel."""
    labels, n = ndi.label(x)
    if n == 0:
        return x.copy()
    keep = np.zeros(n + 1, bool)
    keep[labels[seed & x]] = True
    keep[0] = False
    return keep[labels]


def _convex_hull(x: np.ndarray) -> np.ndarray:
    """Filled convex hull of a 2-D bool mask (rows between the convex envelopes of the row extremes)."""
    rows = np.flatnonzero(x.any(axis=1))
    hull = np.zeros(x.shape, bool)
    if rows.size == 0:
        return hull
    xr = x[rows]
    left = xr.argmax(axis=1)
    right = x.shape[1] - 1 - xr[:, ::-1].argmax(axis=1)
    ly, lx = _envelope(rows, left, lower=True)
    ry, rx = _envelope(rows, right, lower=False)
    ys = np.arange(rows[0], rows[-1] + 1)
    lo = np.floor(np.interp(ys, ly, lx))
    hi = np.ceil(np.interp(ys, ry, rx))
    cols = np.arange(x.shape[1])
    hull[ys] = (cols >= lo[:, None]) & (cols <= hi[:, None])
    return hull


def _envelope(y: np.ndarray, x: np.ndarray, *, lower: bool) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the convex envelope of points (y, x) sorted by y: lower = the left-hand boundary.

    Only points strictly left (lower) or right (upper) of every point above them, or of every point below
    them, can be vertices; the rest are dropped before :func:`_monotone_chain` (a few points remain of a
    few hundred, the same vertices come out)."""
    y, x = np.asarray(y), np.asarray(x)
    if y.size > 3:
        v = x if lower else -x
        inf = np.array([np.iinfo(np.int64).max])
        above = np.concatenate([inf, np.minimum.accumulate(v[:-1])])
        below = np.concatenate([np.minimum.accumulate(v[::-1][:-1])[::-1], inf])
        keep = (v < above) | (v < below)
        y, x = y[keep], x[keep]
    return _monotone_chain(y, x, lower=lower)


def _monotone_chain(y: np.ndarray, x: np.ndarray, *, lower: bool) -> tuple[np.ndarray, np.ndarray]:
    """Andrew's monotone chain over every point (y, x), sorted by y; collinear points are dropped."""
    hy: list[int] = []
    hx: list[int] = []
    for yi, xi in zip(np.asarray(y).tolist(), np.asarray(x).tolist()):
        while len(hy) >= 2:
            cross = (hy[-1] - hy[-2]) * (xi - hx[-2]) - (hx[-1] - hx[-2]) * (yi - hy[-2])
            if (cross <= 0) if lower else (cross >= 0):
                hy.pop()
                hx.pop()
            else:
                break
        hy.append(yi)
        hx.append(xi)
    return np.asarray(hy, float), np.asarray(hx, float)


# ----------------------------------------------------------------------------- region-aware methods


def _region_aware(
    gray: np.ndarray, values: np.ndarray, method: str, polarity: str, valid: np.ndarray | None
) -> PseudoMask:
    """fov_<base>[_clean|_hull]: threshold inside the field of view, then optionally clean up.

    The dark outside only contaminates a *dark* foreground (lesion + vignette, lungs + air). So the
    polarity is decided first (plain Otsu level, whole image); for a bright foreground the outside is
    background already and the mask is the plain one (holes filled for _clean/_hull).
    """
    base = "multiotsu" if method.startswith("fov_multiotsu") else "otsu"
    cleanup = method.rsplit("_", 1)[-1] if method.endswith(("_clean", "_hull")) else None
    pol = polarity
    if pol == "auto":
        pol = choose_polarity(gray, _threshold(values, "otsu"), valid=valid)
    region = valid
    if pol == "dark":
        region = field_of_view(gray, valid=valid)
        inside = gray[region]
        if inside.size == 0 or inside.min() == inside.max():
            return PseudoMask(np.zeros(gray.shape, bool), float(values.min()), pol, 0.0, ("constant",), method)
        values = inside
    if base == "multiotsu":
        low, high = _multiotsu(values)
        threshold = low if pol == "bright" else high
    else:
        threshold = _threshold(values, "otsu")
    mask = _apply(gray, threshold, pol, region)
    if cleanup is not None:
        if pol == "dark":
            mask = _clean(mask, region if region is not None else np.ones(gray.shape, bool), cleanup == "hull")
        mask = _fill_holes(mask)
    return _result(mask, threshold, pol, method)


def _clean(mask: np.ndarray, region: np.ndarray, hull: bool) -> np.ndarray:
    """Drop thin structures and strips hugging the field-of-view edge; optionally hull each object.

    Runs on a <= CLEAN_MAX_SIDE copy: opening (square, half-width _THIN) separates objects from thin
    bridges and removes hair-like structures; components with more than _EDGE_HUG of their pixels within
    _EDGE_BAND of the edge of the field of view (image border or outside) are dropped; the survivors are
    grown back inside the original mask (or replaced by their convex hulls) and scaled back.
    """
    step = max(1, -(-max(mask.shape) // CLEAN_MAX_SIDE))
    m = mask[::step, ::step]
    f = region[::step, ::step]
    n = min(m.shape)
    r = max(1, round(_THIN * n))
    core = ndi.maximum_filter(ndi.minimum_filter(m.view(np.uint8), 2 * r + 1), 2 * r + 1).view(bool) & m
    labels, count = ndi.label(core)
    if count == 0:
        return np.zeros(mask.shape, bool)
    outer = ~f
    outer[0] = outer[-1] = True
    outer[:, 0] = outer[:, -1] = True
    b = max(1, round(_EDGE_BAND * n))
    band = ndi.maximum_filter(outer.view(np.uint8), 2 * b + 1).view(bool)
    total = np.bincount(labels.ravel(), minlength=count + 1)
    in_band = np.bincount(labels.ravel(), weights=band.ravel(), minlength=count + 1)
    keep = in_band <= _EDGE_HUG * total
    keep[0] = False
    kept = keep[labels]
    kept = ndi.maximum_filter(kept.view(np.uint8), 2 * r + 3).view(bool) & m  # grow back what the opening trimmed
    if not hull:
        return _upsample(kept, step, mask.shape) & mask
    labels, count = ndi.label(kept)
    hulls = np.zeros(m.shape, bool)
    for i, box in enumerate(ndi.find_objects(labels), start=1):
        hulls[box] |= _convex_hull(labels[box] == i)
    return _upsample(hulls, step, mask.shape) & region


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions that do not touch the image border (labelling, not iterated dilation)."""
    labels, n = ndi.label(~mask)
    if n == 0:
        return mask.copy()
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    hole = np.ones(n + 1, bool)
    hole[border] = False
    hole[0] = False
    return mask | hole[labels]


def _largest(x: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(x)
    if n <= 1:
        return x
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def _upsample(small: np.ndarray, step: int, shape: tuple[int, ...]) -> np.ndarray:
    if step == 1:
        return small
    return np.repeat(np.repeat(small, step, axis=0), step, axis=1)[: shape[0], : shape[1]]
