"""How good are the stored pseudo-masks against expert masks, does polarity="auto" pick the right side, and what
does each threshold method cost? Every figure of docs/pseudo_masks.md comes from one run of this script.

Everything goes through build-masks' own path: for each dataset file data_manifests/NAME.yaml with expert masks and
each arm (``threshold.method``, ``threshold.polarity``) it builds a scratch store with
``medsass.pipeline.build.build`` (the pipeline's readers, grayscale conversion, label pairing and resizing; fixed
salt; one Dask worker) and scores every stored ``pseudo_mask`` against the stored ``label``
(``pipeline.report.pseudo_label_iou``: per-image IoU, an empty pair scores 1). The masks are computed at native
resolution and scored **at the store's size** (the dataset file's ``geometry.size``: 256, the bundled sample 128).
``oracle`` is the better of the bright and dark arm for each image; auto agrees with the oracle when its IoU is
not lower. Inputs without expert masks (cxr_shenzhen's unlabeled/) are left out of the builds.

Timing: ``pseudo_mask(gray, method=m, polarity="auto")`` on the same images for every method, read with the
pipeline's readers at native resolution (the work build-masks does per image), methods interleaved per image, the
median of ``--repeat`` runs per image, summed; ratios are to ``otsu``.

    python benchmarks/pseudo_mask_quality.py --out docs/results/pseudo_masks   # all tables (.md + .json)
    python benchmarks/pseudo_mask_quality.py --datasets ph2_dermoscopy --methods otsu fov_otsu_hull
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from medsass import jsonl, manifest, store
from medsass.pipeline import threshold as th
from medsass.pipeline.build import build
from medsass.pipeline.config import load_dataset_file
from medsass.pipeline.parallel import dask_client
from medsass.pipeline.readers import read
from medsass.pipeline.report import pseudo_label_iou

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "data_manifests"
DATASETS = ("ph2_dermoscopy", "isic_sample", "nuclei_sample", "retina_vessels", "cxr_lungs", "sample",
            "cxr_shenzhen", "nuclei_dsb2018", "polyps_kvasir")
LARGE = ("cxr_shenzhen", "nuclei_dsb2018", "polyps_kvasir")  # 500-1000 images each: LARGE_METHODS only (run time)
LARGE_METHODS = ("otsu", "fov_otsu_hull")
SIDES = ("bright", "dark")
SALT = "pseudo-mask-quality"
TIMING_DATASETS = ("ph2_dermoscopy", "cxr_lungs", "nuclei_sample", "cxr_shenzhen", "polyps_kvasir")
TIMING_PER_DATASET = 12  # first images (by sample_id) of each timing dataset


# ----------------------------------------------------------------------------- building and scoring


def arms(dataset: str, methods) -> list[tuple[str, str]]:
    methods = [m for m in methods if m in LARGE_METHODS] if dataset in LARGE else list(methods)
    return [(m, p) for m in methods for p in ("auto", *SIDES)]


def build_arm(dataset: str, method: str, polarity: str, scratch: Path, scheduler: str) -> tuple[Path, dict]:
    """Build one store the way ``build-masks --dataset data_manifests/DATASET.yaml`` does; its run log entry."""
    out = scratch / f"{dataset}-{method}-{polarity}.zarr"
    cfg = load_dataset_file(MANIFESTS / f"{dataset}.yaml", [
        f"threshold.method={method}", f"threshold.polarity={polarity}", f"out={out}", f"runtime.salt={SALT}",
        "runtime.workers=1", f"runtime.scheduler={scheduler}", "runtime.progress=false"])
    cfg.sources = [s for s in cfg.sources if s.labels.dir or s.labels.pairs]  # only inputs with expert masks
    build(cfg, overwrite=True)
    return out, jsonl.read_jsonl(store.work_dir(out) / "runs.jsonl")[-1]


def subset_of(cfg_sources, source: str) -> str:
    for s in cfg_sources:
        if source.startswith(s.path):
            p = Path(s.path)
            return p.parent.name if p.name == "images" else p.name
    return "?"


def score(path: Path, dataset: str) -> pd.DataFrame:
    """One row per labelled record: sample_id, subset, polarity taken, threshold, IoU at the store's size."""
    group, info = store.open_store(path)
    df = manifest.read_manifest(path)
    df = df[(df.status == "ok") & df.has_label].sort_values("row").reset_index(drop=True)
    sources = load_dataset_file(MANIFESTS / f"{dataset}.yaml").sources
    labelled = [s for s in sources if s.labels.dir or s.labels.pairs]
    subset = [subset_of(labelled, s) for s in df.source] if len(labelled) > 1 else ["all"] * len(df)
    iou = pseudo_label_iou(group, info, df.row.to_numpy())
    return pd.DataFrame({"sample_id": df.sample_id, "subset": subset, "source": df.source, "format": df.format,
                         "polarity": df.polarity, "threshold": df.threshold, "iou": iou, "size": info.size})


