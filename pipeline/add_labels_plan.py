"""add-labels, the plan: which stored record gets which mask, fixed in ``plan.json`` before any pixel is written.

Masks pair with the stored records as in build-masks (:class:`~.labels.LabelIndex`); each mask's header (frames,
shape; for a label volume also its voxel grid, cut across the store's ``geometry.slice_axis``) is checked against its
record's source image, so a mask that cannot fit is rejected here with its reason.
A re-run of an unfinished add-labels reuses its plan (:func:`pending_plan`).
"""
from __future__ import annotations

import time
from pathlib import Path

from medsass import manifest
from medsass.errors import ConfigError, InputError, StoreError

from .config import LabelSource, resolve_path
from .discover import sniff
from .labels import LabelIndex
from .process import shape_mismatch_reason
from .readers import VOLUME_FORMATS, probe
from .readers.nifti import Volume, grid_mismatch, volume_of


def labels_request(labels_dir, pattern, stem_regex, pairs) -> dict:
    """Where the masks are, as the plan records it: ``--labels DIR`` (+ pattern, stem regex) or ``--pairs CSV``."""
    if bool(labels_dir) == bool(pairs):
        raise ConfigError("give the masks as --labels DIR (with --label-pattern) or as --pairs CSV, exactly one of them")
    if pairs and (pattern or stem_regex):
        raise ConfigError("--label-pattern and --stem-regex apply to --labels DIR; a --pairs CSV names each mask itself")

    cwd = Path.cwd()  # as build-masks resolves its --labels and --pairs
    spec = LabelSource(dir=resolve_path(labels_dir, cwd), stem_regex=stem_regex, pairs=resolve_path(pairs, cwd))
    if pattern:
        spec.pattern = pattern
    return {"dir": spec.dir, "pattern": spec.pattern, "stem_regex": spec.stem_regex, "pairs": spec.pairs}


def pending_plan(out: Path, run: Path, request: dict) -> dict | None:
    """The plan of an unfinished run of the same request, or None when there is none."""
    if not (run / "plan.json").exists():
        return None
    plan = manifest.read_json(run / "plan.json")
    if plan["labels"] != request:
        shown = f"--pairs {plan['labels']['pairs']}" if plan["labels"]["pairs"] else (
            f"--labels {plan['labels']['dir']} --label-pattern '{plan['labels']['pattern']}'")
        raise StoreError(
            f"{out} has an unfinished add-labels ({shown}) whose shards are partly written; run that command again to "
            "finish it, then this one"
        )
    now = manifest.manifest_digest(out)
    committed = run / "commit.json"
    if now != plan["manifest_sha256"] and not (committed.exists() and manifest.read_json(committed)["manifest_sha256"] == now):
        raise StoreError(
            f"{manifest.manifest_path(out)} changed since the unfinished add-labels in {run} started (was the store "
            f"rebuilt?); its labels may be partly written: remove {run} and run add-labels again"
        )
    return plan


