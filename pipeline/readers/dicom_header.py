"""DICOM header, read up to the pixel data and no further (the DICOM reader's probe, :mod:`.dicom`).

Privacy: only the pixel-module tags below, SOP Class, Modality and PatientID are read from the header (other values
are skipped unread); PatientID is hashed with the salt at once and dropped. What reaches the manifest
(:func:`tech_meta`) is technical facts in code form only: nothing free-text from the header.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pydicom import uid as U
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial

from medsass.errors import InputError, SkipInput

_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # PixelData, FloatPixelData, DoubleFloatPixelData
PIXEL_KEYWORDS = (
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "RescaleIntercept", "RescaleSlope",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "ModalityLUTSequence", "VOILUTSequence",
    *(f"{c}PaletteColorLookupTable{p}" for c in ("Red", "Green", "Blue", "Alpha") for p in ("Descriptor", "Data")),
    *(f"Segmented{c}PaletteColorLookupTableData" for c in ("Red", "Green", "Blue", "Alpha")),
)
HEADER_TAGS = [tag_for_keyword(k) for k in (
    "SOPClassUID", "Modality", "PatientID", *PIXEL_KEYWORDS,
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
)]
# Objects whose pixel data are not a picture of anatomy: pseudo-masks of them would be noise.
_NON_IMAGE = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation holds label masks, not an image",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation holds label masks, not an image",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose holds a dose grid, not an image",
}
CS = re.compile(r"[A-Z0-9_ ]{1,16}")  # code strings we let into meta
_UID = re.compile(r"[0-9.]{1,64}")
def header(path: Path, salt: str) -> tuple[Dataset, int | None, str | None]:
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
            ds = read_partial(f, stop_when=at_pixels, force=force, specific_tags=HEADER_TAGS)
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


def require_pixels(path: Path, ds: Dataset, pixel_tag: int | None) -> None:
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


def transfer_syntax(ds: Dataset) -> U.UID:
    """File meta transfer syntax, or the encoding pydicom guessed for files without meta."""
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts:
        return U.UID(ts)
    implicit, little = ds.original_encoding[:2]
    if not little:
        return U.ExplicitVRBigEndian
    return U.ImplicitVRLittleEndian if implicit else U.ExplicitVRLittleEndian


def n_frames(ds: Dataset) -> int:
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


def clean(value, pattern: re.Pattern) -> str | None:
    text = str(value).strip().upper() if value is not None else ""
    return text if pattern.fullmatch(text) else None


def tech_meta(ds: Dataset, pixel_tag: int) -> dict:
    """JSON-safe technical facts only: nothing free-text from the header."""
    sop = _sop_class(ds)
    return {
        "modality": clean(ds.get("Modality"), CS),
        "photometric": clean(ds.get("PhotometricInterpretation"), CS) or "MONOCHROME2",
        "transfer_syntax": clean(transfer_syntax(ds), _UID),
        "sop_class": U.UID(sop).name if sop and U.UID(sop).name != sop else None,  # dictionary names only
        "bits_stored": int(ds.get("BitsStored") or 0) or None,
        "samples_per_pixel": int(ds.get("SamplesPerPixel") or 1),
        "dtype": _dtype(ds, pixel_tag),
    }
