"""Store-level polarity (``--polarity store``) and the implausible-coverage flag against per-image ``auto``, on the
real data sets: what each costs or gains in pseudo-mask IoU, and how precise its QC flags are.

    python benchmarks/polarity_qc.py                                   # every dataset file whose inputs are here
    python benchmarks/polarity_qc.py --datasets cxr_shenzhen,ph2_dermoscopy --size 128
    python benchmarks/polarity_qc.py --fixed                           # also build --polarity bright and dark

Each dataset file of data_manifests/ is built with ``pipeline.build`` (fixed salt, ``geometry.size`` = --size,
default method) into a scratch folder, once with ``--polarity auto`` and once with ``--polarity store``; datasets
whose inputs are absent are skipped. Per dataset it prints the mean per-image IoU of the stored pseudo-mask against
the stored label (``pipeline.report.pseudo_label_iou``, at the stored size) for each build, the store's decision and
its vote, the auto build's per-image sides, how many records got ``polarity_minority`` and ``fg_implausible``, and
how many of the flagged labelled records have a low IoU (< --low-iou): the flag's precision. Then a sweep of
coverage thresholds: real labels above each (``label_fg_fraction``, native resolution) against pseudo-masks above it
and their IoU. The expert masks are used for measuring only.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SALT = "polarity-qc"
SWEEP = (0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def build_store(ds: Path, out: Path, polarity: str, size: int, workers: int) -> Path | None:
    from medsass.pipeline.build import build
    from medsass.pipeline.config import load_dataset_file

    cfg = load_dataset_file(ds, [f"runtime.salt={SALT}", f"runtime.workers={workers}", "runtime.progress=false",
                                 f"geometry.size={size}", f"threshold.polarity={polarity}", f"out={out}"])
    if not all(Path(s.path).exists() for s in cfg.sources):
        return None
    build(cfg)
    return out


def records(path: Path):
    """The stored records of a store (manifest rows, row order) with their pseudo-mask IoU (NaN without a label)."""
    from medsass import manifest, store
    from medsass.pipeline.report import pseudo_label_iou

    df = manifest.read_manifest(path)
    ok = df[(df.status == "ok") & (df.row >= 0)].sort_values("row").reset_index(drop=True)
    group, info = store.open_store(path)
    iou = np.full(len(ok), np.nan)
    lab = ok.has_label.to_numpy(bool)
    if lab.any():
        iou[lab] = pseudo_label_iou(group, info, ok.row.to_numpy()[lab])
    ok["iou"] = iou
    ok["flagset"] = [set(f.split(",")) - {""} for f in ok.qc_flags]
    return ok, manifest.read_json(manifest.summary_path(path))


def mean(x) -> str:
    x = np.asarray(x, float)
    x = x[~np.isnan(x)]
    return f"{x.mean():.3f}" if len(x) else "-"


def flag_line(name: str, df, low: float) -> str:
    has = np.array([name in f for f in df.flagset], bool)
    lab = has & df.has_label.to_numpy(bool)
    iou = df.iou.to_numpy()
    n_low = int((iou[lab] < low).sum())
    prec = f"{n_low}/{int(lab.sum())} low IoU" if lab.any() else "no labelled ones"
    return f"{name}: {int(has.sum())} records ({prec}; mean IoU flagged {mean(iou[lab])}, unflagged {mean(iou[~has])})"


def report(name: str, auto, store, fixed: dict, low: float, fg_max: float) -> list[str]:
    vote = store[1].get("polarity_vote", {})
    a, s = auto[0], store[0]
    lab = a.has_label.to_numpy(bool)
    lines = [f"== {name}: {len(a)} records, {int(a.has_label.sum())} with a label"]
    iou_line = f"   mean IoU  auto {mean(a.iou)}  store {mean(s.iou)}"
    for pol, df in fixed.items():
        iou_line += f"  {pol} {mean(df[0].iou)}"
    keep_a, keep_s = ~a.degenerate.to_numpy(bool), ~s.degenerate.to_numpy(bool)
    iou_line += f"   | records pretraining keeps: auto {int(keep_a.sum())} (IoU {mean(a.iou[keep_a])}), " \
                f"store {int(keep_s.sum())} (IoU {mean(s.iou[keep_s])})"
    lines.append(iou_line)
    if lab.any():  # the base rate a flag's precision compares with
        lines.append(f"   low IoU (< {low}) among all labelled records: auto {int((a.iou[lab] < low).sum())}/{int(lab.sum())}, "
                     f"store {int((s.iou[lab] < low).sum())}/{int(lab.sum())}")
    sides = a.polarity.value_counts().to_dict()
    lines.append(f"   auto sides {dict(sorted(sides.items()))}; store decision {vote.get('polarity')} by vote "
                 f"{vote.get('votes')} of {vote.get('n_sampled')} sampled / {vote.get('n_inputs')} inputs"
                 f"{' (MIXED)' if vote.get('mixed') else ''}")
    lines.append("   " + flag_line("polarity_minority", s, low))
    minority = np.array(["polarity_minority" in f for f in s.flagset], bool) & lab
    if minority.any():  # the flag as a detector of auto's errors: were these records poor under auto?
        lines.append(f"      labelled minority records: IoU auto {mean(a.iou[minority])} -> store {mean(s.iou[minority])}; "
                     f"low IoU under auto {int((a.iou[minority] < low).sum())}/{int(minority.sum())}, "
                     f"under store {int((s.iou[minority] < low).sum())}/{int(minority.sum())}")
    lines.append("   " + flag_line("fg_implausible", s, low))
    big = (a.fg_fraction.to_numpy() > fg_max) & lab
    lines.append(f"      auto build, fg > {fg_max} (not flagged there): {int((a.fg_fraction > fg_max).sum())} records, "
                 f"{int((a.iou.to_numpy()[big] < low).sum())}/{int(big.sum())} labelled ones low IoU (mean {mean(a.iou[big])})")
    return lines


def sweep(stores: dict, low: float) -> list[str]:
    """Coverage thresholds: labels above each vs pseudo-masks above each (auto and store builds), pooled."""
    lines = ["== coverage sweep over all labelled records (label_fg_fraction and fg_fraction at native resolution)",
             "   t     | labels > t (datasets)             | auto: masks > t, low IoU, mean IoU | store: masks > t, low IoU, mean IoU"]
    for t in SWEEP:
        lab_over = {n: int((d["auto"][0].label_fg_fraction > t).sum()) for n, d in stores.items()}
        n_lab = sum(lab_over.values())
        where = ", ".join(f"{n} {c}" for n, c in lab_over.items() if c)
        cells = []
        for mode in ("auto", "store"):
            n_over = n_low = 0
            ious = []
            for d in stores.values():
                df = d[mode][0]
                over = (df.fg_fraction.to_numpy() > t) & df.has_label.to_numpy(bool)
                n_over += int(over.sum())
                n_low += int((df.iou.to_numpy()[over] < low).sum())
                ious += list(df.iou.to_numpy()[over])
            cells.append(f"{n_over:4d}, {n_low:4d}, {mean(ious)}")
        lines.append(f"   {t:.2f}  | {n_lab:3d} ({where or '-'})".ljust(46) + " | " + "      | ".join(cells))
    return lines


def main(argv: list[str] | None = None) -> int:
    from medsass.pipeline.methods import FG_IMPLAUSIBLE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="", help="comma-separated dataset file names (default: all whose inputs exist)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--low-iou", type=float, default=0.3, help="a flagged record with IoU below this is a true alarm")
    ap.add_argument("--fixed", action="store_true", help="also build --polarity bright and dark")
    args = ap.parse_args(argv)
    names = [n for n in args.datasets.split(",") if n]
    print(f"# benchmarks/polarity_qc.py --size {args.size}{' --fixed' if args.fixed else ''}; default method; "
          f"salt {SALT!r}; low IoU < {args.low_iou}; FG_IMPLAUSIBLE = {FG_IMPLAUSIBLE}")
    stores: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="polarity_qc_") as tmp:
        for ds in sorted((ROOT / "data_manifests").glob("*.yaml")):
            if names and ds.stem not in names:
                continue
            t0 = time.time()
            built = {}
            modes = ("auto", "store") + (("bright", "dark") if args.fixed else ())
            for mode in modes:
                try:
                    out = build_store(ds, Path(tmp) / f"{ds.stem}-{mode}.zarr", mode, args.size, args.workers)
                except Exception as exc:  # noqa: BLE001 - e.g. a dataset file whose inputs are absent
                    print(f"skip {ds.stem}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    out = None
                if out is None:
                    break
                built[mode] = records(out)
            if len(built) < len(modes):
                print(f"skip {ds.stem}: inputs not here", file=sys.stderr)
                continue
            stores[ds.stem] = built
            fixed = {m: built[m] for m in ("bright", "dark") if m in built}
            for line in report(ds.stem, built["auto"], built["store"], fixed, args.low_iou, FG_IMPLAUSIBLE):
                print(line)
            print(f"   ({time.time() - t0:.0f} s)", flush=True)
    labelled = {n: d for n, d in stores.items() if d["auto"][0].has_label.any()}
    for line in sweep(labelled, args.low_iou):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
