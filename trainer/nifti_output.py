"""Predictions of a NIfTI input as NIfTI volumes in the input's own voxel grid (``medsass-train predict``).

The predicted slices (one per frame, as prep's NIfTI reader shows them) are put back with the reader's own
geometry (:meth:`medsass.pipeline.readers.nifti.Volume.to_source`: the inverse of its RAS+ reorientation and
display flips), so the output has the source's shape, voxel order and affine and lies on it in any viewer:

* a label volume: uint8 {0, 1}, intent ``label``;
* a probability volume (``--probabilities``): float32 in [0, 1].

The header is a new one: the source's qform/sform (matrices and codes), voxel sizes and units are copied,
nothing else (its ``descrip``, ``db_name``, ``aux_file``, ``intent_name`` and extensions may name a patient).
Files are written gzip-compressed (``.nii.gz``, fixed gzip time stamp) and atomically.
"""
from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from medsass.pipeline.readers.nifti import header_of, volume_of
from nibabel.nifti1 import Nifti1Image
from nibabel.nifti2 import Nifti2Header, Nifti2Image

from medsass.manifest import atomic_write_bytes

SUFFIX = ".nii.gz"
DESCRIPTION = b"medsass-train predict"


def write_volume(source: str | Path, slice_axis: str, slices: Sequence[np.ndarray], path: str | Path, *,
                 kind: str = "label") -> Path:
    """Write ``slices`` (displayed orientation, one per frame of ``source`` cut across ``slice_axis``) as a NIfTI volume
    aligned with ``source``. ``kind``: ``label`` (any nonzero -> 1, uint8) or ``probability`` (float32)."""
    if kind not in ("label", "probability"):
        raise ValueError(f"kind {kind!r}: choose label or probability")
    src = header_of(Path(source))
    vol = volume_of(Path(source), slice_axis)
    if kind == "label":
        data = vol.to_source([np.asarray(s) != 0 for s in slices], dtype=np.uint8)
    else:
        data = vol.to_source([np.asarray(s, np.float32) for s in slices], dtype=np.float32)
    klass = Nifti2Image if isinstance(src, Nifti2Header) else Nifti1Image
    img = klass(data, vol.affine)
    hdr = img.header
    qcode, scode = int(src["qform_code"]), int(src["sform_code"])
    if qcode or scode:  # else: no orientation in the source either; the new header's sform holds its voxel-size affine
        img.set_qform(src.get_qform(), code=qcode)
        img.set_sform(src.get_sform(), code=scode)
    hdr.set_zooms(tuple(src.get_zooms())[: data.ndim])
    hdr.set_xyzt_units(*src.get_xyzt_units())
    hdr.set_data_dtype(data.dtype)
    hdr["descrip"] = DESCRIPTION
    if kind == "label":
        hdr.set_intent("label")
        hdr["cal_min"], hdr["cal_max"] = 0, 1
    path = Path(path)
    atomic_write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
    return path


__all__ = ["SUFFIX", "write_volume"]
