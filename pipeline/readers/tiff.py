"""TIFF reader (tifffile; imagecodecs decodes LZW/deflate/zstd/JPEG...).

Frames are the 2-D planes of the file's image series, in series then page order: a multi-page
stack, an ImageJ hyperstack or an OME (T, C, Z, Y, X) image gives one frame per plane. Colour
samples (RGB/YCbCr with 3-4 samples, gray+alpha, palette, CMYK) are not frames: they become one
luma plane. Other multi-sample pages (e.g. 2-channel MINISBLACK) give one frame per sample.
Pyramid levels (tifffile series levels), reduced-resolution pages and thumbnail/label/macro
series are skipped. MINISWHITE is inverted so that high values are bright.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tifffile import PHOTOMETRIC, TiffFile, TiffFileError, TiffPage, TiffPageSeries

from medsass.errors import InputError, MissingPluginError

from ..gray import to_gray
from .frame import Frame, Probe, check_size, select_frames

_SKIP_SERIES = {"thumbnail", "label", "macro", "overview"}
_ALPHA = {1, 2}  # EXTRASAMPLE.ASSOCALPHA, UNASSALPHA


def _open(path: Path) -> TiffFile:
    try:
        return TiffFile(path)
    except (TiffFileError, ValueError, OSError, EOFError) as exc:
        if path.stat().st_size == 0:
            raise InputError(path, "empty_file", "file is empty (0 bytes)") from exc
        raise InputError(path, "decode_error", f"cannot parse the TIFF structure: {exc}") from exc


def _colour(page: TiffPage) -> str | None:
    """Colour layout of a page's samples ('rgb', 'rgba', 'la', 'palette', 'cmyk'), or None (gray)."""
    spp, photo = page.samplesperpixel, page.photometric
    alpha = bool(page.extrasamples) and page.extrasamples[0] in _ALPHA
    if photo in (PHOTOMETRIC.RGB, PHOTOMETRIC.YCBCR) and spp >= 3:
        return "rgba" if spp == 4 and alpha else "rgb"
    if photo == PHOTOMETRIC.SEPARATED and spp == 4:
        return "cmyk"
    if photo == PHOTOMETRIC.PALETTE and page.colormap is not None and spp == 1:
        return "palette"
    if spp == 2 and alpha:
        return "la"
    return None


def _main_series(tif: TiffFile) -> list[TiffPageSeries]:
    """Image series, without thumbnails/labels/macros and reduced-resolution-only series."""
    out = []
    for s in tif.series:
        if s.name.lower() in _SKIP_SERIES or str(s.kind).lower() in _SKIP_SERIES:
            continue
        if s.keyframe is None or getattr(s.keyframe, "is_reduced", False):
            continue
        out.append(s)
    return out


def _plane_axes(axes: str, shape: tuple[int, ...], colour: bool) -> int:
    """Number of 2-D planes in an array with these axes (Y, X and colour S are not planes)."""
    keep = {"Y", "X"} | ({"S"} if colour else set())
    return math.prod(n for a, n in zip(axes, shape) if a not in keep)


def _planes(series: list[TiffPageSeries]) -> list[tuple[int, int, int]]:
    """(series index, page index or -1 for whole-series decoding, plane index) per frame."""
    out = []
    for si, s in enumerate(series):
        key = s.keyframe
        colour = _colour(key) is not None
        per_page = _plane_axes(key.axes, key.shape, colour)
        total = _plane_axes(s.axes, s.shape, colour)
        pages = s.pages
        if per_page * len(pages) == total and all(p is not None for p in pages):
            out.extend((si, pi, k) for pi in range(len(pages)) for k in range(per_page))
        else:  # e.g. an ImageJ stack in one IFD: decode the series and index it
            out.extend((si, -1, k) for k in range(total))
    return out


def _to_planes(arr: np.ndarray, axes: str, colour: bool) -> np.ndarray:
    """(N, H, W[, S]) view of a page or series array; non-colour samples count as planes."""
    has_s = "S" in axes
    lead = [a for a in axes if a not in "YXS"] + (["S"] if has_s and not colour else [])
    tail = ["Y", "X"] + (["S"] if has_s and colour else [])
    arr = np.transpose(arr, [axes.index(a) for a in lead + tail])
    return arr.reshape((-1, *arr.shape[len(lead):]))


