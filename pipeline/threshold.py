"""Global thresholding of one grayscale image into a binary pseudo-mask (MedSASS's free labels): the methods.

Pure numpy / scikit-image: no Dask, no Zarr, no file I/O. The threshold and the mask are computed at native
resolution and full precision; the ``polarity="auto"`` decision looks at a <=128 px strided copy, and the
region-aware methods find the field of view and clean up on a <=256 px copy. The parts, one module each:

* :mod:`.global_threshold`  skimage's thresholds on the image's own values (``otsu`` is exactly the paper's Otsu)
* :mod:`.polarity`          which side of the threshold is the foreground (``polarity="auto"``)
* :mod:`.field_of_view`     the field of view and the clean-up of the region-aware ``fov_*`` methods
* :mod:`.mask_geometry`     dilation, connectivity, convex hulls, hole filling on small bool arrays

``multiotsu``'s polarity is decided at the plain Otsu threshold; its foreground is the two classes away from the
background end: ``gray > low`` when bright, ``gray <= high`` when dark, and that threshold is the one recorded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .field_of_view import CLEAN_MAX_SIDE, FOV_MAX_SIDE, clean, clean_small, field_of_view, field_of_view_small
from .global_threshold import Values, apply_threshold, check_gray, check_valid, multiotsu
from .levels import Levels
from .mask_geometry import Blocks, fill_holes, strided, upsample
from .methods import FG_HIGH, FG_LOW, METHODS, PLAIN_METHODS, POLARITIES, REGION_METHODS, fg_flags  # noqa: F401 (re-exported)
from .polarity import POLARITY_MAX_SIDE, choose_polarity  # noqa: F401 (re-exported)

__all__ = ["FG_HIGH", "FG_LOW", "METHODS", "POLARITIES", "PseudoMask", "auto_polarity", "choose_polarity", "field_of_view", "pseudo_mask"]


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
    levels: Levels | None = None,
) -> PseudoMask:
    """Threshold one 2-D grayscale image into a foreground mask.

    ``gray``: 2-D, native resolution, full precision (uint8/uint16/int16/float32/float64), finite.
    ``valid``: optional bool mask of the same shape; the threshold is computed from these pixels only
    and the mask is False outside them. A constant image (or an empty ``valid``) gives an all-False
    mask flagged ``"constant"``; it never raises. ``levels``: the same image as integer codes into a table
    (``gray == levels.values[levels.codes]``, e.g. a DICOM frame's stored values; :class:`Levels`), so the
    histograms count codes; 16-bit integer images are their own levels. The result is the same either way.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}. Available options are: {', '.join(METHODS)}")
    if polarity not in POLARITIES:
        raise ValueError(f"unknown polarity {polarity!r}. Available options are: {', '.join(POLARITIES)}")
    gray, valid, values = _inputs(gray, valid, levels)
    if values.is_constant():
        level = float(values.min()) if values.size else 0.0
        pol = "bright" if polarity == "auto" else polarity
        return PseudoMask(np.zeros(gray.shape, bool), level, pol, 0.0, ("constant",), method)

    if method in REGION_METHODS:
        return region_aware(gray, values, method, polarity, valid)
    if method == "multiotsu":
        low, high = multiotsu(values.array)
        pol = polarity
        if pol == "auto":
            pol = choose_polarity(gray, values.threshold("otsu"), valid=valid)
        # Foreground = the two classes away from the background end: only the most background-like
        # class is dropped (measured better than keeping the single extreme class; docs/pseudo_masks.md).
        threshold = low if pol == "bright" else high
    else:
        threshold = values.threshold(method)
        pol = choose_polarity(gray, threshold, valid=valid) if polarity == "auto" else polarity
    mask = apply_threshold(gray, threshold, pol, valid)
    return result(mask, threshold, pol, method)


