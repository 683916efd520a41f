"""Format registry and the public reader API: ``probe`` (header only) and ``read`` (decode frames).

Every reader module (dicom, tiff, pillow) has the same two functions::

    probe(path, fmt, *, salt) -> Probe
    read(path, fmt, frames, *, max_pixels) -> list[Frame]

so a new format is one new module plus one entry in ``READERS``. Readers guard size *before*
decoding (``check_size``, in :mod:`.frame` with ``Frame`` and ``Probe``); this module adds the checks
every format shares after decoding (2-D, finite values).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from medsass.errors import InputError

from . import dicom, pillow, tiff
from .frame import DEFAULT_MAX_PIXELS, Frame, Probe, check_size, select_frames

IN_MEMORY_FORMATS = ("png", "jpeg", "gif", "bmp")  # readers that accept the file's bytes


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
}


def _reader(path: Path, fmt: str) -> ModuleType:
    try:
        return READERS[fmt]
    except KeyError:
        raise InputError(
            path, "unsupported_format", f"no reader for format {fmt!r}; available: {sorted(READERS)}"
        ) from None


def probe(path: Path, fmt: str, *, salt: str = "") -> Probe:
    """Header only: frame count, frame-0 shape, group key. Raises SkipInput / InputError."""
    path = Path(path)
    reader = _reader(path, fmt)
    try:
        return reader.probe(path, fmt, salt=salt)
    except InputError:
        raise
    except Exception as exc:  # any library error on a bad file is that file's problem
        raise InputError(path, "decode_error", f"cannot read header: {type(exc).__name__}: {exc}") from exc


def read(
    path: Path, fmt: str, frames: Sequence[int] | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
    data: bytes | None = None,
) -> list[Frame]:
    """Decode the requested frames (None = all) as 2-D grayscale Frames; see module docstring.

    ``data``: the file's bytes when the caller already read them (saves a second read for small
    single-image formats; readers that stream large files ignore it)."""
    path = Path(path)
    reader = _reader(path, fmt)
    try:
        if data is not None and fmt in IN_MEMORY_FORMATS:
            out = reader.read(path, fmt, frames, max_pixels=max_pixels, data=data)
        else:
            out = reader.read(path, fmt, frames, max_pixels=max_pixels)
    except InputError:
        raise
    except MemoryError as exc:
        raise InputError(path, "too_large", "ran out of memory while decoding; lower max_pixels") from exc
    except Exception as exc:
        raise InputError(path, "decode_error", f"{type(exc).__name__}: {exc}") from exc
    return [check_frame(path, f) for f in out]


__all__ = ["DEFAULT_MAX_PIXELS", "READERS", "Frame", "Probe", "check_size", "probe", "read", "select_frames"]
