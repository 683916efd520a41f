"""DICOM SEG output of ``medsass-train predict --format dicom-seg`` (made with highdicom).

Predict writes every mask in the default format first (PNG, or a multi-page TIFF per multi-frame
input); :func:`write_dicom_segs` then turns the masks of DICOM inputs into BINARY DICOM
Segmentation instances that reference their source SOP instances, and removes those PNG/TIFFs:

* the DICOM inputs are grouped by SeriesInstanceUID: one SEG per series, one frame per source
  instance (single-frame CT/MR/DX slices), ordered by InstanceNumber; an input with frames (a
  multi-frame instance) gets a SEG of its own that references it per frame;
* a series highdicom refuses as one SEG (differing image size, orientation or duplicate positions,
  no Frame of Reference with several slices), or that we refuse (differing pixel spacing, a
  multi-frame instance, the same SOP instance twice), is written as one SEG per image
  (``reason_code`` ``seg_per_image`` in predictions.csv, status stays ``ok``);
* an image that cannot have a SEG at all (e.g. no StudyInstanceUID or Frame of Reference) keeps
  its PNG/TIFF mask (``seg_failed``); non-DICOM inputs keep theirs too (``not_dicom``).

A SEG is named after the first input of its series in input order: ``OUT/<rel>_seg.dcm``; every
input it covers points to it in the CSV's ``mask`` column. One segment (label ``foreground`` by
default), algorithm type AUTOMATIC, algorithm "medsass" with its version and the threshold.

Privacy: a SEG copies the patient and study modules of its source (highdicom does; that is how
a PACS files it beside the images). Nothing from file or folder names goes into a SEG, and nothing
from the headers goes into predictions.csv, file names or logs: highdicom's and pydicom's warnings
and log lines (which quote values such as the patient's name) are silenced here, and error
reasons lose quoted values and UIDs before they reach the CSV.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

import highdicom as hd
import numpy as np
import tifffile
from PIL import Image
from pydicom import dcmread, dcmwrite
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from medsass.errors import ConfigError
from medsass.manifest import atomic_write_bytes

SEG_SUFFIX = "_seg.dcm"
TISSUE = Code("85756007", "SCT", "Tissue")
SERIES_NUMBER_OFFSET = 1000  # SEG series number = the source's + 1000 (1000 when it has none)


@dataclass(frozen=True)
class SegmentSpec:
    """The one segment of every SEG: its label and coded category / type (SNOMED CT "Tissue" by default)."""

    label: str = "foreground"
    category: Code = TISSUE
    type: Code = TISSUE

    def __post_init__(self) -> None:
        if not self.label.strip() or len(self.label) > 64 or any(c == "\\" or ord(c) < 32 for c in self.label):
            raise ConfigError(f"--segment-label {self.label!r}: give 1-64 printable characters without a backslash")


def parse_code(text: str, *, option: str) -> Code:
    """``SCHEME:VALUE:MEANING`` (e.g. ``SCT:10200004:Liver``) -> a coded concept."""
    parts = [p.strip() for p in text.split(":", 2)]
    if len(parts) != 3 or not all(parts) or len(parts[0]) > 16 or len(parts[2]) > 64:
        raise ConfigError(f"{option} {text!r}: expected SCHEME:VALUE:MEANING, e.g. SCT:85756007:Tissue "
                          "(scheme up to 16 characters, meaning up to 64)")
    return Code(parts[1], parts[0], parts[2])


@dataclass
class Outcome:
    """One SEG (file bytes) over ``members`` (indices into the series), or ``data=None``: those keep their PNG/TIFF."""

    members: list[int]
    data: bytes | None
    code: str = ""
    reason: str = ""


def medsass_version() -> str:
    try:
        return version("medsass")
    except PackageNotFoundError:
        return "unknown"


def build_segmentation(sources: Sequence[Dataset], masks: Sequence[np.ndarray], spec: SegmentSpec = SegmentSpec(), *,
                       threshold: float | None = None) -> hd.seg.Segmentation:
    """One BINARY DICOM SEG of ``masks`` over ``sources``.

    ``sources``: several single-frame instances of one series or one instance (headers suffice);
    ``masks[i]``: source i's mask at its own pixel grid, (rows, cols) or (frames, rows, cols),
    nonzero = foreground. Raises ValueError (or highdicom's error) when they do not fit.
    """
    sources, frames = [_for_highdicom(ds) for ds in sources], []
    for ds, m in zip(sources, masks, strict=True):
        m = np.asarray(m)
        m = m[None] if m.ndim == 2 else m
        want = (int(ds.get("NumberOfFrames") or 1), int(ds.Rows), int(ds.Columns))
        if m.shape != want:
            raise ValueError(f"mask of shape {m.shape} for an image of (frames, rows, columns) {want}")
        frames.append(m != 0)
    params = {"threshold": f"{threshold:g}"} if threshold is not None else None
    algorithm = hd.AlgorithmIdentificationSequence(name="medsass", family=codes.cid7162.ArtificialIntelligence,
                                                   version=medsass_version(), parameters=params)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=spec.label, segmented_property_category=spec.category,
        segmented_property_type=spec.type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    try:
        series_number = int(sources[0].get("SeriesNumber")) + SERIES_NUMBER_OFFSET
    except (TypeError, ValueError):
        series_number = SERIES_NUMBER_OFFSET
    with quiet():
        return hd.seg.Segmentation(
            source_images=sources, pixel_array=np.concatenate(frames).astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
            series_instance_uid=hd.UID(), series_number=series_number if 0 < series_number < 2**31 else SERIES_NUMBER_OFFSET,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medsass",
            manufacturer_model_name="medsass-train predict", software_versions=medsass_version(), device_serial_number="0",
            content_label="MEDSASS", content_description="medsass predicted mask", content_creator_name="medsass^",
            series_description="medsass segmentation")


def segment_series(sources: Sequence[Dataset], masks: Sequence[np.ndarray], spec: SegmentSpec = SegmentSpec(), *,
                   threshold: float | None = None) -> list[Outcome]:
    """The SEGs of one series' inputs: one for all of them, else one per image, else none for an image."""
    if len(sources) > 1:
        order = sorted(range(len(sources)), key=lambda i: (_instance_number(sources[i]), i))
        why = _series_problem(sources)
        if why is None:
            try:
                return [Outcome(order, _make([sources[i] for i in order], [masks[i] for i in order], spec, threshold))]
            except Exception as exc:  # highdicom refuses the set (geometry, attributes): try image by image
                why = safe_reason(exc)
        note = f"one DICOM SEG per image: the series could not make one SEG ({why})"
        return [_single(i, sources[i], masks[i], spec, threshold, note) for i in order]
    return [_single(0, sources[0], masks[0], spec, threshold, "")]


def _single(i: int, ds: Dataset, mask: np.ndarray, spec: SegmentSpec, threshold: float | None, note: str) -> Outcome:
    try:
        return Outcome([i], _make([ds], [mask], spec, threshold), "seg_per_image" if note else "", note)
    except Exception as exc:
        return Outcome([i], None, "seg_failed", f"no DICOM SEG for this image ({safe_reason(exc)}); mask kept as PNG/TIFF")


def _make(sources: Sequence[Dataset], masks: Sequence[np.ndarray], spec: SegmentSpec, threshold: float | None) -> bytes:
    """The SEG's file bytes, once highdicom has read them back (it writes some SEGs its reader refuses)."""
    data = encode(build_segmentation(sources, masks, spec, threshold=threshold))
    with quiet():
        hd.seg.segread(io.BytesIO(data))
    return data


def _for_highdicom(ds: Dataset) -> Dataset:
    """The header highdicom gets: a projection image (no ImagePositionPatient) without SliceThickness loses its
    PixelSpacing, which highdicom would copy into a Pixel Measures item without the SliceThickness that the
    standard and its own reader require. Other headers pass unchanged."""
    if ds.get("PixelSpacing") is None or ds.get("SliceThickness") not in (None, "") or "ImagePositionPatient" in ds:
        return ds
    ds = copy.deepcopy(ds)  # a header (no pixels); copy.copy would share its elements
    del ds.PixelSpacing
    return ds


def _series_problem(sources: Sequence[Dataset]) -> str | None:
    """What we refuse in one SEG over several instances, though highdicom might not."""
    if any(int(ds.get("NumberOfFrames") or 1) > 1 for ds in sources):
        return "a multi-frame instance in the series"
    uids = [str(ds.get("SOPInstanceUID", "")) for ds in sources]
    if "" in uids or len(set(uids)) < len(uids):
        return "an SOP instance given twice, or without SOPInstanceUID"
    spacing = {tuple(round(float(v), 6) for v in ds.get("PixelSpacing") or ()) for ds in sources}
    if len(spacing) > 1:
        return "pixel spacing differs between instances"
    return None


def _instance_number(ds: Dataset) -> float:
    try:
        return float(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return float("inf")


# --- the predict edge: files and CSV rows -------------------------------------------------------------
class InputLike(Protocol):
    """What this module needs of ``predict.InputFile``."""

    path: Path
    shown: str
    rel: str
    format: str | None


@dataclass
class _Dicom:
    inp: InputLike
    row: dict[str, Any]
    header: Dataset
    mask_paths: list[Path] = field(default_factory=list)


def write_dicom_segs(files: Sequence[InputLike], rows: list[dict[str, Any]], out: str | Path, spec: SegmentSpec = SegmentSpec(),
                     *, threshold: float | None = None) -> list[dict[str, Any]]:
    """Replace the PNG/TIFF masks of predicted DICOM inputs by DICOM SEGs under ``out``; update ``rows`` in place.

    ``rows`` are predict's CSV rows (``source`` = an input's ``shown``); rows that are not ``ok``
    are left alone. SEG files of these inputs left by an earlier run and not rewritten are removed.
    """
    out = Path(out)
    by_source = {r["source"]: r for r in rows if r.get("status") == "ok"}
    series: dict[str, list[_Dicom]] = {}
    for inp in files:
        row = by_source.get(inp.shown)
        if row is None:
            continue
        if inp.format != "dicom":
            _note(row, "not_dicom", "not a DICOM input: mask kept as PNG/TIFF (a DICOM SEG needs a DICOM source)")
            continue
        try:
            with quiet():
                header = dcmread(inp.path, stop_before_pixels=True, force=True)
        except Exception as exc:
            _note(row, "seg_failed", f"cannot read the DICOM header again ({safe_reason(exc)}); mask kept as PNG/TIFF")
            continue
        key = str(header.get("SeriesInstanceUID") or "") or f"\0{inp.shown}"  # no series: a group of its own
        series.setdefault(key, []).append(_Dicom(inp, row, header))
    written: set[Path] = set()
    for group in series.values():
        masks = [read_mask(out / g.row["mask"]) for g in group]
        for oc in segment_series([g.header for g in group], masks, spec, threshold=threshold):
            members = [group[i] for i in oc.members]
            if oc.data is None:
                for g in members:
                    _note(g.row, oc.code, oc.reason)
                continue
            path = out / f"{members[0].inp.rel}{SEG_SUFFIX}"
            atomic_write_bytes(path, oc.data)
            written.add(path)
            for g in members:
                (out / g.row["mask"]).unlink(missing_ok=True)
                g.row["mask"] = path.relative_to(out).as_posix()
                _note(g.row, oc.code, oc.reason)
    for inp in files:
        stale = out / f"{inp.rel}{SEG_SUFFIX}"
        if stale not in written:
            stale.unlink(missing_ok=True)
    return rows


def read_mask(path: Path) -> np.ndarray:
    """A mask predict wrote: (rows, cols) from a PNG, (frames, rows, cols) from a multi-page TIFF."""
    if path.suffix.lower() == ".png":
        with Image.open(path) as im:
            return np.asarray(im) > 0
    return tifffile.imread(path) > 0


def encode(seg: Dataset) -> bytes:
    """A SEG as DICOM file bytes (preamble, file meta)."""
    buf = io.BytesIO()
    with quiet():
        dcmwrite(buf, seg, enforce_file_format=True)
    return buf.getvalue()


def summary(rows: Sequence[dict[str, Any]]) -> str:
    """One line for the CLI: SEGs written, inputs they cover, inputs that kept PNG/TIFF and why."""
    segs = {r["mask"] for r in rows if r.get("status") == "ok" and str(r.get("mask", "")).endswith(SEG_SUFFIX)}
    covered = sum(str(r.get("mask", "")).endswith(SEG_SUFFIX) for r in rows if r.get("status") == "ok")
    kept: dict[str, int] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("reason_code") in ("seg_failed", "not_dicom"):
            kept[r["reason_code"]] = kept.get(r["reason_code"], 0) + 1
    per_image = sum(r.get("reason_code") == "seg_per_image" for r in rows)
    text = f"{len(segs)} DICOM SEG(s) for {covered} input(s)"
    if per_image:
        text += f" ({per_image} as one SEG per image: series refused as a whole)"
    if kept:
        text += "; PNG/TIFF kept for " + ", ".join(f"{n} ({code})" for code, n in sorted(kept.items()))
    return text


def _note(row: dict[str, Any], code: str, reason: str) -> None:
    if code:
        row["reason_code"], row["reason"] = code, reason


_QUOTED = re.compile(r"""(['"])(.*?)\1""")
_NUMBERS = re.compile(r"\d[\d.]{3,}")  # UIDs, dates, long numbers


def safe_reason(exc: BaseException, limit: int = 160) -> str:
    """An exception as text without header values: quoted words that are not DICOM keywords and long numbers go."""
    def keep_keyword(m: re.Match) -> str:
        return m.group(0) if m.group(2).isidentifier() and tag_for_keyword(m.group(2)) is not None else "'…'"

    text = _NUMBERS.sub("…", _QUOTED.sub(keep_keyword, " ".join(str(exc).split())))
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warnings or log lines from highdicom/pydicom here: theirs quote header values (the patient's name)."""
    loggers = [logging.getLogger(n) for n in ("highdicom", "pydicom")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
