"""NIfTI reader (nibabel): a 3-D volume is a stack of 2-D frames, one per slice along the slice axis.

Geometry (:class:`Volume`, one home for both directions): the voxel axes are permuted and flipped, never
resampled, to RAS+ (``nibabel.as_closest_canonical``'s ``io_orientation``), then the volume is cut along
``slice_axis`` (``axial``: S, ``coronal``: A, ``sagittal``: R). Each slice is shown as a viewer shows it,
like a DICOM slice of the same anatomy: axial rows run anterior -> posterior and columns the patient's
right -> left; coronal rows superior -> inferior, columns right -> left; sagittal rows superior -> inferior,
columns anterior -> posterior. Frame ``k`` is canonical slice ``k`` (axial: from inferior up).
:meth:`Volume.to_source` undoes all of it, so predicted slices go back into the source's own voxel grid.

Values: nibabel's scaled values (``scl_slope``/``scl_inter``), float32 when scaled, else the stored dtype.
With ``window`` (pipeline/window.py) every slice becomes uint8 through one window for the whole volume, and
the frame says which source values map to 0 and 255. 2-D files are one slice; 4-D and higher files are
refused unless the axes after the third have length 1 (split them: ``nibabel.funcs.four_to_three``).

Labels: a label volume is cut by the same code along the same axis; :func:`grid_mismatch` says when its voxel grid
(RAS+ shape and affine) is not the image's, so a label drawn on another grid is refused, never cut into wrong slices.

QC: a slice with less than ``NO_BODY_FRACTION`` of its pixels above the volume's Otsu level (air vs body,
computed once per volume) gets the flag ``no_body``.

Privacy: of the header only dimensions, data type, scaling, intent code, voxel sizes and the affine are
used; ``descrip``, ``db_name``, ``aux_file``, ``intent_name`` and header extensions never reach a frame.
"""
from __future__ import annotations

import gzip
import itertools
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from nibabel.nifti1 import Nifti1Header
from nibabel.nifti2 import Nifti2Header
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from skimage.filters import threshold_otsu

from medsass.errors import InputError, SkipInput

from ..window import Window, apply_window, parse_window, volume_sample
from .frame import Frame, Probe, check_size, select_frames

SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # canonical (RAS+) axis each name cuts across
DEFAULT_SLICE_AXIS = "axial"
NO_BODY_FRACTION = 0.02  # flag a slice with less of its area above the volume's air/body level
NO_BODY = "no_body"
# two volumes share a voxel grid when no voxel centre of one lies further than this (in voxels of the image's smallest
# spacing) from the same voxel of the other: far above float32 header round-off (~1e-5 mm), far below a misplaced label
GRID_TOLERANCE = 0.01
_RAS = axcodes2ornt("RAS")
_CIFTI_INTENTS = range(3000, 3100)  # NIFTI_INTENT_CONNECTIVITY_*: CIFTI-2 surface / connectivity data