def auto_polarity(gray: np.ndarray, *, method: str = "otsu", valid: np.ndarray | None = None,
                  levels: Levels | None = None) -> str:
    """The side ``pseudo_mask(gray, method=method, polarity="auto", valid=valid)`` takes, without computing the mask
    (the per-image vote of ``--polarity store``): decided at the plain Otsu level for ``multiotsu`` and the
    region-aware methods, at the method's own threshold otherwise; ``"bright"`` for a constant image."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}. Available options are: {', '.join(METHODS)}")
    gray, valid, values = _inputs(gray, valid, levels)
    if values.is_constant():
        return "bright"
    level_method = "otsu" if method == "multiotsu" or method in REGION_METHODS else method
    return choose_polarity(gray, values.threshold(level_method), valid=valid)


def _inputs(gray: np.ndarray, valid: np.ndarray | None, levels: Levels | None) -> tuple[np.ndarray, np.ndarray | None, Values]:
    """Checked gray and valid, and the values to threshold (16-bit integer images count their own values)."""
    gray = check_gray(gray, levels)
    valid = check_valid(valid, gray.shape)
    if levels is None and gray.dtype in (np.uint16, np.int16):
        levels = Levels.of_integers(gray)
    return gray, valid, Values(gray, valid, levels)


def region_aware(gray: np.ndarray, values: Values, method: str, polarity: str, valid: np.ndarray | None) -> PseudoMask:
    """fov_<base>[_clean|_hull]: threshold inside the field of view, then optionally clean up.

    The dark outside only contaminates a *dark* foreground (lesion + vignette, lungs + air). So the
    polarity is decided first (plain Otsu level, whole image); for a bright foreground the outside is
    background already and the mask is the plain one (holes filled for _clean/_hull).

    A dark ``_hull`` mask without ``valid`` is built on the <= 256 px copy alone: the field of view and the hulls
    are both nearest-neighbour upsamplings of it at the same stride, and filling the holes of such an upsampling
    is the upsampling of the filled copy, so this is the same mask without full-resolution morphology.
    """
    base = "multiotsu" if method.startswith("fov_multiotsu") else "otsu"
    cleanup = method.rsplit("_", 1)[-1] if method.endswith(("_clean", "_hull")) else None
    pol = polarity
    if pol == "auto":
        pol = choose_polarity(gray, values.threshold("otsu"), valid=valid)
    region, whole = valid, values
    if pol == "dark":
        small = field_of_view_small(gray, whole, valid)
        step = small[1] if small is not None else strided(gray.shape, FOV_MAX_SIDE)
        inside_small = small[0] if small is not None else np.ones(gray[::step, ::step].shape, bool)
        if valid is None:  # the field of view stays a mask of the strided copy unless a full one is needed
            region = Blocks(inside_small, step, gray.shape)
            values = Values(gray, region if small is not None else None, whole.levels)
        else:
            region = upsample(inside_small, step, gray.shape) & valid
            values = Values(gray, region, whole.levels)
        if values.is_constant():
            return PseudoMask(np.zeros(gray.shape, bool), float(whole.min()), pol, 0.0, ("constant",), method)
    if base == "multiotsu":
        low, high = multiotsu(values.array)
        threshold = low if pol == "bright" else high
    else:
        threshold = values.threshold("otsu")
    if pol == "dark" and cleanup == "hull" and valid is None and FOV_MAX_SIDE == CLEAN_MAX_SIDE:
        m = apply_threshold(gray[::step, ::step], threshold, pol, inside_small)
        hulls = clean_small(m, inside_small, hull=True) & inside_small
        return result(upsample(fill_holes(hulls), step, gray.shape), threshold, pol, method)
    if isinstance(region, Blocks):
        region = region.full()
    mask = apply_threshold(gray, threshold, pol, region)
    if cleanup is not None:
        if pol == "dark":
            mask = clean(mask, region, cleanup == "hull")
        mask = fill_holes(mask)
    return result(mask, threshold, pol, method)


def result(mask: np.ndarray, threshold: float, polarity: str, method: str) -> PseudoMask:
    fg = float(np.count_nonzero(mask)) / mask.size
    flags = fg_flags(fg)
    return PseudoMask(mask, float(threshold), polarity, fg, flags, method)
