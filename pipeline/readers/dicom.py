"""DICOM reader (pydicom 3): header-only probe, frame-selective decode, display pipeline.

Display order (pydicom applies none of it for us): modality LUT / rescale -> VOI LUT or first
window -> MONOCHROME1 inversion within the output range. Colour (RGB, YBR_* converted to RGB by
pydicom, PALETTE COLOR via its LUT) becomes BT.601 luma. Enhanced multi-frame objects take rescale
and window from the shared / per-frame functional groups.

Privacy: only the pixel-module tags below, SOP Class, Modality and PatientID are read from the
header (other values are skipped unread); PatientID is hashed with the salt at once and dropped.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom import uid as U
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    get_decoder,
    iter_pixels,
)
from pydicom.pixels.utils import pixel_array

from medsass.errors import InputError, MissingPluginError, SkipInput

from ..gray import to_gray
from ..levels import Levels, offset_codes
from .frame import Frame, Probe, check_size, select_frames

_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # PixelData, FloatPixelData, DoubleFloatPixelData
_PIXEL_KEYWORDS = (
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "RescaleIntercept", "RescaleSlope",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "ModalityLUTSequence", "VOILUTSequence",
    *(f"{c}PaletteColorLookupTable{p}" for c in ("Red", "Green", "Blue", "Alpha") for p in ("Descriptor", "Data")),
    *(f"Segmented{c}PaletteColorLookupTableData" for c in ("Red", "Green", "Blue", "Alpha")),
)
_HEADER_TAGS = [tag_for_keyword(k) for k in (
    "SOPClassUID", "Modality", "PatientID", *_PIXEL_KEYWORDS,
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
)]
_FG_SEQUENCES = ("PixelValueTransformationSequence", "FrameVOILUTSequence")

_LIBJPEG = "pylibjpeg-libjpeg (pip install pylibjpeg pylibjpeg-libjpeg)"
_PLUGIN_HINTS = {
    **dict.fromkeys(U.JPEG2000TransferSyntaxes, "pylibjpeg-openjpeg (pip install pylibjpeg pylibjpeg-openjpeg)"),
    **dict.fromkeys((U.HTJ2K, U.HTJ2KLossless, U.HTJ2KLosslessRPCL), "pylibjpeg-openjpeg>=2.4"),
    **dict.fromkeys((U.JPEGBaseline8Bit, U.JPEGExtended12Bit, U.JPEGLossless, U.JPEGLosslessSV1), _LIBJPEG),
    **dict.fromkeys((U.JPEGLSLossless, U.JPEGLSNearLossless), f"{_LIBJPEG} or python-gdcm"),
    U.RLELossless: "pylibjpeg-rle (pip install pylibjpeg pylibjpeg-rle)",
}
# Objects whose pixel data are not a picture of anatomy: pseudo-masks of them would be noise.
_NON_IMAGE = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation holds label masks, not an image",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation holds label masks, not an image",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose holds a dose grid, not an image",
}
_CS = re.compile(r"[A-Z0-9_ ]{1,16}")  # code strings we let into meta
_UID = re.compile(r"[0-9.]{1,64}")


# --- pydicom decoding plugin: imagecodecs (libjpeg-turbo 3) for 12-bit JPEG Extended -------------
# pylibjpeg-libjpeg rejects some real 12-bit files (e.g. the NEMA JPEG-lossy.dcm) and Pillow has no
# 12-bit JPEG; imagecodecs is already a dependency (TIFF), so register it as a pydicom plugin.
DECODER_DEPENDENCIES = {U.JPEGExtended12Bit: ("imagecodecs",)}
_IMAGECODECS = "medsass-imagecodecs"


def is_available(uid: str) -> bool:
    """pydicom plugin hook: imagecodecs present and the syntax is ours."""
    try:
        import imagecodecs
    except ImportError:
        return False
    return uid in DECODER_DEPENDENCIES and hasattr(imagecodecs, "jpeg8_decode")


def _decode_jpeg12(src: bytes, runner) -> bytes:
    """pydicom plugin hook: decode one single-sample unsigned JPEG frame with imagecodecs."""
    import imagecodecs

    if runner.samples_per_pixel != 1 or runner.pixel_representation != 0:
        raise NotImplementedError("the imagecodecs fallback handles unsigned single-sample JPEG only")
    return imagecodecs.jpeg8_decode(src).astype(runner.pixel_dtype, copy=False).tobytes()


try:
    get_decoder(U.JPEGExtended12Bit).add_plugin(_IMAGECODECS, (__name__, "_decode_jpeg12"))
except ValueError:  # already registered (module reloaded)
    pass


# --- header ---------------------------------------------------------------------------------------
def _header(path: Path, salt: str) -> tuple[Dataset, int | None, str | None]:
    """(dataset of the wanted tags, pixel data tag or None, group key). Stops before the pixels."""
    size = path.stat().st_size
    if size == 0:
        raise InputError(path, "empty_file", "file is empty (0 bytes)")
    with open(path, "rb") as f:
        force = f.read(132)[128:132] != b"DICM"  # no preamble: sniff already said DICOM
        f.seek(0)
        found: dict[str, int] = {}

        def at_pixels(tag, vr, length) -> bool:
            """Stop at the pixel data; note any element whose value runs past the end of the file."""
            end = f.tell() + length if length != 0xFFFFFFFF else 0
            if end > size:
                found.setdefault("short", end - size)
            if tag in _PIXEL_TAGS:
                found.update(tag=int(tag), length=length, pos=f.tell())
                return True
            return False

        try:
            ds = read_partial(f, stop_when=at_pixels, force=force, specific_tags=_HEADER_TAGS)
        except Exception as exc:  # EOF inside the header, garbage after a DICOM-looking start, ...
            code = "truncated" if isinstance(exc, (EOFError, UnboundLocalError)) else "decode_error"
            raise InputError(path, code, f"cannot parse the DICOM header: {type(exc).__name__}: {exc}") from exc
    group = None
    pid = ds.get("PatientID")
    if pid:
        group = hashlib.sha256((salt + str(pid)).encode("utf-8")).hexdigest()[:16]
    if "PatientID" in ds:
        del ds.PatientID
    meta_len = ds.file_meta.get("FileMetaInformationGroupLength")
    if meta_len and (0 if force else 132) + 12 + int(meta_len) > size:
        raise InputError(path, "truncated", "the file ends inside the DICOM file meta information")
    # A deflated dataset is parsed from an inflated copy, so file offsets say nothing there.
    if "short" in found and ds.file_meta.get("TransferSyntaxUID") != U.DeflatedExplicitVRLittleEndian:
        where = "pixel data" if "tag" in found and found["pos"] + found["length"] > size else "header"
        raise InputError(path, "truncated", f"DICOM {where} runs {found['short']} bytes past the end of the file")
    return ds, found.get("tag"), group


def _sop_class(ds: Dataset) -> str:
    return str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")


def _require_pixels(path: Path, ds: Dataset, pixel_tag: int | None) -> None:
    """SkipInput for DICOMDIR and objects without pixel data (SR, RTSTRUCT, PDF, waveforms, ...)."""
    sop = _sop_class(ds)
    if sop == U.MediaStorageDirectoryStorage:
        raise SkipInput(path, "dicomdir", "DICOMDIR (media index) has no pixel data; its images are read as separate files")
    if sop in _NON_IMAGE:
        raise SkipInput(path, "non_image", f"DICOM {_NON_IMAGE[sop]}; skipped")
    if pixel_tag is None and not sop:
        raise InputError(path, "decode_error", "no SOP Class and no pixel data: not a DICOM dataset, or cut short")
    if pixel_tag is None:
        name = U.UID(sop).name.removesuffix(" Storage") if sop else "object"
        raise SkipInput(path, "no_pixel_data", f"DICOM {name} has no pixel data")
    if not ds.get("Rows") or not ds.get("Columns"):
        raise InputError(path, "decode_error", "DICOM image has pixel data but no Rows/Columns")


def _transfer_syntax(ds: Dataset) -> U.UID:
    """File meta transfer syntax, or the encoding pydicom guessed for files without meta."""
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts:
        return U.UID(ts)
    implicit, little = ds.original_encoding[:2]
    if not little:
        return U.ExplicitVRBigEndian
    return U.ImplicitVRLittleEndian if implicit else U.ExplicitVRLittleEndian


def _n_frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def _dtype(ds: Dataset, pixel_tag: int) -> str:
    if pixel_tag != 0x7FE00010:
        return "float32" if pixel_tag == 0x7FE00008 else "float64"
    bits = int(ds.get("BitsAllocated") or 8)
    bits = 8 if bits <= 8 else 16 if bits <= 16 else 32 if bits <= 32 else 64
    return f"{'int' if ds.get('PixelRepresentation') == 1 else 'uint'}{bits}"


def _clean(value, pattern: re.Pattern) -> str | None:
    text = str(value).strip().upper() if value is not None else ""
    return text if pattern.fullmatch(text) else None


def _tech_meta(ds: Dataset, pixel_tag: int) -> dict:
    """JSON-safe technical facts only: nothing free-text from the header."""
    sop = _sop_class(ds)
    return {
        "modality": _clean(ds.get("Modality"), _CS),
        "photometric": _clean(ds.get("PhotometricInterpretation"), _CS) or "MONOCHROME2",
        "transfer_syntax": _clean(_transfer_syntax(ds), _UID),
        "sop_class": U.UID(sop).name if sop and U.UID(sop).name != sop else None,  # dictionary names only
        "bits_stored": int(ds.get("BitsStored") or 0) or None,
        "samples_per_pixel": int(ds.get("SamplesPerPixel") or 1),
        "dtype": _dtype(ds, pixel_tag),
    }


def probe(path: Path, fmt: str = "dicom", *, salt: str = "") -> Probe:
    """Header only (stops before the pixel data)."""
    ds, pixel_tag, group = _header(path, salt)
    _require_pixels(path, ds, pixel_tag)
    shape = (int(ds.Rows), int(ds.Columns))
    return Probe(format="dicom", n_frames=_n_frames(ds), shape=shape, group=group, meta=_tech_meta(ds, pixel_tag))


# --- decoding -------------------------------------------------------------------------------------
def _missing(path: Path, ts: U.UID) -> MissingPluginError:
    hint = _PLUGIN_HINTS.get(ts, "a pydicom pixel data plugin")
    return MissingPluginError(path, f"install {hint} to decode {ts.name} (transfer syntax {ts})")


def _check_decoder(path: Path, ts: U.UID) -> None:
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise InputError(
            path, "unsupported_format",
            f"pydicom cannot decode transfer syntax {ts.name} ({ts}); convert the file (e.g. dcmdjpeg/gdcmconv --raw)",
        ) from None
    if not decoder.is_available:
        raise _missing(path, ts)


def _arrays(path: Path, ds: Dataset, ts: U.UID, pixel_tag: int, idx: list[int], n: int,
            in_memory: bool, plugin: str) -> list[np.ndarray]:
    """Decoded frames in ``idx`` order; only the requested frames are decoded.

    File mode reads just the bytes the requested frames need. In-memory mode (deflated files, files
    without a transfer syntax, or files pydicom's file mode cannot parse, e.g. a VR switch) reads the
    pixel element first.
    """
    opts = {"decoding_plugin": plugin} if plugin else {}
    if in_memory:
        full = dcmread(path, force=True, specific_tags=[*_HEADER_TAGS, pixel_tag, 0x7FE00001, 0x7FE00002])
        full.file_meta.TransferSyntaxUID = ts
        return [pixel_array(full, index=i if n > 1 else None, **opts) for i in idx]
    with open(path, "rb") as f:
        return list(iter_pixels(f, indices=None if idx == list(range(n)) else idx, **opts))


def _decode_all(path: Path, ds: Dataset, ts: U.UID, pixel_tag: int, idx: list[int], n: int) -> list[np.ndarray]:
    """Try file mode, then in-memory mode, then (12-bit JPEG) pydicom's own plugins; map the errors."""
    plugin = ""
    if ts == U.JPEGExtended12Bit and int(ds.get("BitsStored") or 8) > 8 and is_available(ts):
        plugin = _IMAGECODECS
    in_memory = ts == U.DeflatedExplicitVRLittleEndian or not ds.file_meta.get("TransferSyntaxUID")
    attempts = [(in_memory, plugin)] + ([] if in_memory else [(True, plugin)]) + ([(True, "")] if plugin else [])
    first: Exception | None = None
    for mem, plug in attempts:
        try:
            return _arrays(path, ds, ts, pixel_tag, idx, n, mem, plug)
        except Exception as exc:
            first = first or exc
    exc, text = first, str(first)
    if isinstance(exc, RuntimeError) and "missing dependencies" in text:
        raise _missing(path, ts) from exc
    truncated = isinstance(exc, EOFError) or "less than" in text or "truncat" in text
    raise InputError(path, "truncated" if truncated else "decode_error", f"{ts.name}: {type(exc).__name__}: {text}") from exc


def _frame_view(ds: Dataset, i: int) -> Dataset:
    """The pixel tags that apply to frame ``i``: top level, then shared, then per-frame functional groups."""
    if "SharedFunctionalGroupsSequence" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        return ds  # the common case: no copy
    view = Dataset()
    view.file_meta = ds.file_meta
    view.set_original_encoding(*ds.original_encoding[:2], ds.original_character_set)
    for key in _PIXEL_KEYWORDS:
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


def _stored_range(view: Dataset, arr: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
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


def _to_display(arr: np.ndarray, view: Dataset) -> tuple[np.ndarray, dict, Levels | None]:
    """One decoded frame -> 2-D display values, what was done to it, and (integer monochrome frames whose values
    the LUTs changed) the same image as stored-value codes into a table of display values.

    The table is pydicom's LUTs applied to every stored value from the frame's minimum to its maximum, so each
    pixel gets exactly the value the LUTs give it, at the cost of one lookup instead of float arithmetic per pixel.
    """
    photometric = _clean(view.get("PhotometricInterpretation"), _CS) or "MONOCHROME2"
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
    lo, hi = _stored_range(view, arr, dmin, dmax)
    if arr.dtype.kind not in "ui" or arr.dtype.itemsize > 2:
        return _display(arr, view, lo, hi, info), info, None
    table = _display(np.arange(dmin, dmax + 1, dtype=arr.dtype), view, lo, hi, info)
    if not (info["rescaled"] or info["voi"] != "none" or info["inverted"]):
        return arr, info, None  # stored values shown as they are
    levels = Levels(offset_codes(arr, dmin), table)
    return levels.image(), info, levels


def _display(arr: np.ndarray, view: Dataset, lo: float, hi: float, info: dict) -> np.ndarray:
    """Modality LUT / rescale -> VOI LUT or window -> MONOCHROME1 inversion, value by value (``info`` is updated)."""
    arr, lo, hi, info["rescaled"] = _modality(arr, view, lo, hi)
    arr, lo, hi, info["voi"] = _voi(arr, view, lo, hi)
    if info["photometric"] == "MONOCHROME1":  # lo + hi - x; integer wrap-around cancels out as x is in [lo, hi]
        arr = np.asarray(lo + hi).astype(arr.dtype) - np.clip(arr, lo, hi).astype(arr.dtype, copy=False)
        info["inverted"] = True
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return arr


def read(path: Path, fmt: str, frames: Sequence[int] | None, *, max_pixels: int) -> list[Frame]:
    """Decode the requested frames to display grayscale."""
    ds, pixel_tag, _ = _header(path, "")
    _require_pixels(path, ds, pixel_tag)
    n = _n_frames(ds)
    idx = select_frames(path, frames, n)
    if not idx:
        return []
    check_size(path, int(ds.Rows), int(ds.Columns), len(idx), max_pixels)
    ts = _transfer_syntax(ds)
    if pixel_tag == 0x7FE00010:
        _check_decoder(path, ts)
    meta = _tech_meta(ds, pixel_tag)
    base = {k: meta[k] for k in ("modality", "transfer_syntax", "bits_stored")}
    out = []
    for i, arr in zip(idx, _decode_all(path, ds, ts, pixel_tag, idx, n)):
        pixels, info, levels = _to_display(arr, _frame_view(ds, i))
        out.append(Frame(pixels=pixels, index=i, meta={**base, **info}, levels=levels))
    return out
