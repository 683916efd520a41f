"""Format registry and the public reader API: ``probe`` (header only) and ``read`` (decode frames).

Every reader module (dicom, tiff, pillow) has the same two functions::

    probe(path, fmt, *, salt) -> Probe
    read(path, fmt, frames, *, max_pixels) -> list[Frame]

so a new format is one new module plus one entry in ``READERS``. Readers guard size *before*
decoding (``check_size``, in :mod:`.frame` with ``Frame`` and ``Probe``); this module adds the checks
every format shares after decoding (2-D, finite values).

Volume formats (``VOLUME_FORMATS``: NIfTI) also take ``slice_axis`` (probe and read) and ``window`` (read); the
other readers never see them. A frame may carry facts for its manifest row (``meta['columns']``, e.g. the
volume's geometry) and QC flags of its own (``meta['qc_flags']``, e.g. ``no_body``): :func:`add_reader_facts`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from medsass.errors import InputError

from ..methods import is_degenerate
from . import dicom, nifti, pillow, tiff
from .frame import DEFAULT_MAX_PIXELS, Frame, Probe, check_size, select_frames

IN_MEMORY_FORMATS = ("png", "jpeg", "gif", "bmp")  # readers that accept the file's bytes
VOLUME_FORMATS = ("nifti",)  # readers that cut a volume into slices: they take slice_axis and window


def check_frame(path: Path, frame: Frame) -> Frame:
    """Shared post-decode fixes and checks: native byte order, bool -> uint8 {0, 255}, 2-D, at least
    2x2, no NaN/inf in float images."""
    px = frame.pixels
    if not px.dtype.isnative:
        px = frame.pixels = px.astype(px.dtype.newbyteorder("="))
    if px.dtype == bool:  # bilevel: uint8 {0, 255} from every format, as Pillow shows mode '1'
        px = frame.pixels = px.view(np.uint8) * np.uint8(255)
    if px.ndim != 2:
        raise InputError(path, "decode_error", f"frame {frame.index} decoded to shape {px.shape}, not 2-D")
    if px.shape[0] < 2 or px.shape[1] < 2:
        raise InputError(path, "too_small", f"image is {px.shape[0]}x{px.shape[1]} pixels; at least 2x2 is needed")
    if px.dtype.kind in "fc" and not np.isfinite(px).all():
        count = int(px.size - np.count_nonzero(np.isfinite(px)))
        raise InputError(
            path, "nonfinite",
            f"frame {frame.index} has {count} NaN/inf value(s) of {px.size}; fix or mask them in the source",
        )
    return frame


READERS: dict[str, ModuleType] = {
    "dicom": dicom,
    "tiff": tiff,
    "png": pillow,
    "jpeg": pillow,
    "gif": pillow,
    "bmp": pillow,
    "nifti": nifti,
}


def _reader(path: Path, fmt: str) -> ModuleType:
    try:
        return READERS[fmt]
    except KeyError:
        raise InputError(
            path, "unsupported_format", f"no reader for format {fmt!r}; available: {sorted(READERS)}"
        ) from None


def probe(path: Path, fmt: str, *, salt: str = "", slice_axis: str | None = None) -> Probe:
    """Header only: frame count, frame-0 shape, group key. Raises SkipInput / InputError. ``slice_axis``: how a
    volume is cut into frames (None: axial; other formats ignore it)."""
    path = Path(path)
    reader = _reader(path, fmt)
    volume = {"slice_axis": slice_axis} if fmt in VOLUME_FORMATS else {}
    try:
        return reader.probe(path, fmt, salt=salt, **volume)
    except InputError:
        raise
    except Exception as exc:  # any library error on a bad file is that file's problem
        raise InputError(path, "decode_error", f"cannot read header: {type(exc).__name__}: {exc}") from exc


def read(
    path: Path, fmt: str, frames: Sequence[int] | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
    data: bytes | None = None, slice_axis: str | None = None, window: str | None = None,
) -> list[Frame]:
    """Decode the requested frames (None = all) as 2-D grayscale Frames; see module docstring.

    ``data``: the file's bytes when the caller already read them (saves a second read for small
    single-image formats; readers that stream large files ignore it). ``slice_axis`` and ``window``
    (``--window``, pipeline/window.py): how a volume becomes frames; other formats ignore them."""
    path = Path(path)
    reader = _reader(path, fmt)
    try:
        if data is not None and fmt in IN_MEMORY_FORMATS:
            out = reader.read(path, fmt, frames, max_pixels=max_pixels, data=data)
        elif fmt in VOLUME_FORMATS:
            out = reader.read(path, fmt, frames, max_pixels=max_pixels, slice_axis=slice_axis, window=window)
        else:
            out = reader.read(path, fmt, frames, max_pixels=max_pixels)
    except InputError:
        raise
    except MemoryError as exc:
        raise InputError(path, "too_large", "ran out of memory while decoding; lower max_pixels") from exc
    except Exception as exc:
        raise InputError(path, "decode_error", f"{type(exc).__name__}: {exc}") from exc
    return [check_frame(path, f) for f in out]


def add_reader_facts(row: dict, frame: Frame) -> dict:
    """``row`` (a manifest row of ``frame``) with the reader's own facts: its columns (``meta['columns']``: a volume's
    geometry, a window's source range as ``intensity_low`` / ``intensity_high``) and its QC flags
    (``meta['qc_flags']``), which count like prep's own (``degenerate``). Frames of other readers change nothing."""
    row.update(frame.meta.get("columns", {}))
    extra = list(frame.meta.get("qc_flags", ()))
    if extra:
        flags = [f for f in str(row.get("qc_flags", "")).split(",") if f]
        flags += [f for f in extra if f not in flags]
        row["qc_flags"], row["degenerate"] = ",".join(flags), is_degenerate(flags)
    return row


__all__ = ["DEFAULT_MAX_PIXELS", "READERS", "VOLUME_FORMATS", "Frame", "Probe", "add_reader_facts", "check_size", "probe",
           "read", "select_frames"]
