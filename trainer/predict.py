"""``medsass-train predict``: masks for raw DICOM/TIFF/PNG/JPEG/NIfTI files from a trained checkpoint.

Inputs go through prep's own discovery and readers and the preprocessing the training store was
built with (read from the checkpoint, never guessed): grayscale -> uint8 intensity mapping ->
placement in the S x S canvas (stretch, pad or native-resolution tiles). Predicted probabilities
are mapped back to each frame's original pixels (``geometry.to_source``; overlapping tiles
averaged), thresholded, and written per input under ``OUT`` at the input's relative path::

    OUT/<rel>_mask.png       {0, 255} mask of a single-frame input
    OUT/<rel>_mask.tif       multi-page mask of a multi-frame DICOM / multi-page TIFF (one page per frame)
    OUT/<rel>_prob.tif       float32 probabilities (with ``probabilities=True``)
    OUT/<rel>_mask.nii.gz    of a NIfTI input: a uint8 {0, 1} label volume with the input's shape, voxel order and
                             affine (``_prob.nii.gz``: float32 probabilities; trainer/nifti_output.py)
    OUT/<rel>_seg.dcm        with ``output_format="dicom-seg"``: a DICOM SEG per series of DICOM inputs (trainer/dicom_seg.py)
    OUT/predictions.csv      source, status, reason, frames, height, width, fg_fraction, mean_probability, outputs

``<rel>`` is the input's path relative to the common parent of the inputs, without its image
extension (kept when two inputs would share a name). Inputs that cannot be read are recorded
(failed / skipped, with a reason) and skipped, as in prep. Only paths the user gave are written:
nothing from DICOM headers, nor the text fields of NIfTI headers.
"""
from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from medsass.pipeline import geometry
from medsass.pipeline.discover import discover, unreadable_content
from medsass.pipeline.intensity import to_uint8
from medsass.pipeline.plan import common_parent
from medsass.pipeline.readers import VOLUME_FORMATS, probe, read
from medsass.trainer import checkpoint as ck
from medsass.trainer import dicom_seg, nifti_output
from medsass.trainer.distributed import pick_device
from medsass.trainer.model import build_model
from PIL import Image

from medsass import store as store_mod
from medsass.errors import ConfigError, InputError, SkipInput, StoreError
from medsass.manifest import atomic_write_bytes

CSV_NAME = "predictions.csv"
CSV_COLUMNS = ("source", "status", "reason_code", "reason", "frames", "height", "width", "fg_fraction", "mean_probability",
               "mask", "probabilities")
OUTPUT_FORMATS = ("png", "dicom-seg")  # png: PNG, multi-page TIFF for multi-frame inputs
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".tif", ".tiff", ".dcm", ".dicom", ".gif", ".bmp", ".nii", ".nii.gz"}


@dataclass(frozen=True)
class PrepParams:
    """How the training store turned a source frame into an S x S uint8 canvas."""

    size: int
    mode: str  # stretch | pad | tile
    tile_overlap: int = 0
    intensity: str = "percentile"
    max_pixels: int = 2**28
    window: str | None = None  # volumes (NIfTI): --window of the store (pipeline/window.py)
    slice_axis: str = "axial"  # volumes: the axis they were cut across

    @classmethod
    def from_record(cls, prep: dict[str, Any], *, where: str) -> PrepParams:
        """From a checkpoint's ``stores[name]['prep']`` (see ``checkpoint.prep_params``)."""
        g, t = prep.get("geometry"), prep.get("threshold")
        if not isinstance(g, dict) or not isinstance(t, dict) or "intensity" not in t:
            raise StoreError(f"{where} records no prep geometry/threshold parameters (a store not built by "
                             "`medsass-prep build-masks`?); predict cannot repeat its preprocessing")
        if "window" in t and t["window"] is None:  # build-masks records a window only when set: this one was withheld
            raise StoreError(f"{where} records that its volumes were windowed but not the window (a copy made by "
                             "an older `medsass-prep share`, which dropped C/W windows such as 40/400: share the store again); "
                             "predict cannot repeat its preprocessing")
        return cls(size=int(g["size"]), mode="tile" if g.get("tile") else str(g["resize"]), tile_overlap=int(g.get("tile_overlap", 0)),
                   intensity=str(t["intensity"]), max_pixels=int(g.get("max_pixels", 2**28)), window=t.get("window"),
                   slice_axis=str(g.get("slice_axis", "axial")))


