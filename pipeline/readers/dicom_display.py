"""DICOM display pipeline: one decoded frame -> the grayscale a viewer shows (the DICOM reader's decode, :mod:`.dicom`).

Display order (pydicom applies none of it for us): modality LUT / rescale -> VOI LUT or first window -> MONOCHROME1
inversion within the output range. Colour (RGB, YBR_* converted to RGB by pydicom, PALETTE COLOR via its LUT) becomes
BT.601 luma. Enhanced multi-frame objects take rescale and window from the shared / per-frame functional groups
(:func:`frame_view`).
"""
from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from ..gray import to_gray
from ..levels import Levels, offset_codes
from .dicom_header import CS, PIXEL_KEYWORDS, clean

_FG_SEQUENCES = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def frame_view(ds: Dataset, i: int) -> Dataset:
    """The pixel tags that apply to frame ``i``: top level, then shared, then per-frame functional groups."""
    if "SharedFunctionalGroupsSequence" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        return ds  # the common case: no copy
    view = Dataset()
    view.file_meta = ds.file_meta
    view.set_original_encoding(*ds.original_encoding[:2], ds.original_character_set)
    for key in PIXEL_KEYWORDS:
        if key in ds:
            view[key] = ds[key]
    for seq, j in (("SharedFunctionalGroupsSequence", 0), ("PerFrameFunctionalGroupsSequence", i)):
        items = ds.get(seq)
        if not items or len(items) <= j:
            continue
        for name in _FG_SEQUENCES:
            sub = items[j].get(name)
            if sub:
                for elem in sub[0]:
                    view[elem.tag] = elem
    return view


def stored_range(view: Dataset, arr: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """Value range of the stored pixels (Bits Stored), widened to the data's [lo, hi] and bounded by the dtype."""
    if arr.dtype.kind == "f" or "BitsStored" not in view:
        return lo, hi
    bits = int(view.BitsStored)
    signed = view.get("PixelRepresentation") == 1
    info = np.iinfo(arr.dtype)
    return max(min(lo, -(2 ** (bits - 1)) if signed else 0), info.min), min(max(hi, 2 ** (bits - signed) - 1), info.max)


def _modality(arr: np.ndarray, view: Dataset, lo: float, hi: float) -> tuple[np.ndarray, float, float, bool]:
    """Modality LUT or rescale; integer rescales stay integer (int16/int32)."""
    if view.get("ModalityLUTSequence"):
        depth = int(view.ModalityLUTSequence[0].LUTDescriptor[2])
        return apply_modality_lut(arr, view), 0, 2**depth - 1, True
    slope, intercept = view.get("RescaleSlope"), view.get("RescaleIntercept")
    if slope is None or intercept is None:
        return arr, lo, hi, False
    s, b = float(slope), float(intercept)
    if s == 1 and b == 0:
        return arr, lo, hi, False
    lo, hi = sorted((lo * s + b, hi * s + b))
    if arr.dtype.kind in "ui" and s.is_integer() and b.is_integer():
        for dt in (np.int16, np.int32):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max and arr.dtype.itemsize <= 2:
                out = arr.astype(dt)
                if s != 1:
                    out *= dt(s)
                out += dt(b)
                return out, lo, hi, True
    return apply_modality_lut(arr, view), lo, hi, True


def _voi(arr: np.ndarray, view: Dataset, lo: float, hi: float) -> tuple[np.ndarray, float, float, str]:
    """VOI LUT (preferred) or the first window, which gives float32 in [0, 1] (0 = window bottom).

    Normalising the window output makes it independent of Bits Stored (pydicom maps the window onto
    the stored range); invalid windows (width < 1, malformed values) are ignored.
    """
    lut = view.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") and lut[0].get("LUTData") is not None:
        depth = int(lut[0].LUTDescriptor[2])
        return apply_voi_lut(arr, view, index=0), 0, 2**depth - 1, "lut"
    if view.get("WindowCenter") is not None and view.get("WindowWidth") is not None and "BitsStored" in view:
        try:
            out = apply_voi_lut(arr, view, index=0)
        except (ValueError, IndexError, TypeError):  # width < 1, malformed multi-values
            return arr, lo, hi, "none"
        with np.errstate(over="ignore"):  # pydicom sends far-out values to its y_min / y_max
            y_min, y_max = apply_voi_lut(np.array([-1e30, 1e30]), view, index=0).tolist()
        out -= y_min
        out *= 1.0 / (y_max - y_min)
        return out.astype(np.float32), 0.0, 1.0, "window"
    return arr, lo, hi, "none"


def to_display(arr: np.ndarray, view: Dataset) -> tuple[np.ndarray, dict, Levels | None]:
    """One decoded frame -> 2-D display values, what was done to it, and (integer monochrome frames whose values
    the LUTs changed) the same image as stored-value codes into a table of display values.

    The table is pydicom's LUTs applied to every stored value from the frame's minimum to its maximum, so each
    pixel gets exactly the value the LUTs give it, at the cost of one lookup instead of float arithmetic per pixel.
    """
    photometric = clean(view.get("PhotometricInterpretation"), CS) or "MONOCHROME2"
    if not arr.dtype.isnative:  # big-endian files
        arr = arr.astype(arr.dtype.newbyteorder("="))
    info = {"photometric": photometric, "channels": arr.shape[2] if arr.ndim == 3 else 1,
            "orig_dtype": arr.dtype.name, "voi": "none", "inverted": False, "rescaled": False}
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        rgb = apply_color_lut(arr, view)
        return to_gray(rgb, mode="auto"), info, None
    if arr.ndim == 3:  # RGB, or YBR already converted to RGB by pydicom
        return to_gray(arr[..., :3], mode="rgb"), info, None
    dmin, dmax = arr.min().item(), arr.max().item()
    lo, hi = stored_range(view, arr, dmin, dmax)
    if arr.dtype.kind not in "ui" or arr.dtype.itemsize > 2:
        return apply_luts(arr, view, lo, hi, info), info, None
    table = apply_luts(np.arange(dmin, dmax + 1, dtype=arr.dtype), view, lo, hi, info)
    if not (info["rescaled"] or info["voi"] != "none" or info["inverted"]):
        return arr, info, None  # stored values shown as they are
    levels = Levels(offset_codes(arr, dmin), table)
    return levels.image(), info, levels


def apply_luts(arr: np.ndarray, view: Dataset, lo: float, hi: float, info: dict) -> np.ndarray:
    """Modality LUT / rescale -> VOI LUT or window -> MONOCHROME1 inversion, value by value (``info`` is updated)."""
    arr, lo, hi, info["rescaled"] = _modality(arr, view, lo, hi)
    arr, lo, hi, info["voi"] = _voi(arr, view, lo, hi)
    if info["photometric"] == "MONOCHROME1":  # lo + hi - x; integer wrap-around cancels out as x is in [lo, hi]
        arr = np.asarray(lo + hi).astype(arr.dtype) - np.clip(arr, lo, hi).astype(arr.dtype, copy=False)
        info["inverted"] = True
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return arr
