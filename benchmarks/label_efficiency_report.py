"""Label-efficiency study (the small-set study), its report: ``results.csv`` (one row per run), ``table.md`` (mean ±
std over seeds and the paired per-seed difference of each arm against scratch) and ``plot.png``; and ``compare``,
the paired difference of one arm between two studies' results.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from label_efficiency_grid import ARMS, Job, Study
from label_efficiency_runs import cached_result

from medsass.errors import MedsassError

ARM_LABELS = {"scratch": "scratch", "encoder_only": "encoder-only", "end_to_end": "end-to-end",
              "zero_shot": "zero-shot (no labels)", "otsu_floor": "Otsu floor"}
CSV_COLUMNS = [
    "dataset", "target", "arm", "budget", "n_labels", "n_labeled_train", "seed", "iou", "iou_per_image_mean", "dice",
    "dice_per_image_mean", "n_test", "test_digest", "labeled_digest", "labeled_ids", "encoder", "size",
    "pretrain_steps", "finetune_steps", "batch_size", "seconds", "run_dir",
]


def collect(jobs: list[Job]) -> list[dict[str, Any]]:
    """The CSV rows of every finished job (in job order)."""
    rows = []
    for j in jobs:
        cached = cached_result(j)
        if cached:
            rows += cached
    return [{c: r.get(c, "") for c in CSV_COLUMNS} for r in rows]


def check_pairing(rows: list[dict[str, Any]]) -> list[str]:
    """Problems with the pairing: arms of one (dataset, seed, n) with different label subsets; different test sets."""
    problems = []
    by_ds: dict[str, set[str]] = defaultdict(set)
    subsets: dict[tuple, set[str]] = defaultdict(set)
    for r in rows:
        by_ds[r["dataset"]].add(r["test_digest"])
        if r["arm"] in ARMS:
            subsets[(r["dataset"], r["seed"], r["n_labels"])].add(r["labeled_digest"])
    problems += [f"{ds}: runs were evaluated on {len(d)} different test sets" for ds, d in by_ds.items() if len(d) > 1]
    problems += [f"{k}: arms used {len(v)} different label subsets" for k, v in subsets.items() if len(v) > 1]
    return problems


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            run_dir = Path(str(r["run_dir"]))  # relative to where the study ran (the repo root), not this machine's path
            if run_dir.is_absolute() and run_dir.is_relative_to(Path.cwd()):
                r = {**r, "run_dir": str(run_dir.relative_to(Path.cwd()))}
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) and k not in ("seconds",) else v) for k, v in r.items()})


def _stats(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, sd, n


def _fmt(values: list[float], signed: bool = False) -> str:
    mean, sd, n = _stats(values)
    if n == 0:
        return "–"
    s = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return s if n == 1 else f"{s} ± {sd:.3f}"


def _fmt_diff(diffs: list[float]) -> str:
    """Paired difference: mean ± sd over seeds, seeds with a gain; bold when it exceeds the seed spread."""
    mean, sd, n = _stats(diffs)
    if n == 0:
        return "–"
    text = f"{_fmt(diffs, signed=True)} ({sum(d > 0 for d in diffs)}/{n})"
    counts = n > 1 and abs(mean) > sd and (all(d > 0 for d in diffs) or all(d < 0 for d in diffs))
    return f"**{text}**" if counts else text


def _index(rows: list[dict[str, Any]]) -> dict[tuple, dict[int, float]]:
    """(dataset, target, arm, n_labels) -> seed -> micro IoU."""
    out: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in rows:
        out[(r["dataset"], r["target"], r["arm"], int(r["n_labels"]))][int(r["seed"])] = float(r["iou"])
    return out


def _paired(a: dict, b: dict) -> list[float]:
    """Per-seed differences a - b over the seeds both have."""
    return [a[k] - b[k] for k in sorted(a) if k in b]


def _diffs(idx, ds: str, target: str, arm: str, n: int, main_target: str) -> list[float]:
    return _paired(idx.get((ds, target, arm, n), {}), idx.get((ds, main_target, "scratch", n), {}))


def markdown(rows: list[dict[str, Any]], study: Study, header: list[str]) -> str:
    idx = _index(rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    lines = ["# Label efficiency: Otsu floor, zero-shot, scratch, encoder-only, end-to-end", "", *header, ""]
    lines += [
        "Micro IoU on the fixed, grouped test split (pixels pooled over the test images, threshold 0.5), mean ± sample "
        "std over seeds. Δ columns: the paired per-seed difference arm − scratch (same seed = same labeled images, same "
        "initial weights where not pretrained, same batch order), mean ± std over seeds, and (k/N) the seeds where the "
        "arm beat scratch. **Bold**: the difference exceeds its seed spread (|mean| > std) with all seeds on one side — "
        "the only differences we count as real. Budgets that give the same label count on a small train split are "
        "one run (listed together).", "",
    ]
    for ds in datasets:
        ds_rows = [r for r in rows if r["dataset"] == ds]
        main = next(r["target"] for r in ds_rows if r["arm"] in ("otsu_floor", "scratch"))
        any_r = ds_rows[0]
        floor = _fmt(list(idx.get((ds, main, "otsu_floor", 0), {}).values()))
        zs_by_seed = idx.get((ds, main, "zero_shot", 0), {})
        zs = list(zs_by_seed.values())
        zs_gain = _paired(zs_by_seed, idx.get((ds, main, "otsu_floor", 0), {}))
        if not zs and study.pretrain_from:  # the pretrain runs (floor, zero-shot) belong to another study
            src = Path(study.pretrain_from)
            src = src.relative_to(Path.cwd()) if src.is_relative_to(Path.cwd()) else src.name
            scores = f"Otsu floor and zero-shot: in the table of the study whose pretrain runs these are (out_dir `{src}`)."
        else:
            scores = (f"Otsu floor (pseudo-masks vs labels, test): **{floor}**. Zero-shot (pretrained U-Net, no labels): "
                      f"**{_fmt(zs)}** (vs floor {_fmt(zs_gain, signed=True)}).")
        lines += [f"## {ds}", "",
                  f"Test images: {any_r['n_test']}; labeled train images: {any_r['n_labeled_train']}; pretraining "
                  f"target: `{main}` pseudo-masks. {scores}", ""]
        arms = [a for a in ARMS if any(r["arm"] == a and r["target"] == main for r in ds_rows)]
        heads = [ARM_LABELS[a] for a in arms] + [f"Δ {ARM_LABELS[a]}" for a in arms if a != "scratch"]
        lines += ["| budget | labels | " + " | ".join(heads) + " |", "|---|---:|" + "---:|" * len(heads)]
        ns = sorted({int(r["n_labels"]) for r in ds_rows if r["arm"] in ARMS and r["target"] == main})
        for n in ns:
            budget = next(r["budget"] for r in ds_rows if r["arm"] in ARMS and int(r["n_labels"]) == n and r["target"] == main)
            cells = [_fmt(list(idx.get((ds, main, a, n), {}).values())) for a in arms]
            cells += [_fmt_diff(_diffs(idx, ds, main, a, n, main)) for a in arms if a != "scratch"]
            lines.append(f"| {budget} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
        others = list(dict.fromkeys(r["target"] for r in ds_rows if r["target"] != main))
        if others:
            lines += [f"### {ds}: pseudo-mask method as the pretraining target", ""]
            ns_m = sorted({int(r["n_labels"]) for r in ds_rows if r["arm"] in ARMS and r["target"] in others})
            arm_m = [a for a in ARMS if any(r["arm"] == a and r["target"] in others for r in ds_rows)]
            heads = ["Otsu floor", "zero-shot"] + [f"{ARM_LABELS[a]} @{n}" for n in ns_m for a in arm_m] + \
                    [f"Δ {ARM_LABELS[a]} @{n}" for n in ns_m for a in arm_m]
            lines += ["| target | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
            for t in [main] + others:
                cells = [_fmt(list(idx.get((ds, t, "otsu_floor", 0), {}).values())),
                         _fmt(list(idx.get((ds, t, "zero_shot", 0), {}).values()))]
                cells += [_fmt(list(idx.get((ds, t, a, n), {}).values())) for n in ns_m for a in arm_m]
                cells += [_fmt_diff(_diffs(idx, ds, t, a, n, main)) for n in ns_m for a in arm_m]
                lines.append(f"| `{t}` | " + " | ".join(cells) + " |")
            lines.append("")
            heads = [f"{ARM_LABELS[a]} @{n}" for n in ns_m for a in arm_m]
            lines += [f"Paired per-seed difference of each target against `{main}` as the target (same arm, labels, "
                      "seed):", "", "| target | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
            for t in others:
                cells = []
                for n in ns_m:
                    for a in arm_m:
                        cells.append(_fmt_diff(_paired(idx.get((ds, t, a, n), {}), idx.get((ds, main, a, n), {}))))
                lines.append(f"| `{t}` − `{main}` | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def _curve(ax, idx, key: tuple[str, str, str], min_points: int, **style) -> None:
    """Mean ± std IoU over seeds against the label count for one (dataset, target, arm), if it has enough points."""
    ns = sorted(n for (*k, n) in idx if tuple(k) == key)
    if len(ns) < min_points:
        return
    st = [_stats(list(idx[(*key, n)].values())) for n in ns]
    ax.errorbar(ns, [s[0] for s in st], yerr=[0 if math.isnan(s[1]) else s[1] for s in st], ms=4, capsize=3, **style)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # lazy: ~0.7 s, and only a report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = _index(rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    cols = min(3, len(datasets))
    nrows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    colors = {"scratch": "tab:gray", "encoder_only": "tab:blue", "end_to_end": "tab:red"}
    for ax, ds in zip(axes.flat, datasets):
        main = next(r["target"] for r in rows if r["dataset"] == ds and r["arm"] in ("otsu_floor", "scratch"))
        for arm in ARMS:
            _curve(ax, idx, (ds, main, arm), 1, color=colors[arm], marker="o", label=ARM_LABELS[arm])
        others = list(dict.fromkeys(t for (d, t, a, n) in idx if d == ds and t != main and a in ARMS))
        for t_i, t in enumerate(others):  # another pretraining target over >= 3 budgets (e.g. fov_otsu_hull): dashed
            for arm in ARMS[1:]:
                _curve(ax, idx, (ds, t, arm), 3, color=colors[arm], marker="s", ls="--", alpha=0.8 - 0.2 * t_i,
                       label=f"{ARM_LABELS[arm]} ({t})")
        for arm, style, color in (("otsu_floor", "--", "black"), ("zero_shot", ":", "tab:purple")):
            vals = list(idx.get((ds, main, arm, 0), {}).values())
            if vals:
                ax.axhline(_stats(vals)[0], ls=style, color=color, lw=1.2, label=f"{ARM_LABELS[arm]} {_stats(vals)[0]:.2f}")
        ax.set_xscale("log", base=2)
        ns_all = sorted({n for (d, t, a, n) in idx if d == ds and a in ARMS})
        ax.set_xticks(ns_all, [str(n) for n in ns_all])
        ax.minorticks_off()
        ax.set_title(f"{ds} (solid: pretrained on {main})", fontsize=10)
        ax.set_xlabel("labeled train images")
        ax.set_ylabel("test IoU (micro)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(study: Study, jobs: list[Job], header, log=print) -> list[dict[str, Any]]:
    """Write results.csv, table.md and plot.png; ``header(rows)`` gives the table's first lines."""
    rows = collect(jobs)
    if not rows:
        log("no finished runs yet: nothing to report")
        return rows
    problems = check_pairing(rows)
    if problems:
        raise MedsassError("pairing broken: " + "; ".join(problems))
    out = Path(study.results_dir)
    write_csv(rows, out / "results.csv")
    (out / "table.md").write_text(markdown(rows, study, header(rows)) + "\n")
    plot(rows, out / "plot.png")
    log(f"wrote {out / 'results.csv'} ({len(rows)} rows), {out / 'table.md'}, {out / 'plot.png'}")
    return rows


def compare(csv_a: str, csv_b: str, arm: str = "end_to_end") -> list[str]:
    """Paired per-seed differences a - b of ``arm`` between two results.csv (same dataset, label count, seed), e.g.
    the same arm pretrained on two targets in two studies. Rows that are not in both files are left out."""
    def load(path: str) -> dict[tuple, tuple[str, float]]:
        with open(path) as fh:
            return {(r["dataset"], int(r["n_labels"]), int(r["seed"])): (r["target"], float(r["iou"]))
                    for r in csv.DictReader(fh) if r["arm"] == arm}

    a, b = load(csv_a), load(csv_b)
    groups: dict[tuple, list[float]] = defaultdict(list)
    names: dict[tuple, tuple[str, str]] = {}
    for key in sorted(a.keys() & b.keys()):
        groups[key[:2]].append(a[key][1] - b[key][1])
        names[key[:2]] = (a[key][0], b[key][0])
    lines = [f"| dataset | labels | {arm}: target A − target B |", "|---|---:|---:|"]
    for (ds, n), diffs in groups.items():
        ta, tb = names[(ds, n)]
        lines.append(f"| {ds} | {n} | `{ta}` − `{tb}`: {_fmt_diff(diffs)} |")
    return lines