@dataclass(frozen=True, eq=False)
class Volume:
    """Where the frames of one NIfTI file come from, and how to put slices back (see the module's doc)."""

    shape: tuple[int, ...]  # the source's data shape as stored (trailing axes of length 1 included)
    affine: np.ndarray  # 4x4 voxel -> mm (RAS+): nibabel's best affine (sform, else qform, else voxel sizes)
    ornt: np.ndarray  # nibabel io_orientation: source voxel axis i -> canonical axis ornt[i, 0], flipped if -1
    slice_axis: str

    @classmethod
    def from_header(cls, path: Path, header, slice_axis: str | None = None) -> Volume:
        axis = slice_axis or DEFAULT_SLICE_AXIS
        if axis not in SLICE_AXES:
            raise ValueError(f"slice axis {axis!r}: choose one of {', '.join(SLICE_AXES)}")
        shape = tuple(int(n) for n in header.get_data_shape())
        if len(shape) > 3 and any(n != 1 for n in shape[3:]):
            extra = int(np.prod(shape[3:]))
            raise InputError(
                path, "volume_4d",
                f"a {len(shape)}-D NIfTI of shape {'x'.join(map(str, shape))} ({extra} volumes); medsass reads 3-D volumes: "
                "split it into 3-D files first (nibabel.funcs.four_to_three, or fslsplit) and give those",
            )
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
        if not np.isfinite(affine).all():
            raise InputError(path, "bad_affine", "the header's affine (voxel -> mm) has NaN/inf values; fix its sform/qform")
        ornt = io_orientation(affine)
        if np.isnan(ornt).any():
            raise InputError(
                path, "bad_affine",
                "the header's affine (voxel -> mm) is degenerate (a voxel axis has no direction); fix its sform/qform "
                "or pixdim so the volume can be oriented",
            )
        return cls(shape=shape, affine=affine, ornt=ornt, slice_axis=axis)

    @classmethod
    def from_columns(cls, columns: dict, slice_axis: str | None = None) -> Volume:
        """The volume a manifest row's (or a frame's) volume columns describe: ``volume_shape``, ``volume_affine``."""
        affine = np.asarray(columns["volume_affine"], dtype=np.float64).reshape(4, 4)
        return cls(shape=tuple(int(n) for n in columns["volume_shape"]), affine=affine, ornt=io_orientation(affine),
                   slice_axis=slice_axis or columns.get("slice_axis") or DEFAULT_SLICE_AXIS)

    @property
    def shape3(self) -> tuple[int, int, int]:
        """The first three axes of the source (a 2-D file is one slice deep)."""
        return (tuple(self.shape[:3]) + (1, 1, 1))[:3]  # type: ignore[return-value]

    @property
    def axis(self) -> int:
        return SLICE_AXES[self.slice_axis]

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        out = [0, 0, 0]
        for n, (ax, _) in zip(self.shape3, self.ornt):
            out[int(ax)] = n
        return tuple(out)  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        return self.canonical_shape[self.axis]

    @property
    def in_plane(self) -> tuple[int, int]:
        """The canonical axes of a slice, in order: displayed rows run along the second, columns along the first."""
        p, q = (a for a in range(3) if a != self.axis)
        return p, q

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(H, W) of a displayed slice."""
        p, q = self.in_plane
        return self.canonical_shape[q], self.canonical_shape[p]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """mm between displayed rows, displayed columns and slices."""
        zooms = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        canon = [0.0, 0.0, 0.0]
        for z, (ax, _) in zip(zooms, self.ornt):
            canon[int(ax)] = float(z)
        p, q = self.in_plane
        return canon[q], canon[p], canon[self.axis]

    @property
    def canonical_affine(self) -> np.ndarray:
        """voxel -> mm of the RAS+ array (what ``nibabel.as_closest_canonical`` gives the reoriented image)."""
        return self.affine @ inv_ornt_aff(self.ornt, self.shape3)

    def canonical(self, data: np.ndarray) -> np.ndarray:
        """The source array (source shape) as RAS+ (a view: flips and a transpose)."""
        return apply_orientation(data.reshape(self.shape3, order="A"), self.ornt)

    def display(self, canonical: np.ndarray, k: int) -> np.ndarray:
        """Canonical slice ``k`` as displayed (a view)."""
        index = (slice(None),) * self.axis + (k,)  # basic indexing: a view (np.take would copy the whole volume)
        return canonical[index][::-1, ::-1].T

    def to_source(self, slices: Sequence[np.ndarray], dtype=np.uint8) -> np.ndarray:
        """Displayed slices (one per frame, in frame order) back into an array of the source's shape and voxel order."""
        if len(slices) != self.n_slices:
            raise ValueError(f"{len(slices)} slice(s) given for a volume of {self.n_slices}")
        canon = np.zeros(self.canonical_shape, dtype)
        along = np.moveaxis(canon, self.axis, 0)
        for k, s in enumerate(slices):
            if s.shape != self.slice_shape:
                raise ValueError(f"slice {k} is {s.shape}, the volume's slices are {self.slice_shape}")
            along[k] = s.T[::-1, ::-1]
        return np.ascontiguousarray(apply_orientation(canon, ornt_transform(_RAS, self.ornt))).reshape(self.shape)

    def columns(self) -> dict:
        """The manifest's volume columns (medsass.manifest.VOLUME_COLUMNS) of a frame of this volume."""
        return {"slice_axis": self.slice_axis, "volume_shape": list(self.shape),
                "volume_affine": [float(v) for v in self.affine.ravel()], "spacing": list(self.spacing)}