def _display(plane: np.ndarray, page: TiffPage, colour: str | None) -> tuple[np.ndarray, bool]:
    """One plane to 2-D display values; True when MINISWHITE was inverted."""
    if colour == "palette":
        lut = page.colormap  # (3, 2**bits) uint16
        if np.array_equal(lut[0], lut[1]) and np.array_equal(lut[0], lut[2]):
            return lut[0][plane], False
        return to_gray(np.moveaxis(lut[:, plane], 0, -1), mode="rgb"), False
    if colour == "cmyk":
        top = np.iinfo(plane.dtype).max if plane.dtype.kind in "ui" else 1.0
        ink = np.subtract(top, plane, dtype=np.float32) / np.float32(top)
        rgb = ink[..., :3] * ink[..., 3:4] * np.float32(top)
        return to_gray(rgb, mode="rgb"), False
    if colour:
        return to_gray(plane[..., : {"rgb": 3, "rgba": 4, "la": 2}[colour]], mode=colour), False
    if page.photometric == PHOTOMETRIC.MINISWHITE:  # lo + hi - x (integer wrap-around cancels out)
        if plane.dtype == bool:
            return ~plane, True
        if plane.dtype.kind == "u":
            lo, hi = 0, min(2 ** int(page.bitspersample) - 1, np.iinfo(plane.dtype).max)
        else:
            lo, hi = plane.min().item(), plane.max().item()
        return np.asarray(lo + hi).astype(plane.dtype) - plane, True
    return plane, False


def _check_complete(path: Path, page: TiffPage, size: int) -> None:
    """Truncated file: a strip/tile points past the end of the file."""
    ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
    if ends and max(ends) > size:
        raise InputError(path, "truncated", f"image data runs {max(ends) - size} bytes past the end of the file")


def _decode_error(path: Path, exc: Exception, page: TiffPage) -> InputError:
    text = str(exc)
    if "imagecodecs" in text:
        return MissingPluginError(path, f"install imagecodecs to decode TIFF compression {page.compression.name} ({text})")
    if "not supported" in text or "not implemented" in text:
        return InputError(path, "unsupported_format", f"TIFF compression {page.compression.name}: {text}")
    return InputError(path, "decode_error", f"{type(exc).__name__}: {text}")


def probe(path: Path, fmt: str = "tiff", *, salt: str = "") -> Probe:
    """Header only: page structure and tags, no pixel data."""
    with _open(path) as tif:
        series = _main_series(tif)
        if not series:
            raise InputError(path, "decode_error", "TIFF has no image series")
        key = series[0].keyframe
        meta = {
            "dtype": key.dtype.name, "photometric": key.photometric.name, "compression": key.compression.name,
            "samples_per_pixel": int(key.samplesperpixel), "axes": series[0].axes,
        }
        return Probe(format="tiff", n_frames=len(_planes(series)), shape=(key.imagelength, key.imagewidth),
                     group=None, meta=meta)


def read(path: Path, fmt: str, frames: Sequence[int] | None, *, max_pixels: int) -> list[Frame]:
    """Decode the requested planes; each page is decoded at most once."""
    size = path.stat().st_size
    with _open(path) as tif:
        series = _main_series(tif)
        planes = _planes(series)
        idx = select_frames(path, frames, len(planes))
        if not idx:
            return []
        # size guard before decoding: the largest plane involved; whole-series decoding counts every plane
        key = max((series[planes[i][0]].keyframe for i in idx), key=lambda p: p.imagelength * p.imagewidth)
        whole = any(planes[i][1] < 0 for i in idx)
        check_size(path, key.imagelength, key.imagewidth, len(planes) if whole else len(idx), max_pixels)
        cache: dict[tuple[int, int], np.ndarray] = {}
        out = []
        for i in idx:
            si, pi, k = planes[i]
            s = series[si]
            colour = _colour(s.keyframe)
            if (si, pi) not in cache:
                for p in s.pages if pi < 0 else [s.pages[pi]]:
                    if p is not None:
                        _check_complete(path, p, size)
                try:
                    arr = s.asarray() if pi < 0 else s.pages[pi].asarray()
                except Exception as exc:
                    raise _decode_error(path, exc, s.keyframe) from exc
                axes = s.axes if pi < 0 else s.keyframe.axes
                cache = {(si, pi): _to_planes(arr, axes, colour is not None)}  # keep one page
            pixels, inverted = _display(cache[(si, pi)][k], s.keyframe, colour)
            meta = {"orig_dtype": s.keyframe.dtype.name, "channels": int(s.keyframe.samplesperpixel),
                    "photometric": s.keyframe.photometric.name, "compression": s.keyframe.compression.name,
                    "inverted": inverted}
            out.append(Frame(pixels=pixels, index=i, meta=meta))
        return out