@dataclass(frozen=True)
class InputFile:
    path: Path  # resolved
    shown: str  # as the user gave it (argument, joined with the path below it)
    rel: str  # output name stem relative to OUT (posix)
    format: str | None
    size: int


@dataclass
class _Job:
    """One input in flight: per-frame probability sums (and tile counts) until every canvas is back."""

    inp: InputFile
    shapes: list[tuple[int, int]]
    acc: list[np.ndarray] = field(default_factory=list)
    cnt: list[np.ndarray] = field(default_factory=list)
    remaining: int = 0
    slice_axis: str | None = None  # set when the input is a volume (NIfTI): its outputs are volumes too


def prep_from_checkpoint(ckpt: dict[str, Any], *, where: str, store: str | None = None) -> PrepParams:
    """The prep parameters of the stores ``ckpt`` was trained on (one store, or several that agree).

    Checkpoints written before prep parameters were recorded fall back to reading the store."""
    stores = dict(ckpt.get("stores") or {})
    if store is not None:
        if store not in stores:
            raise ConfigError(f"--store {store!r}: {where} was trained on store(s) {sorted(stores)}")
        stores = {store: stores[store]}
    if not stores:
        raise StoreError(f"{where} records no training store, so its preprocessing is unknown")
    found: dict[str, PrepParams] = {}
    for name, rec in stores.items():
        prep = rec.get("prep")
        if prep is None:
            path = rec.get("path", "")
            if not store_mod.is_store(path):
                raise StoreError(f"{where} predates recorded prep parameters and its store {name!r} ({path}) is gone; "
                                 "restore the store at that path (or re-train) so predict can read how images were prepared")
            prep = ck.prep_params(path)
        found[name] = PrepParams.from_record(prep, where=f"store {name!r} of {where}")
    if len(set(found.values())) > 1:
        desc = "; ".join(f"{n}: {p}" for n, p in found.items())
        raise ConfigError(f"{where} was trained on stores prepared differently ({desc}); choose one with --store NAME")
    return next(iter(found.values()))


