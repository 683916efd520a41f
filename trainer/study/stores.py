"""The study's stores: one per dataset and threshold method (and one per other site), built once with a fixed salt.

Every store of a dataset must hold the same records in the same rows and splits, so that every arm is
scored on the same test images (checked). A store that finished building is not rebuilt: a marker beside it
records the build parameters and the manifest digest.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from medsass.pipeline.build import build
from medsass.pipeline.config import load_dataset_file
from medsass.trainer.data import select_rows
from medsass.trainer.study.spec import DatasetSpec, StoreSpec, Study, split_target

from medsass.errors import MedsassError
from medsass.manifest import manifest_digest, read_json, read_manifest, write_json


def dataset_stores(study: Study, spec: DatasetSpec, log=print, build_missing: bool = True) -> dict[str, str] | None:
    """target -> store path for one dataset (identical rows, sample ids and splits checked); None where a store is not
    built yet and ``build_missing`` is false."""
    if spec.store is not None:
        return {"store": spec.store} if build_missing or Path(spec.store).exists() else None
    stores = {m: build_store(study, spec, m, log, build_missing) for m in spec.targets}
    if any(v is None for v in stores.values()):
        return None
    check_same_records(stores)
    return stores


def site_store(study: Study, site: StoreSpec, method: str, log=print, build_missing: bool = True) -> str | None:
    """A cross-site store (built with the dataset's main method, so its floor is comparable)."""
    if site.store is not None:
        return site.store if build_missing or Path(site.store).exists() else None
    return build_store(study, site, method, log, build_missing)


def build_store(study: Study, spec: StoreSpec, target: str, log=print, build_missing: bool = True) -> str | None:
    """The store of one target (``METHOD`` or ``METHOD@POLARITY``) built from a dataset file, reused once built (None
    where it is not built, or not with these settings, and ``build_missing`` is false)."""
    p = study.prep
    out = Path(study.out_dir) / "stores" / f"{spec.name}__{target}__{p.size}.zarr"
    marker = out.with_suffix(".built.json")
    method, polarity = split_target(target)
    overrides = [f"geometry.size={p.size}", f"threshold.method={method}", f"runtime.salt={p.salt}",
                 f"runtime.workers={p.workers}", "runtime.progress=false", f"out={out}", *p.overrides]
    if polarity is not None:
        overrides.append(f"threshold.polarity={polarity}")
    cfg = load_dataset_file(spec.dataset, overrides)
    if marker.exists() and out.exists():
        done = read_json(marker)
        if done.get("params_digest") == cfg.params_digest() and done.get("manifest_digest") == manifest_digest(out):
            return str(out)
    if not build_missing:
        return None
    t0 = time.time()
    result = build(cfg)
    if result.counts.get("ok", 0) == 0:
        raise MedsassError(f"prep of {spec.name} ({target}) stored no records: {result.counts} {result.failures}")
    seconds = round(time.time() - t0, 1)
    write_json({"params_digest": cfg.params_digest(), "manifest_digest": manifest_digest(out), "counts": result.counts,
                "seconds": seconds}, marker)
    log(f"prep {spec.name} {target}: {result.counts} in {seconds:.0f} s -> {out}")
    return str(out)


def prep_seconds(store: str) -> float | None:
    marker = Path(store).with_suffix(".built.json")
    return read_json(marker).get("seconds") if marker.exists() else None


def check_same_records(stores: dict[str, str]) -> None:
    """Every store of a dataset must hold the same records in the same rows and splits (so the same test set)."""
    cols = ["sample_id", "row", "split", "has_label", "status"]
    frames = {m: read_manifest(p)[cols].sort_values(["row", "sample_id"]).reset_index(drop=True) for m, p in stores.items()}
    first, ref = next(iter(frames.items()))
    for m, df in frames.items():
        if not df.equals(ref):
            raise MedsassError(f"stores of methods {first!r} and {m!r} differ in rows/splits ({stores[first]} vs {stores[m]}); "
                               "build both with the same prep.salt and split settings")
    test = ref[(ref.split == "test") & ref.has_label & (ref.status == "ok")]
    if test.empty:
        raise MedsassError(f"no labeled test records in {stores[first]}: nothing to evaluate on")


def data_digest(store: str, *, pseudo: bool = True) -> str:
    """What the study's results depend on in a store, independent of where it and its inputs are: the records, their
    splits and labels, and (``pseudo``) each pseudo-mask's threshold, polarity and foreground fraction (so a change
    in prep's thresholding, which would change the pretraining targets, gives new job keys instead of stale results;
    runs that never read pseudo-masks, scratch and SimCLR, use ``pseudo=False`` and survive such a change)."""
    cols = ["sample_id", "row", "split", "status", "has_label", "threshold", "polarity", "fg_fraction", "degenerate",
            "label_fg_fraction"]  # this order: the digests of finished runs depend on it
    if not pseudo:
        cols = [c for c in cols if c not in ("threshold", "polarity", "fg_fraction", "degenerate")]
    df = read_manifest(store)
    df = df[[c for c in cols if c in df.columns]].sort_values(["row", "sample_id"]).reset_index(drop=True)
    return hashlib.sha256(df.to_csv(index=False, float_format="%.6g").encode()).hexdigest()[:16]


def labeled_train_count(store: str) -> int:
    return len(select_rows(store, splits=["train"], target="label", exclude_degenerate=False, require_label=True))


def split_counts(store: str) -> dict[str, int]:
    """Records per split, labeled records per split, and the pretraining pool (every non-test record)."""
    df = read_manifest(store)
    df = df[(df["row"] >= 0) & (df["status"] == "ok")]
    out = {f"{sp}": int((df.split == sp).sum()) for sp in ("train", "val", "test")}
    out.update({f"{sp}_labeled": int(((df.split == sp) & df.has_label).sum()) for sp in ("train", "val", "test")})
    out["pool"] = out["train"] + out["val"]
    return out
