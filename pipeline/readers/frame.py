"""What every reader returns (:class:`Frame`, :class:`Probe`) and the checks every reader runs before decoding."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsass.errors import InputError

from ..levels import Levels

DEFAULT_MAX_PIXELS = 2**28


@dataclass
class Frame:
    """One decoded 2-D grayscale plane at native resolution and precision.

    ``pixels`` is (H, W) after DICOM modality LUT -> VOI LUT/window -> MONOCHROME1 inversion and
    colour -> luma; not resized, not rescaled to uint8 (bilevel images are uint8 {0, 255}). It may be
    a read-only view of the decoded buffer: copy it before changing it in place. ``meta`` is JSON-safe and free of header text.
    ``levels``, when a reader sets it, is the same image as integer codes into a table of display values
    (``pixels == levels.values[levels.codes]``, e.g. a DICOM frame's stored values and its LUTs): prep histograms
    and maps the codes instead of the pixels.
    """

    pixels: np.ndarray
    index: int
    meta: dict = field(default_factory=dict)
    levels: Levels | None = None


@dataclass
class Probe:
    """Header facts: format, frame count, (H, W) of frame 0, PHI-free group key, technical meta."""

    format: str
    n_frames: int
    shape: tuple[int, int]
    group: str | None
    meta: dict = field(default_factory=dict)


def check_size(path: Path, height: int, width: int, n_frames: int, max_pixels: int) -> None:
    """Raise too_small / too_large from header dimensions, before anything is decoded."""
    if height < 2 or width < 2:
        raise InputError(path, "too_small", f"image is {height}x{width} pixels; at least 2x2 is needed")
    total = int(height) * int(width) * int(n_frames)
    if total > max_pixels:
        raise InputError(
            path, "too_large",
            f"{n_frames} frame(s) of {height}x{width} = {total} pixels exceed max_pixels={max_pixels} "
            "(decompression-bomb guard); raise max_pixels or request fewer frames",
        )


def select_frames(path: Path, frames: Sequence[int] | None, n_frames: int) -> list[int]:
    """Requested frame indices (None = all), validated against the file's frame count."""
    if frames is None:
        return list(range(n_frames))
    wanted = [int(i) for i in frames]
    bad = [i for i in wanted if not 0 <= i < n_frames]
    if bad:
        raise InputError(path, "bad_frame_index", f"frame(s) {bad} requested but the file has {n_frames}")
    return wanted