def grid_mismatch(label: Volume, image: Volume) -> str:
    """'' when ``label`` lies on ``image``'s voxel grid after both are reoriented to RAS+ (the same canonical shape,
    and every voxel centre within ``GRID_TOLERANCE`` voxel of the image's), else a sentence saying what differs. A
    label stored in another voxel order with the matching affine is on the grid: it is reoriented like the image."""
    shape = image.canonical_shape
    if label.canonical_shape != shape:
        return (f"label volume's shape differs from the image's: {'x'.join(map(str, label.canonical_shape))} vs "
                f"{'x'.join(map(str, shape))} voxels in RAS+ order. Resample the label onto the image's grid")
    corners = np.array([[*c, 1.0] for c in itertools.product(*((0, n - 1) for n in shape))]).T
    gap = float(np.linalg.norm(((label.canonical_affine - image.canonical_affine) @ corners)[:3], axis=0).max())
    tolerance = GRID_TOLERANCE * min(image.spacing)
    if gap <= tolerance:
        return ""
    return (f"label volume's affine differs from the image's: voxels up to {gap:.3g} mm apart (tolerance {tolerance:.2g} mm, {GRID_TOLERANCE:g} voxel); {_grid(label)} vs "
            f"the image's {_grid(image)}. Resample the label onto the image's grid (or fix its header)")


def _grid(v: Volume) -> str:
    a = v.canonical_affine
    zooms = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    return f"RAS+ origin ({', '.join(f'{x:.4g}' for x in a[:3, 3])}) mm, voxels {'x'.join(f'{x:.4g}' for x in zooms)} mm"


# --- the file -------------------------------------------------------------------------------------
def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


@contextmanager
def _opened(path: Path) -> Iterator[BinaryIO]:
    """The file's bytes, decompressed when its content is gzip (whatever its name says)."""
    fobj: BinaryIO = gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")  # type: ignore[assignment]
    try:
        yield fobj
    finally:
        fobj.close()


def _header(path: Path, fobj: BinaryIO):
    """The NIfTI-1 or NIfTI-2 header (by ``sizeof_hdr``), checked; raises InputError / SkipInput."""
    head = fobj.read(4)
    fobj.seek(0)
    if len(head) < 4:
        raise InputError(path, "truncated", "the file ends inside the NIfTI header")
    sizes = {struct.unpack("<i", head)[0], struct.unpack(">i", head)[0]}
    klass = Nifti2Header if 540 in sizes else Nifti1Header
    try:
        header = klass.from_fileobj(fobj, check=True)
    except (EOFError, ValueError, OSError) as exc:  # nibabel's HeaderDataError is a ValueError
        code = "truncated" if isinstance(exc, EOFError) or "bytes" in str(exc) else "decode_error"
        raise InputError(path, code, f"cannot read the NIfTI header: {type(exc).__name__}: {exc}") from exc
    if int(header["intent_code"]) in _CIFTI_INTENTS:
        raise SkipInput(path, "non_image", "CIFTI-2 file (surface / connectivity data), not a volume; skipped")
    dtype = header.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "uif":
        raise InputError(path, "unsupported_format",
                         f"NIfTI data type {dtype} (colour or complex voxels) is not read; convert the volume to one gray value per voxel")
    return header