def run(datasets, methods, scratch: Path, log=sys.stderr) -> tuple[pd.DataFrame, list[dict]]:
    frames, builds = [], []
    with dask_client(1, quiet=True) as client:
        scheduler = client.scheduler.address
        for ds in datasets:
            for m, p in arms(ds, methods):
                t0 = time.perf_counter()
                path, entry = build_arm(ds, m, p, scratch, scheduler)
                s = score(path, ds).assign(dataset=ds, method=m, arm=p)
                frames.append(s)
                builds.append({"dataset": ds, "method": m, "polarity": p, "records": entry["records_run"],
                               "task_cpu_seconds": entry["task_cpu_seconds"], "seconds": entry["seconds"]})
                print(f"  {ds} {m} {p}: n={len(s)} mean IoU {s.iou.mean():.3f} ({time.perf_counter() - t0:.1f} s)",
                      file=log, flush=True)
    return pd.concat(frames, ignore_index=True), builds


def per_image(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, method, image): IoU of each arm, the auto side, the oracle side and agreement."""
    wide = scores.pivot_table(index=["dataset", "subset", "method", "sample_id"], columns="arm", values="iou")
    side = scores[scores.arm == "auto"].set_index(["dataset", "subset", "method", "sample_id"]).polarity
    wide = wide.join(side.rename("auto_side")).reset_index()
    if {"bright", "dark"} <= set(wide.columns):
        has = wide.bright.notna() & wide.dark.notna()
        wide["oracle"] = np.where(has, np.fmax(wide.bright, wide.dark), np.nan)
        wide["oracle_side"] = np.where(has, np.where(wide.bright >= wide.dark, "bright", "dark"), None)
        wide["agree"] = np.where(has, wide["auto"] >= wide.oracle - 1e-12, np.nan)
    return wide


def unlabeled_sides(dataset: str, methods, scratch: Path) -> str:
    """The side auto takes per record of a dataset without expert masks (dicom): what there is to report."""
    out = ["| file | modality | photometric | size | " + " | ".join(methods) + " |", "|---|---|---|---|" + "---|" * len(methods)]
    got = {}
    with dask_client(1, quiet=True) as client:
        for m in methods:
            cfg = load_dataset_file(MANIFESTS / f"{dataset}.yaml", [
                f"threshold.method={m}", f"out={scratch / f'{dataset}-{m}.zarr'}", f"runtime.salt={SALT}",
                "runtime.workers=1", f"runtime.scheduler={client.scheduler.address}", "runtime.progress=false"])
            build(cfg, overwrite=True)
            got[m] = manifest.read_manifest(cfg.out)
    first = got[methods[0]]
    for i, r in first[(first.frame == 0) & (first.reason_code != "not_an_image")].iterrows():
        side = [got[m].polarity[i] if got[m].status[i] == "ok" else got[m].reason_code[i] for m in methods]
        size = f"{r.orig_width}x{r.orig_height}" if r.status == "ok" else "-"
        out.append(f"| {Path(r.source).name} | {r.modality} | {r.photometric} | {size} | " + " | ".join(side) + " |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- tables


def summary_rows(wide: pd.DataFrame, datasets, methods) -> list[dict]:
    rows = []
    for ds in datasets:
        d = wide[wide.dataset == ds]
        subsets = ["all"] + (sorted(set(d.subset)) if d.subset.nunique() > 1 else [])
        for sub in subsets:
            for m in methods:
                r = d[(d.method == m) & ((d.subset == sub) | (sub == "all"))]
                if r.empty:
                    continue
                row = {"dataset": ds, "subset": sub, "n": len(r), "method": m}
                for p in ("auto", "oracle", "bright", "dark"):
                    row[p] = round(float(r[p].mean()), 4) if p in r and r[p].notna().all() else None
                sided = "agree" in r and r.agree.notna().all()
                row["agree"] = int(r.agree.sum()) if sided else None
                row["bright_auto"] = int((r.auto_side == "bright").sum())
                rows.append(row)
    return rows


def fmt(x, nd=3) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def summary_table(rows: list[dict]) -> str:
    out = ["| dataset | subset | n | method | auto | oracle | bright | dark | auto = oracle side | auto took bright |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        agree = "-" if r["agree"] is None else f"{r['agree']}/{r['n']} ({r['agree'] / r['n']:.0%})"
        out.append(f"| {r['dataset']} | {r['subset']} | {r['n']} | {r['method']} | {fmt(r['auto'])} | {fmt(r['oracle'])} | "
                   f"{fmt(r['bright'])} | {fmt(r['dark'])} | {agree} | {r['bright_auto']}/{r['n']} |")
    return "\n".join(out)


def disagreements(wide: pd.DataFrame, method: str = "otsu") -> str:
    """Listed for the small datasets; the large ones are counted in the summary only."""
    d = wide[(wide.method == method) & (wide.agree == 0) & ~wide.dataset.isin(LARGE)]
    out = ["| dataset | image | auto | oracle | IoU bright | IoU dark |", "|---|---|---|---|---:|---:|"]
    out += [f"| {r.dataset} | {r.sample_id} | {r.auto_side} | {r.oracle_side} | {r.bright:.3f} | {r.dark:.3f} |"
            for r in d.itertuples()]
    return "\n".join(out)


def lowest(wide: pd.DataFrame, method: str = "fov_otsu_hull", k: int = 5) -> str:
    out = ["| dataset | lowest auto IoUs (image IoU, side) |", "|---|---|"]
    for ds, d in wide[wide.method == method].groupby("dataset", sort=False):
        d = d.nsmallest(k, "auto")
        out.append(f"| {ds} | " + ", ".join(f"{r.sample_id} {r.auto:.2f} {r.auto_side}" for r in d.itertuples()) + " |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- native images: rules and timing


def native_gray(source: str, fmt_: str) -> np.ndarray:
    """Frame 0 as build-masks reads it (the pipeline's readers: grayscale, modality LUT, MONOCHROME1)."""
    return read(Path(source), fmt_, [0])[0].pixels


def _alternative_sides(gray: np.ndarray, t: float) -> dict[str, str]:
    """Simpler polarity rules measured against the module's one (all on a <=256 px strided copy)."""
    from skimage.segmentation import clear_border

    step = max(1, -(-max(gray.shape) // 256))
    b = gray[::step, ::step] > t
    edge = np.concatenate([b[0], b[-1], b[:, 0], b[:, -1]])
    h, w = b.shape
    yy, xx = np.ogrid[:h, :w]
    centre = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 < 0.25
    return {
        "border": "bright" if edge.mean() < 0.5 else "dark",  # the side touching the image border less
        "interior": "bright" if clear_border(b).sum() > clear_border(~b).sum() else "dark",  # more area off the border
        "minority": "bright" if b.mean() < 0.5 else "dark",  # the smaller side
        "centre": "bright" if b[centre].mean() > b.mean() else "dark",  # over-represented in the central disc
    }


RULES = ("border", "interior", "minority", "centre", "auto")


def compare_rules(scores: pd.DataFrame, wide: pd.DataFrame, datasets) -> list[dict]:
    """auto = oracle agreement (plain otsu arms) of simple rules and of the auto rule, per dataset. The threshold is
    the one the otsu store recorded; the oracle side comes from the stored bright/dark masks."""
    rows = []
    for ds in datasets:
        w = wide[(wide.dataset == ds) & (wide.method == "otsu")].set_index("sample_id")
        if "agree" not in w or w.agree.isna().any():
            continue
        s = scores[(scores.dataset == ds) & (scores.method == "otsu") & (scores.arm == "bright")]
        hits = dict.fromkeys(RULES, 0)
        for r in s.itertuples():
            sides = _alternative_sides(native_gray(r.source, r.format), r.threshold) | {"auto": w.auto_side[r.sample_id]}
            best = w.oracle[r.sample_id]
            for n in RULES:
                hits[n] += bool(w[sides[n]][r.sample_id] >= best - 1e-12)
        rows.append({"dataset": ds, "n": len(s), **hits})
    return rows


def rules_table(rows: list[dict]) -> str:
    out = ["| dataset | n | " + " | ".join(RULES) + " |", "|---|---:|" + "---:|" * len(RULES)]
    out += [f"| {r['dataset']} | {r['n']} | " + " | ".join(f"{r[k]}/{r['n']}" for k in RULES) + " |" for r in rows]
    return "\n".join(out)


def timing(scores: pd.DataFrame, methods, repeat: int) -> dict:
    """Per-image thresholding cost of each method on the same native images, interleaved; ratios to otsu."""
    picks = (scores[(scores.method == methods[0]) & (scores.arm == "auto") & scores.dataset.isin(TIMING_DATASETS)]
             .sort_values("sample_id").groupby("dataset", sort=False).head(TIMING_PER_DATASET))
    per = {m: [] for m in methods}
    pixels = []
    for r in picks.itertuples():
        gray = native_gray(r.source, r.format)
        pixels.append(gray.size)
        ts = {m: [] for m in methods}
        for _ in range(repeat):
            for m in methods:
                t0 = time.perf_counter()
                th.pseudo_mask(gray, method=m, polarity="auto")
                ts[m].append(time.perf_counter() - t0)
        for m in methods:
            per[m].append(float(np.median(ts[m])))
    total = {m: float(np.sum(v)) for m, v in per.items()}
    base = total.get("otsu") or next(iter(total.values()))
    return {"images": len(pixels), "datasets": sorted(set(picks.dataset)), "median_pixels": int(np.median(pixels)),
            "repeat": repeat, "ms_per_image": {m: round(1e3 * total[m] / len(pixels), 2) for m in methods},
            "ratio_to_otsu": {m: round(total[m] / base, 2) for m in methods}}


def build_cost(builds: list[dict]) -> dict:
    """Task CPU seconds of the auto builds, summed over the datasets built with every method; ratio to the otsu
    builds (decode + threshold + resize + write: what build-masks costs as a whole)."""
    auto = pd.DataFrame([b for b in builds if b["polarity"] == "auto"])
    n_methods = auto.method.nunique()
    full = auto.groupby("dataset").method.nunique().loc[lambda n: n == n_methods].index
    tot = auto[auto.dataset.isin(full)].groupby("method", sort=False).task_cpu_seconds.sum()
    return {m: {"cpu_seconds": round(float(v), 1), "ratio_to_otsu": round(float(v / tot.get("otsu", v)), 2)}
            for m, v in tot.items()}


def timing_table(t: dict, cost: dict) -> str:
    out = [f"{t['images']} images ({', '.join(t['datasets'])}; median {t['median_pixels'] / 1e6:.2f} Mpx), "
           f"median of {t['repeat']} runs each, polarity=auto. Whole build: the auto builds of the datasets built with "
           "every method, summed.", "",
           "| method | thresholding ms/image | x otsu | whole build (task CPU s) | x otsu |",
           "|---|---:|---:|---:|---:|"]
    for m, ms in t["ms_per_image"].items():
        c = cost.get(m, {})
        out.append(f"| {m} | {ms:.1f} | {t['ratio_to_otsu'][m]:.2f} | {fmt(c.get('cpu_seconds'), 1)} | "
                   f"{fmt(c.get('ratio_to_otsu'), 2)} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--methods", nargs="+", default=list(th.METHODS), choices=th.METHODS)
    ap.add_argument("--scratch", type=Path, help="folder for the scratch stores (default: a temporary folder)")
    ap.add_argument("--repeat", type=int, default=3, help="timing runs per image and method")
    ap.add_argument("--out", type=Path, help="write OUT.md (the tables) and OUT.json (the figures)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pmq-", dir=args.scratch) as tmp:
        scores, builds = run(args.datasets, args.methods, Path(tmp))
        wide = per_image(scores)
        rows = summary_rows(wide, args.datasets, args.methods)
        rules = compare_rules(scores, wide, args.datasets) if "otsu" in args.methods else []
        t = timing(scores, args.methods, args.repeat)
        dicom = unlabeled_sides("dicom", [m for m in LARGE_METHODS if m in args.methods], Path(tmp))
    cost = build_cost(builds)
    sizes = scores.groupby("dataset", sort=False)["size"].first().to_dict()
    cmd = "python benchmarks/pseudo_mask_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        f"<!-- generated by: {cmd} ({time.perf_counter() - t0:.0f} s) -->", "",
        "Store sizes: " + ", ".join(f"{d} {s}x{s}" for d, s in sizes.items()) + ".", "",
        "## Mean per-image IoU of the stored pseudo-masks vs the stored expert masks", "", summary_table(rows), "",
        "## Images where auto and oracle sides differ (method otsu)", "", disagreements(wide), "",
        "## Lowest fov_otsu_hull IoUs, polarity auto", "", lowest(wide), "",
        "## Simpler polarity rules vs the auto rule (plain otsu, rule = oracle side)", "", rules_table(rules), "",
        "## Images without expert masks: the side auto takes (dicom, frame 0)", "", dicom, "",
        "## Timing", "", timing_table(t, cost), ""])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"command": cmd, "seconds": round(time.perf_counter() - t0), "store_size": sizes, "summary": rows,
             "rules": rules, "timing": t, "build_cost": cost, "builds": builds}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