def load_model(ckpt: dict[str, Any], device: torch.device) -> torch.nn.Module:
    model = build_model(ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def find_inputs(inputs: Sequence[str | Path], out: Path) -> tuple[list[InputFile], list[dict[str, Any]]]:
    """Discovered input files (de-duplicated, files under ``out`` left out) and rows for missing paths."""
    found, missing, seen = [], [], set()
    out_prefix = str(out.resolve()) + os.sep
    for arg in inputs:
        try:
            cands = discover([arg])
        except InputError as exc:
            missing.append(_row(str(arg), "failed", exc.code, exc.reason))
            continue
        for c in cands:
            if str(c.path) in seen or str(c.path).startswith(out_prefix):
                continue
            seen.add(str(c.path))
            found.append((c, str(arg) if Path(arg).is_file() else os.path.join(str(arg), c.rel)))
    common = common_parent(sorted({str(c.root) for c, _ in found}))
    rels = [(Path(c.path).relative_to(common).as_posix() if common and str(c.path).startswith(common) else c.rel) for c, _ in found]
    stems = [r[: -len(_suffix(r))] if _suffix(r).lower() in IMAGE_SUFFIXES else r for r in rels]
    counts = Counter(s.lower() for s in stems)
    clash = {s for s, k in counts.items() if k > 1}
    files = [InputFile(c.path, shown, rel if stem.lower() in clash else stem, c.format, c.size)
             for (c, shown), rel, stem in zip(found, rels, stems)]
    return files, missing


def frame_canvases(pixels: np.ndarray, orig_dtype: str, prep: PrepParams) -> tuple[list[geometry.Placement], Iterator[np.ndarray]]:
    """The placements of a decoded frame and its uint8 S x S canvases, exactly as prep stores them."""
    u8, _, _ = to_uint8(pixels, prep.intensity, orig_dtype)
    places = geometry.placements(pixels.shape, prep.size, prep.mode, prep.tile_overlap)
    return places, (geometry.place_image(u8, p, prep.size) for p in places)


def predict_files(
    model: torch.nn.Module, prep: PrepParams, inputs: Sequence[str | Path], out: str | Path, *,
    device: torch.device | str = "cpu", batch_size: int = 16, threshold: float = 0.5, probabilities: bool = False,
    output_format: str = "png", segment: dicom_seg.SegmentSpec | None = None,
) -> list[dict[str, Any]]:
    """Predict every input with ``model`` (logits out); write masks and the CSV; return the CSV rows."""
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--format {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    out, device = Path(out), torch.device(device)
    model = model.to(device).eval()
    files, rows = find_inputs(inputs, out)
    batch: list[tuple[_Job, int, geometry.Placement, np.ndarray]] = []
    for inp in files:
        try:
            if inp.size == 0:
                raise InputError(inp.path, "empty_file", "file is empty (0 bytes)")
            if inp.format is None:  # failed when its extension names an image format, else skipped (as in prep)
                raise unreadable_content(inp.path, inp.shown)
            probe(inp.path, inp.format, slice_axis=prep.slice_axis)
            frames = read(inp.path, inp.format, None, max_pixels=prep.max_pixels, slice_axis=prep.slice_axis, window=prep.window)
            if not frames:
                raise InputError(inp.path, "no_frames", "no frame could be decoded")
        except InputError as exc:
            rows.append(_fail(inp, out, exc))
            continue
        job = _Job(inp, [f.pixels.shape for f in frames], slice_axis=prep.slice_axis if inp.format in VOLUME_FORMATS else None)
        work = []
        for i, fr in enumerate(frames):
            places, canvases = frame_canvases(fr.pixels, str(fr.meta.get("orig_dtype", "")), prep)
            job.acc.append(np.zeros(fr.pixels.shape, np.float32))
            job.cnt.append(np.zeros(fr.pixels.shape, np.uint16) if len(places) > 1 else np.ones(1, np.uint16))
            job.remaining += len(places)
            work.append((i, places, canvases))
        del frames
        for i, places, canvases in work:
            for p, canvas in zip(places, canvases):
                batch.append((job, i, p, canvas))
                if len(batch) == batch_size:
                    rows += _run_batch(model, batch, device, out, threshold, probabilities)
                    batch = []
    rows += _run_batch(model, batch, device, out, threshold, probabilities)
    if output_format == "dicom-seg":
        dicom_seg.write_dicom_segs(files, rows, out, segment or dicom_seg.SegmentSpec(), threshold=threshold)
    order = {f.shown: k for k, f in enumerate(files)}
    rows.sort(key=lambda r: order.get(r["source"], -1))
    write_csv(out / CSV_NAME, rows)
    return rows


def predict(
    checkpoint: str | Path, inputs: Sequence[str | Path], out: str | Path, *, device: str = "auto", batch_size: int = 16,
    threshold: float = 0.5, probabilities: bool = False, store: str | None = None, output_format: str = "png",
    segment: dicom_seg.SegmentSpec | None = None,
) -> list[dict[str, Any]]:
    """Load ``checkpoint`` (a .pt file, or a run folder: the fine-tuned checkpoint its evaluate scored, see
    :func:`checkpoint.resolve_model`) and predict ``inputs`` into ``out``."""
    if batch_size < 1 or not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--batch-size must be >= 1 (got {batch_size}) and --threshold in [0, 1] (got {threshold})")
    path = ck.resolve_model(checkpoint)
    state = ck.load(path)
    prep = prep_from_checkpoint(state, where=f"checkpoint {path}", store=store)
    dev = pick_device(device, option="--device")
    return predict_files(load_model(state, dev), prep, inputs, out, device=dev, batch_size=batch_size,
                         threshold=threshold, probabilities=probabilities, output_format=output_format, segment=segment)


@torch.no_grad()
def _run_batch(model, batch, device: torch.device, out: Path, threshold: float, probabilities: bool) -> list[dict[str, Any]]:
    """Run one batch of canvases; add each probability map back to its frame; finish completed inputs."""
    if not batch:
        return []
    x = torch.from_numpy(np.stack([c for *_, c in batch]))[:, None].to(device).float().div_(255)
    probs = torch.sigmoid(model(x).float())[:, 0].cpu().numpy()
    done = []
    for (job, i, p, _), prob in zip(batch, probs):
        region = (slice(p.crop_y, p.crop_y + p.crop_height), slice(p.crop_x, p.crop_x + p.crop_width))
        job.acc[i][region] += geometry.to_source(prob, p, order=1)
        if job.cnt[i].ndim == 2:
            job.cnt[i][region] += 1
        job.remaining -= 1
        if job.remaining == 0:
            done.append(_finish(job, out, threshold, probabilities))
    return done


def _finish(job: _Job, out: Path, threshold: float, probabilities: bool) -> dict[str, Any]:
    probs = [a / c for a, c in zip(job.acc, job.cnt)]
    masks = [(p >= threshold).astype(np.uint8) * np.uint8(255) for p in probs]
    multi = len(masks) > 1
    mask_path, prob_path = _outputs(job.inp, out, multi)
    if job.slice_axis is not None:  # a volume in, a volume out, on the input's voxel grid
        nifti_output.write_volume(job.inp.path, job.slice_axis, masks, mask_path)
        if probabilities:
            nifti_output.write_volume(job.inp.path, job.slice_axis, probs, prob_path, kind="probability")
    else:
        atomic_write_bytes(mask_path, _tiff(masks) if multi else _png(masks[0]))
        if probabilities:
            atomic_write_bytes(prob_path, _tiff(probs))
    n = sum(m.size for m in masks)
    h, w = job.shapes[0]
    return _row(job.inp.shown, "ok", frames=len(masks), height=h, width=w,
                fg_fraction=sum(int(np.count_nonzero(m)) for m in masks) / n,
                mean_probability=float(sum(float(p.sum(dtype=np.float64)) for p in probs) / n),
                mask=mask_path.relative_to(out).as_posix(), probabilities=prob_path.relative_to(out).as_posix() if probabilities else "")


def _outputs(inp: InputFile, out: Path, multi: bool) -> tuple[Path, Path]:
    if inp.format in VOLUME_FORMATS:
        return out / f"{inp.rel}_mask{nifti_output.SUFFIX}", out / f"{inp.rel}_prob{nifti_output.SUFFIX}"
    return out / f"{inp.rel}_mask.{'tif' if multi else 'png'}", out / f"{inp.rel}_prob.tif"


def _suffix(rel: str) -> str:
    """A file name's image extension; ``.nii.gz`` counts as one."""
    return rel[-7:] if rel.lower().endswith(".nii.gz") else Path(rel).suffix


def _fail(inp: InputFile, out: Path, exc: InputError) -> dict[str, Any]:
    for multi in (False, True):  # a mask left from an earlier run would contradict the CSV
        for stale in _outputs(inp, out, multi):
            stale.unlink(missing_ok=True)
    return _row(inp.shown, "skipped" if isinstance(exc, SkipInput) else "failed", exc.code, exc.reason)


def _row(source: str, status: str, code: str = "", reason: str = "", **values: Any) -> dict[str, Any]:
    return {c: "" for c in CSV_COLUMNS} | {"source": source, "status": status, "reason_code": code, "reason": reason} | values


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


def _tiff(pages: list[np.ndarray]) -> bytes:
    """A multi-page (or single-page) TIFF, one page per 2-D array, zlib-compressed."""
    buf = io.BytesIO()
    if len({p.shape for p in pages}) == 1:
        data = pages[0] if len(pages) == 1 else np.stack(pages)
        tifffile.imwrite(buf, data, photometric="minisblack", compression="zlib")
    else:  # frames of different sizes: one page each
        with tifffile.TiffWriter(buf) as tw:
            for p in pages:
                tw.write(p, photometric="minisblack", compression="zlib")
    return buf.getvalue()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())
