"""Per-file work: read -> grayscale -> pseudo-mask -> uint8 -> place in the canvas, plus the label.

Pure functions of a plan entry and the build parameters; no Dask, no Zarr. ``process_entry``
returns one :class:`Record` per requested row: arrays plus its manifest row. A file that cannot be
decoded gives failed rows (never an exception), so one bad file never stops a shard.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsass import manifest
from medsass.errors import InputError

from . import geometry
from .discover import sniff
from .intensity import to_uint8
from .labels import binarize
from .levels import all_finite
from .methods import STORE_POLARITY, fg_flags, is_degenerate, store_qc_flags
from .plan import PlanEntry
from .readers import IN_MEMORY_FORMATS, VOLUME_FORMATS, add_reader_facts, probe, read
from .readers.nifti import Volume, grid_mismatch, volume_of
from .threshold import auto_polarity, pseudo_mask

IN_MEMORY_MAX_BYTES = 64 << 20  # smaller PNG/JPEG/GIF/BMP files are read once into memory


@dataclass
class Record:
    row: int  # target row (the planned one; the record is stored only when status is ok)
    image: np.ndarray | None
    pseudo: np.ndarray | None
    label: np.ndarray | None
    meta: dict[str, Any]  # manifest row


def sample_id(e: PlanEntry, frame: int, p: geometry.Placement) -> str:
    sid = e.sample_base
    if e.n_frames > 1:
        sid += f"#f{frame}"
    if p.mode == "tile" and e.records_per_frame > 1:
        sid += f"#t{p.crop_y}_{p.crop_x}"
    return sid


def base_row(e: PlanEntry, sha: str) -> dict[str, Any]:
    return dict(
        source=e.source, source_rel=e.rel, source_sha256=sha, source_bytes=e.size_bytes, format=e.format,
        n_frames=e.n_frames, group=e.group, split=e.split, photometric=e.photometric, modality=e.modality,
        label_source=e.label_path, label_status=e.label_status, label_reason=e.label_reason,
    )


def process_entry(e: PlanEntry, rows: Sequence[int], params: dict, *, strict: bool = False,
                  store_polarity: str | None = None) -> list[Record]:
    """Records for the planned ``rows`` of entry ``e`` (a subset when the file straddles shards). With
    ``threshold.polarity: store``, ``store_polarity`` is the store's side (the plan's vote, pipeline/store_polarity.py)."""
    wanted = [(r, f, k) for r, f, k in e.records() if r in set(rows)]
    frames_needed = sorted({f for _, f, _ in wanted})
    g, t = params["geometry"], params["threshold"]
    store_qc = t["polarity"] == STORE_POLARITY
    if store_qc and store_polarity not in ("bright", "dark", "auto"):  # auto: a mixed vote (each image its own side)
        raise ValueError(f"threshold.polarity is {STORE_POLARITY!r} but the store's polarity is {store_polarity!r}")
    size, mode = g["size"], "tile" if g["tile"] else g["resize"]
    data = None
    try:
        if e.format in IN_MEMORY_FORMATS and e.size_bytes <= IN_MEMORY_MAX_BYTES:
            data = Path(e.source).read_bytes()  # one read serves the hash and the decoder
            sha = hashlib.sha256(data).hexdigest()
        else:
            sha = manifest.file_digest(e.source)
    except OSError as exc:
        return _failed(e, wanted, "", "unreadable", f"cannot read the file: {exc}")
    try:
        got = read(Path(e.source), e.format, frames_needed, max_pixels=g["max_pixels"], data=data,
                   slice_axis=g.get("slice_axis"), window=t.get("window"))
        frames = {fr.index: fr for fr in got}
    except InputError as exc:
        if strict:
            raise
        return _failed(e, wanted, sha, exc.code, exc.reason)
    except Exception as exc:  # decoder bugs and exotic files are recorded, not fatal
        if strict:
            raise
        return _failed(e, wanted, sha, "decode_error", f"{type(exc).__name__}: {exc}")
    volume = next((fr.meta["columns"] for fr in frames.values() if "volume_affine" in fr.meta.get("columns", {})), None)
    labels, label_status, label_reason = _read_label(e, frames_needed, g["max_pixels"], g.get("slice_axis"), volume)
    out: list[Record] = []
    for fidx in frames_needed:
        frame = frames.get(fidx)
        recs = [(r, k) for r, f, k in wanted if f == fidx]
        if frame is None:
            out += _failed(e, [(r, fidx, k) for r, k in recs], sha, "decode_error", f"frame {fidx} was not decoded")
            continue
        gray = frame.pixels
        try:
            levels = frame.levels  # codes into a table of values (DICOM): histograms and uint8 from the codes
            if not all_finite(gray, levels):
                raise InputError(e.source, "nonfinite", "image has NaN or infinite values")
            places = geometry.placements(gray.shape, size, mode, g["tile_overlap"])
            if len(places) != e.records_per_frame:
                raise InputError(e.source, "frame_shape", f"frame {fidx} is {gray.shape}, unlike frame 0 {e.height}x{e.width}")
            own = auto_polarity(gray, method=t["method"], levels=levels) if store_qc and store_polarity != "auto" else None
            pm = pseudo_mask(gray, method=t["method"], polarity=store_polarity if store_qc else t["polarity"], levels=levels)
            u8, low, high = to_uint8(gray, t["intensity"], str(frame.meta.get("orig_dtype", "")), levels)
        except InputError as exc:
            if strict:
                raise
            out += _failed(e, [(r, fidx, k) for r, k in recs], sha, exc.code, exc.reason)
            continue
        lab = labels.get(fidx) if labels else None
        lstatus, lreason = label_status, label_reason
        if lab is not None and lab.shape != gray.shape:
            lstatus, lreason = "shape_mismatch", shape_mismatch_reason(lab.shape, gray.shape)
            lab = None
        for r, k in recs:
            p = places[k]
            crop_mask = pm.mask[p.crop_y : p.crop_y + p.crop_height, p.crop_x : p.crop_x + p.crop_width]
            fg = float(crop_mask.mean()) if mode == "tile" else pm.fg_fraction
            flags = [f for f in pm.flags if f == "constant"] + list(fg_flags(fg))
            if store_qc:  # store-level QC (auto/bright/dark manifests stay as they were)
                flags += store_qc_flags(fg, own or pm.polarity, pm.polarity, flags)  # a mixed vote: no minority
            meta = manifest.empty_row(
                **base_row(e, sha), sample_id=sample_id(e, fidx, p), frame=fidx, status="ok", row=r,
                orig_height=gray.shape[0], orig_width=gray.shape[1], orig_dtype=str(frame.meta.get("orig_dtype", gray.dtype)),
                channels=int(frame.meta.get("channels", 1)),
                crop_y=p.crop_y, crop_x=p.crop_x, crop_height=p.crop_height, crop_width=p.crop_width, resize_mode=mode,
                content_y=p.content_y, content_x=p.content_x, content_height=p.content_height, content_width=p.content_width,
                intensity_low=low, intensity_high=high, method=pm.method, threshold=float(pm.threshold),
                polarity=pm.polarity, fg_fraction=fg, qc_flags=",".join(flags), degenerate=is_degenerate(flags),
            )
            add_reader_facts(meta, frame)  # volumes (NIfTI): geometry columns, window range, no_body QC
            label_c = None
            if lab is not None:
                label_c, label_fg = place_label(lab, p, size)
                meta.update(has_label=True, label_status="ok", label_reason="", label_fg_fraction=label_fg,
                            label_revision=1)
            else:
                meta.update(label_status=lstatus, label_reason=lreason)
            out.append(Record(r, geometry.place_image(u8, p, size), geometry.place_mask(pm.mask, p, size), label_c, meta))
    return out


def _read_label(e: PlanEntry, frames: list[int], max_pixels: int, slice_axis: str | None,
                volume: dict | None) -> tuple[dict[int, np.ndarray], str, str]:
    if e.label_status != "ok" or not e.label_path:
        return {}, e.label_status, e.label_reason
    return read_mask(e.label_path, e.n_frames, frames, max_pixels, slice_axis=slice_axis, volume=volume)


def read_mask(path: str, n_frames: int, frames: list[int], max_pixels: int, *, slice_axis: str | None = None,
              volume: dict | None = None) -> tuple[dict[int, np.ndarray], str, str]:
    """Binary masks (frame -> bool (H, W)) of a real-mask file for an image of ``n_frames`` frames, plus
    label_status ('ok', 'unreadable', 'frames_mismatch', 'shape_mismatch') and reason. Never raises for a bad file.

    A label volume (NIfTI) is cut across ``slice_axis`` as its image was (the store's ``geometry.slice_axis``); with
    ``volume`` (the image's volume columns: ``volume_shape``, ``volume_affine``) it must lie on the image's voxel grid
    (readers.nifti.grid_mismatch), else shape_mismatch: a label on another grid would give wrongly cut slices."""
    try:
        fmt = sniff(Path(path))
        if fmt is None:
            return {}, "unreadable", f"{path} is not an image medsass reads"
        n = probe(Path(path), fmt, slice_axis=slice_axis).n_frames
        if n != n_frames:
            return {}, "frames_mismatch", f"mask has {n} frame(s), image has {n_frames}"
        if volume is not None and fmt in VOLUME_FORMATS:
            off = grid_mismatch(volume_of(Path(path), slice_axis), Volume.from_columns(volume, slice_axis))
            if off:
                return {}, "shape_mismatch", f"{path}: {off}"
        got = read(Path(path), fmt, frames, max_pixels=max_pixels, slice_axis=slice_axis)
        return {fr.index: binarize(fr.pixels) for fr in got}, "ok", ""
    except InputError as exc:
        return {}, "unreadable", f"{path}: {exc.reason}"
    except Exception as exc:
        return {}, "unreadable", f"{path}: {type(exc).__name__}: {exc}"


def place_label(mask: np.ndarray, p: geometry.Placement, size: int) -> tuple[np.ndarray, float]:
    """A binary source mask -> the record's stored (size, size) label and its foreground fraction in the record's
    source region (manifest ``label_fg_fraction``). build-masks and add-labels both store labels through this."""
    crop = mask[p.crop_y : p.crop_y + p.crop_height, p.crop_x : p.crop_x + p.crop_width]
    return geometry.place_mask(mask, p, size), float(crop.mean())


def shape_mismatch_reason(mask_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> str:
    return f"mask is {mask_shape[0]}x{mask_shape[1]}, image is {image_shape[0]}x{image_shape[1]}"


def _failed(e: PlanEntry, wanted, sha: str, code: str, reason: str) -> list[Record]:
    out, seen = [], set()
    for r, f, _k in wanted:  # one failed row per frame, even when it has several tiles
        if f in seen:
            continue
        seen.add(f)
        sid = e.sample_base + (f"#f{f}" if e.n_frames > 1 else "")
        meta = manifest.empty_row(
            **base_row(e, sha), sample_id=sid, frame=f, status="failed", reason_code=code, reason=reason,
            orig_height=e.height, orig_width=e.width,
        )
        out.append(Record(r, None, None, None, meta))
    return out
