"""DICOM reader (pydicom 3): header-only probe, frame-selective decode, display pipeline.

The parts: dicom_header.py reads the header up to the pixel data (privacy, what is an image, technical facts);
this module decodes the requested frames (file mode, in-memory mode, a 12-bit JPEG plugin; plugin errors say what
to install); dicom_display.py turns each decoded frame into the grayscale a viewer shows (modality LUT / rescale ->
VOI LUT or first window -> MONOCHROME1 inversion; colour -> BT.601 luma).

Privacy: only the pixel-module tags, SOP Class, Modality and PatientID are read from the header (other values are
skipped unread); PatientID is hashed with the salt at once and dropped (dicom_header.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom import uid as U
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, iter_pixels
from pydicom.pixels.utils import pixel_array

from medsass.errors import InputError, MissingPluginError

from .dicom_display import frame_view, to_display
from .dicom_header import HEADER_TAGS, header, n_frames, require_pixels, tech_meta, transfer_syntax
from .frame import Frame, Probe, check_size, select_frames

_LIBJPEG = "pylibjpeg-libjpeg (pip install pylibjpeg pylibjpeg-libjpeg)"
_PLUGIN_HINTS = {
    **dict.fromkeys(U.JPEG2000TransferSyntaxes, "pylibjpeg-openjpeg (pip install pylibjpeg pylibjpeg-openjpeg)"),
    **dict.fromkeys((U.HTJ2K, U.HTJ2KLossless, U.HTJ2KLosslessRPCL), "pylibjpeg-openjpeg>=2.4"),
    **dict.fromkeys((U.JPEGBaseline8Bit, U.JPEGExtended12Bit, U.JPEGLossless, U.JPEGLosslessSV1), _LIBJPEG),
    **dict.fromkeys((U.JPEGLSLossless, U.JPEGLSNearLossless), f"{_LIBJPEG} or python-gdcm"),
    U.RLELossless: "pylibjpeg-rle (pip install pylibjpeg pylibjpeg-rle)",
}

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
        full = dcmread(path, force=True, specific_tags=[*HEADER_TAGS, pixel_tag, 0x7FE00001, 0x7FE00002])
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


# --- the reader API (readers/__init__.py) ---------------------------------------------------------
def probe(path: Path, fmt: str = "dicom", *, salt: str = "") -> Probe:
    """Header only (stops before the pixel data)."""
    ds, pixel_tag, group = header(path, salt)
    require_pixels(path, ds, pixel_tag)
    shape = (int(ds.Rows), int(ds.Columns))
    return Probe(format="dicom", n_frames=n_frames(ds), shape=shape, group=group, meta=tech_meta(ds, pixel_tag))


def read(path: Path, fmt: str, frames: Sequence[int] | None, *, max_pixels: int) -> list[Frame]:
    """Decode the requested frames to display grayscale."""
    ds, pixel_tag, _ = header(path, "")
    require_pixels(path, ds, pixel_tag)
    n = n_frames(ds)
    idx = select_frames(path, frames, n)
    if not idx:
        return []
    check_size(path, int(ds.Rows), int(ds.Columns), len(idx), max_pixels)
    ts = transfer_syntax(ds)
    if pixel_tag == 0x7FE00010:
        _check_decoder(path, ts)
    meta = tech_meta(ds, pixel_tag)
    base = {k: meta[k] for k in ("modality", "transfer_syntax", "bits_stored")}
    out = []
    for i, arr in zip(idx, _decode_all(path, ds, ts, pixel_tag, idx, n)):
        pixels, info, levels = to_display(arr, frame_view(ds, i))
        out.append(Frame(pixels=pixels, index=i, meta={**base, **info}, levels=levels))
    return out