def make_plan(out: Path, df, request: dict, slice_axis: str | None = None) -> dict:
    """Pair every stored record's source with a mask; probe each mask's header (frames, shape, voxel grid), a label
    volume cut across ``slice_axis`` (the store's ``geometry.slice_axis``)."""
    index = LabelIndex(LabelSource(**request))
    cols = {c: df[c].tolist() for c in ("source", "source_rel", "sample_id", "status", "reason", "row", "n_frames",
                                        "orig_height", "orig_width")}
    volumes = volume_columns(df)
    by_source: dict[str, list[int]] = {}
    for i, src in enumerate(cols["source"]):
        by_source.setdefault(src, []).append(i)
    items, rejected, used = [], [], set()
    n_without = 0
    for src, idx in by_source.items():
        stored = [i for i in idx if cols["status"][i] == "ok" and cols["row"][i] >= 0]
        first = (stored or idx)[0]
        aliases = tuple(dict.fromkeys([cols["sample_id"][i] for i in idx] + [cols["source_rel"][first]]))
        p = index.pair(src, cols["source_rel"][first], aliases)
        what = {"sample_id": cols["sample_id"][first], "source": src}
        if p.status == "ambiguous":
            used.update(_real(c) for c in p.candidates)
            rejected.append({"mask": "", **what, "code": "ambiguous", "reason": p.reason + "; make --label-pattern match one file"})
            continue
        if p.status != "ok":
            n_without += len(stored)
            continue
        used.add(_real(p.path))
        if not stored:
            rejected.append({"mask": p.path, **what, "code": "image_not_stored",
                             "reason": f"its image was not stored by build-masks ({cols['status'][first]}: {cols['reason'][first]})"})
            continue
        shape = (int(cols["orig_height"][first]), int(cols["orig_width"][first]))
        problem = _check_mask(p.path, int(cols["n_frames"][first]), shape, slice_axis, volumes[first])
        if problem:
            rejected.append({"mask": p.path, **what, "code": problem[0], "reason": problem[1]})
            continue
        items += [{"row": int(cols["row"][i]), "label_source": p.path} for i in stored]
    ignored = []
    sources = {_real(s) for s in by_source}
    for f in sorted(index.files - used):
        if f in sources:
            continue  # an image of the store that happens to sit in the label folder
        if _sniff(f) is None:
            ignored.append({"file": f, "reason": "not an image medsass reads"})
        else:
            how = f"--label-pattern '{request['pattern']}'" if request["dir"] else f"the pairs CSV {request['pairs']}"
            rejected.append({"mask": f, "sample_id": "", "source": "", "code": "no_record",
                             "reason": f"no record of the store pairs with it under {how}; check the pattern "
                                       "(fields {stem} {name} {ext} {rel_stem} {rel_dir} of the manifest's source_rel)"})
    return {"version": 1, "labels": request, "manifest_sha256": manifest.manifest_digest(out), "started": time.time(),
            "items": sorted(items, key=lambda it: it["row"]), "rejected": rejected, "ignored": ignored,
            "records_without_mask": n_without}


def _real(path: str) -> str:
    return str(Path(path).resolve())


def _sniff(path: str) -> str | None:
    try:
        return sniff(Path(path))
    except OSError:
        return None


def volume_columns(df) -> list[dict | None]:
    """Per manifest row, its volume columns (``volume_shape``, ``volume_affine``) when it was cut from a volume."""
    if "volume_affine" not in df.columns:
        return [None] * len(df)
    return [None if a is None or s is None else {"volume_shape": [int(n) for n in s], "volume_affine": [float(v) for v in a]}
            for s, a in zip(df["volume_shape"].tolist(), df["volume_affine"].tolist())]


def _check_mask(path: str, n_frames: int, shape: tuple[int, int], slice_axis: str | None = None,
                volume: dict | None = None) -> tuple[str, str] | None:
    """(code, reason) when the mask's header does not fit the record's source image, else None."""
    fmt = _sniff(path)
    if fmt is None:
        return "unreadable", f"{path} is not an image medsass reads (DICOM, PNG, JPEG, TIFF, GIF, BMP, NIfTI)"
    try:
        pr = probe(Path(path), fmt, slice_axis=slice_axis)
        off = grid_mismatch(volume_of(Path(path), slice_axis), Volume.from_columns(volume, slice_axis)) if (
            volume is not None and fmt in VOLUME_FORMATS) else ""
    except InputError as exc:
        return "unreadable", f"{path}: {exc.reason}"
    if pr.n_frames != n_frames:
        return "frames_mismatch", f"mask has {pr.n_frames} frame(s), image has {n_frames}"
    if off:
        return "shape_mismatch", off
    if tuple(pr.shape) != shape:
        return "shape_mismatch", shape_mismatch_reason(pr.shape, shape) + "; a mask must have its source image's size"
    return None