def probe(path: Path, fmt: str = "nifti", *, salt: str = "", slice_axis: str | None = None) -> Probe:
    """Header only: slices along the slice axis, the displayed slice shape."""
    with _opened(path) as fobj:
        header = _header(path, fobj)
    vol = Volume.from_header(path, header, slice_axis)
    meta = {"dtype": header.get_data_dtype().newbyteorder("=").name, "slice_axis": vol.slice_axis,
            "volume_shape": list(vol.shape)}
    return Probe(format="nifti", n_frames=vol.n_slices, shape=vol.slice_shape, group=None, meta=meta)


def read(path: Path, fmt: str, frames: Sequence[int] | None, *, max_pixels: int, slice_axis: str | None = None,
         window: str | Window | None = None) -> list[Frame]:
    """Decode the requested slices (the whole volume is read: one pass over a compressed file)."""
    win = parse_window(window) if isinstance(window, str) or window is None else window
    with _opened(path) as fobj:
        header = _header(path, fobj)
        vol = Volume.from_header(path, header, slice_axis)
        idx = select_frames(path, frames, vol.n_slices)
        if not idx:
            return []
        h, w = vol.slice_shape
        check_size(path, h, w, vol.n_slices, max_pixels)
        try:
            raw = header.raw_data_from_fileobj(fobj)  # a memory map for uncompressed files
        except (EOFError, OSError, ValueError) as exc:
            raise InputError(path, "truncated", f"the voxel data end early: {type(exc).__name__}: {exc}") from exc
    slope, inter = header.get_slope_inter()
    scale = None if slope is None or (slope == 1 and not inter) else (float(slope), float(inter or 0.0))
    sample = volume_sample(raw)
    if scale is not None:
        sample = sample * scale[0] + scale[1]
    body = _body_level(sample)
    low, high = win.bounds(sample) if win is not None else (0.0, 0.0)
    canon = vol.canonical(raw)
    columns = vol.columns()
    if win is not None:
        columns.update(intensity_low=low, intensity_high=high)
    orig_dtype = header.get_data_dtype().newbyteorder("=").name
    out = []
    for k in idx:
        px = vol.display(canon, k)
        if scale is not None:
            px = px.astype(np.float32) * np.float32(scale[0]) + np.float32(scale[1])
        else:
            px = np.ascontiguousarray(px)
        if px.dtype.kind == "f" and not np.isfinite(px).all():
            bad = int(px.size - np.count_nonzero(np.isfinite(px)))
            raise InputError(path, "nonfinite", f"slice {k} has {bad} NaN/inf value(s) of {px.size}; fix or mask them in the source")
        flags = (NO_BODY,) if np.count_nonzero(px > body) < NO_BODY_FRACTION * px.size else ()
        if win is not None:
            px = apply_window(px, low, high)
        meta = {"orig_dtype": orig_dtype, "channels": 1, "columns": dict(columns), "qc_flags": flags}
        out.append(Frame(pixels=px, index=k, meta=meta))
    return out


def _body_level(sample: np.ndarray) -> float:
    """The volume's Otsu level (air vs body), from a sample of its values; a constant volume has no body."""
    if sample.size == 0 or sample.min() == sample.max():
        return float("inf")
    return float(threshold_otsu(sample.astype(np.float64, copy=False)))


def volume_of(path: Path, slice_axis: str | None = None) -> Volume:
    """The :class:`Volume` of a NIfTI file (header only): predict puts its slices back with it."""
    with _opened(Path(path)) as fobj:
        header = _header(Path(path), fobj)
    return Volume.from_header(Path(path), header, slice_axis)


def header_of(path: Path):
    """The file's NIfTI header (for the codes a label volume written beside it copies; never its text fields)."""
    with _opened(Path(path)) as fobj:
        return _header(Path(path), fobj)


__all__ = ["DEFAULT_SLICE_AXIS", "GRID_TOLERANCE", "NO_BODY", "NO_BODY_FRACTION", "SLICE_AXES", "Volume", "grid_mismatch",
           "header_of", "probe", "read", "volume_of"]
