"""Pseudo-label study: every threshold method and every self-training round, scored against expert masks.

    python benchmarks/pseudo_label_study.py --work runs/pls                       # all phases, skips what is done
    python benchmarks/pseudo_label_study.py --work runs/pls --datasets nuclei_sample --chains hard --rounds 1
    python benchmarks/pseudo_label_study.py --work runs/pls --phase table          # only re-write the tables

Phases (each skips finished work, so an interrupted study just runs again):

1. ``build``: one store per dataset x threshold method (``medsass-prep build-masks --dataset
   data_manifests/<ds>.yaml --set threshold.method=<m> --set geometry.size=128 --salt medsass-study``);
   the split seed and salt are fixed, so every method's store has the same splits.
2. ``selftrain``: on the store of the method with the best **val** pseudo-mask IoU (the only use of
   labels besides measuring), pretrain round 0 on its pseudo-masks (train + val images, no labels),
   then one self-training chain per rule: ``hard`` (p >= 0.5), ``hardm`` (p >= t, t matching the parent's
   foreground fraction), ``softw`` (soft labels re-centred at that t, confidence weights |2p-1| in the
   loss) and ``softt`` (the same soft labels as focal-Tversky targets). Each chain
   pretrains ``--rounds`` rounds; the labels of one more round are written (prediction only) so every
   chain's last model is also scored as a labeler.
3. ``table``: ``docs/results/pseudo_labels/table.md`` (and ``<work>/study.json``).

Scores are mean per-image IoU (empty prediction on empty mask = 1) against the expert masks, at the
stored 128 px, on the labeled records of each split. "pool" = train + val, the images that are
re-labelled and pretrained on (their expert masks are never used there). For a self-training round the
test column scores the *labeler* (the previous round's model) on the test images, which are never
re-labelled: a held-out view of the same rule.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("ph2_dermoscopy", "cxr_lungs", "nuclei_sample")
SHORT = {"ph2_dermoscopy": "PH2", "cxr_lungs": "CXR", "nuclei_sample": "nuclei"}
CHAINS = {  # prefix -> (selftrain.mode, loss.soft_labels, selftrain.threshold)
    "hard": ("hard", "threshold", 0.5),
    "hardm": ("hard", "threshold", "match_fg"),
    "softw": ("soft", "weight", "match_fg"),
    "softt": ("soft", "target", "match_fg"),
}
SPLITS = ("pool", "val", "test")
DEFAULT_STEPS = 120


def methods() -> tuple[str, ...]:
    from medsass.pipeline.threshold import METHODS

    return METHODS


def store_path(work: Path, ds: str, method: str) -> Path:
    return work / "stores" / ds / f"{method}.zarr"


def build(work: Path, ds: str, size: int) -> None:
    for m in methods():
        out = store_path(work, ds, m)
        if (out / "manifest.json").exists():
            continue
        cmd = ["medsass-prep", "build-masks", "--dataset", str(REPO / "data_manifests" / f"{ds}.yaml"), "--set", f"threshold.method={m}",
               "--set", f"geometry.size={size}", "--salt", "medsass-study", "--out", str(out), "--workers", "1", "--no-progress"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def split_rows(store: Path) -> dict[str, np.ndarray]:
    from medsass.manifest import read_manifest

    df = read_manifest(store)
    df = df[(df["status"] == "ok") & (df["row"] >= 0) & df["has_label"]]
    rows = {sp: df.loc[df["split"] == sp, "row"].to_numpy(np.int64) for sp in ("train", "val", "test")}
    rows["pool"] = np.sort(np.concatenate([rows["train"], rows["val"]]))
    return rows


def threshold_scores(work: Path, ds: str) -> dict[str, dict[str, float]]:
    from medsass.trainer.selftrain import mask_quality

    out = {}
    for m in methods():
        store = store_path(work, ds, m)
        out[m] = {sp: mask_quality(store, "pseudo_mask", r)["iou_per_image_mean"] for sp, r in split_rows(store).items()}
        out[m]["n"] = {sp: len(r) for sp, r in split_rows(store).items()}
    return out


def choose(scores: dict[str, dict[str, float]]) -> str:
    """The method with the best val IoU (ties: the better pool IoU is NOT used, the method order is)."""
    return max(methods(), key=lambda m: (round(scores[m]["val"], 6), -methods().index(m)))


def train_config(work: Path, ds: str, method: str, args) -> dict:
    return {
        "out_dir": str(work / "runs" / ds / f"{method}{args.tag}"),
        "stores": {"main": str(store_path(work, ds, method))},
        "seed": args.seed,
        "model": {"encoder": args.encoder, "decoder_attention_type": None if args.attention == "none" else args.attention},
        "pretrain": {"splits": ["train", "val"], "steps": args.steps, "batch_size": 8, "eval_every": 0,
                     "checkpoint_every": args.steps, "log_every": 10},
        "evaluate": {"splits": ["test"], "overlays": 0, "batch_size": 32},
        "runtime": {"num_workers": 0, "threads": 1, "progress": False, "tensorboard": False},
    }


def selftrain(work: Path, ds: str, method: str, args) -> dict:
    from medsass.trainer.config import load_config
    from medsass.trainer.run import run_stages
    from medsass.trainer.selftrain import (
        label_name,
        mask_quality,
        relabel,
        run_selftrain,
    )

    base = train_config(work, ds, method, args)
    run_stages(load_config(base), ["pretrain"])
    r0 = Path(base["out_dir"]) / "pretrain" / "final.pt"
    store = Path(base["stores"]["main"])
    rows = split_rows(store)
    results = {}
    for chain in args.chains:
        mode, soft_labels, threshold = CHAINS[chain]
        prefix = chain + args.tag
        cfg = {**base, "loss": {"soft_labels": soft_labels},
               "selftrain": {"rounds": max(args.rounds, 1), "name": prefix, "mode": mode, "threshold": threshold, "source": str(r0)}}
        t0 = time.time()
        if args.rounds:
            res = run_selftrain(load_config(cfg))
        else:  # labels of round 1 only (from the round-0 model), no pretraining on them
            from medsass.trainer.selftrain import zero_shot_metrics

            zs = zero_shot_metrics(load_config(cfg), r0, Path(base["out_dir"]) / "selftrain" / label_name(prefix, 0))
            res = {"rounds": [{"round": 0, "target": "pseudo_mask", "checkpoint": str(r0), "zero_shot": zs}]}
        # one more round of labels from the chain's last model: scores it as a labeler (no pretrain on them)
        last = res["rounds"][-1]
        extra = label_name(prefix, args.rounds + 1)
        from medsass.trainer.selftrain import provenance

        if provenance(store, extra) is None:
            relabel(store, last["checkpoint"], extra, splits=["train", "val"], mode=mode, threshold=threshold,
                    parent_target=last["target"], round=args.rounds + 1)
        labels = {}
        for r in range(1, args.rounds + 2):
            target = f"pseudo_labels/{label_name(prefix, r)}"
            labels[r] = {sp: mask_quality(store, target, rows[sp])["iou_per_image_mean"] for sp in ("pool", "val")}
            labels[r]["test"] = labeler_test(store, label_name(prefix, r), rows["test"])
        results[prefix] = {"chain": chain, "steps": args.steps, "rounds": res["rounds"], "labels": labels, "seconds": time.time() - t0}
        print(f"{ds} {prefix}: {json.dumps(labels)}", flush=True)
    return results


def labeler_test(store: Path, name: str, rows: np.ndarray) -> float:
    """Mean per-image IoU on the (never re-labelled) test images of the rule that made pseudo_labels/<name>:
    its source model's p >= its threshold."""
    import torch
    from medsass.trainer.metrics import iou
    from medsass.trainer.selftrain import load_model, probabilities, provenance
    from medsass.trainer.stream import ArrayReader, read_rows

    from medsass.store import IMAGE, LABEL

    prov = provenance(store, name)
    model, _ = load_model(prov["source_checkpoint"], torch.device("cpu"))
    pred = probabilities(model, read_rows(ArrayReader(store, IMAGE), rows), device=torch.device("cpu")) >= prov["rule"]["threshold"]
    label = read_rows(ArrayReader(store, LABEL), rows) > 0
    return float(np.mean(iou((pred & label).sum((1, 2)), (pred & ~label).sum((1, 2)), (~pred & label).sum((1, 2)))))


def backfill(study: dict, work: Path) -> None:
    """Add the labeler's test IoU to chains recorded before it was measured."""
    from medsass.trainer.selftrain import label_name

    for ds, entry in study.items():
        store = store_path(work, ds, entry["chosen"])
        test = split_rows(store)["test"]
        for prefix, chain in entry.get("selftrain", {}).items():
            for r, lab in chain["labels"].items():
                if "test" not in lab:
                    lab["test"] = labeler_test(store, label_name(prefix, int(r)), test)


def zero_shot(entry: dict) -> tuple[float | None, float | None]:
    m = (entry.get("zero_shot") or {}).get("test") or {}
    return m.get("iou_per_image_mean"), (m.get("otsu_floor") or {}).get("iou_per_image_mean")


def fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def chain_names(study: dict, dss: list[str]) -> list[str]:
    names = {p for d in dss for p in study[d].get("selftrain", {})}
    return sorted(names, key=lambda p: (list(CHAINS).index(p.split("_")[0]), p))


def write_table(study: dict, path: Path, args) -> None:
    dss = [d for d in DATASETS if d in study]
    lines = [
        "# Pseudo-label quality: threshold methods and self-training rounds",
        "",
        f"Written by `benchmarks/pseudo_label_study.py` ({args.encoder} U-Net, decoder attention {args.attention}, pretraining",
        f"{DEFAULT_STEPS} steps of batch 8 (a chain tagged `_s<N>`: N steps), 128 px, seed {args.seed}).",
        "Mean per-image IoU against the expert masks. pool = train + val (re-labelled and pretrained on, expert masks",
        "unused); val = its labeled validation part, the only split used to choose; test = never re-labelled: for a",
        "self-training round it scores the labeler (the previous round's model) on the test images.",
        "",
        "## Pseudo-labels",
        "",
        "| pseudo-labels | " + " | ".join(f"{SHORT[d]} pool | {SHORT[d]} val | {SHORT[d]} test" for d in dss) + " |",
        "|---|" + "---:|---:|---:|" * len(dss),
    ]
    for m in methods():
        cells = []
        for d in dss:
            s = study[d]["thresholds"][m]
            star = "**" if m == study[d]["chosen"] else ""
            cells += [f"{star}{fmt(s[sp])}{star}" for sp in SPLITS]
        lines.append(f"| {m}{' (paper: plain Otsu)' if m == 'otsu' else ''} | " + " | ".join(cells) + " |")
    n_rounds = max((len(c["labels"]) for d in dss for c in study[d].get("selftrain", {}).values()), default=0)
    for prefix in chain_names(study, dss):
        for r in range(1, n_rounds + 1):
            cells, any_ = [], False
            for d in dss:
                chain = study[d].get("selftrain", {}).get(prefix)
                lab = (chain or {}).get("labels", {}).get(str(r)) or (chain or {}).get("labels", {}).get(r)
                if lab is None:
                    cells += ["", "", ""]
                    continue
                any_ = True
                cells += [fmt(lab["pool"]), fmt(lab["val"]), fmt(lab.get("test"))]
            if any_:
                lines.append(f"| self-training `{prefix}` r{r} | " + " | ".join(cells) + " |")
    lines += ["", "Chosen by val (bold): " + ", ".join(f"{SHORT[d]} `{study[d]['chosen']}`" for d in dss) + ".",
              "Self-training starts from the chosen method's pseudo-masks. Rules: `hard` p >= 0.5; `hardm` p >= t with t",
              "matching the parent's foreground fraction (label-free); `softw` / `softt` the same labels stored soft",
              "(re-centred at t), pretrained with confidence weights / as soft focal-Tversky targets. Round r's labels",
              "come from round r-1's model; `hardm`, `softw` and `softt` r1 are the same masks (thresholded).", ""]
    lines += ["## Models: zero-shot test IoU of the U-Net pretrained on each target", "",
              "| pretrained on | " + " | ".join(SHORT[d] for d in dss) + " |", "|---|" + "---:|" * len(dss)]
    tags = sorted({p[len(p.split("_")[0]):] for d in dss for p in study[d].get("selftrain", {})})
    for tag in tags:  # one round-0 model per tag (another --steps)
        cells = []
        for d in dss:
            chain = next((c for p, c in study[d].get("selftrain", {}).items() if p[len(p.split("_")[0]):] == tag), None)
            cells.append(fmt(zero_shot(chain["rounds"][0])[0]) if chain else "")
        lines.append(f"| chosen threshold method (round 0{', `' + tag + '`' if tag else ''}) | " + " | ".join(cells) + " |")
    for prefix in chain_names(study, dss):
        for r in range(1, n_rounds):
            cells, any_ = [], False
            for d in dss:
                chain = study[d].get("selftrain", {}).get(prefix)
                if not chain or r >= len(chain["rounds"]):
                    cells.append("")
                    continue
                any_ = True
                cells.append(fmt(zero_shot(chain["rounds"][r])[0]))
            if any_:
                lines.append(f"| `{prefix}` r{r} labels (loss.soft_labels={CHAINS[prefix.split('_')[0]][1]}) | " + " | ".join(cells) + " |")
    lines.append("| (test pseudo-masks of the chosen method, for reference) | "
                 + " | ".join(fmt(study[d]["thresholds"][study[d]["chosen"]]["test"]) for d in dss) + " |")
    lines += ["", "n (labeled records) pool / val / test: "
              + "; ".join(f"{SHORT[d]} {'/'.join(str(study[d]['thresholds']['otsu']['n'][sp]) for sp in SPLITS)}" for d in dss) + ".", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "pls")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--phase", choices=("all", "build", "selftrain", "table"), default="all")
    ap.add_argument("--chains", nargs="+", default=list(CHAINS), choices=list(CHAINS))
    ap.add_argument("--rounds", type=int, default=2, help="pretrained rounds per chain; 0: only round 1's labels")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--encoder", default="tu-mobilenetv3_small_100")
    ap.add_argument("--attention", choices=("none", "scse"), default="none", help="decoder attention (scSE doubles a CPU step)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the run folder and chain names (e.g. _s360 for another --steps)")
    ap.add_argument("--table", type=Path, default=REPO / "docs" / "results" / "pseudo_labels" / "table.md")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    study_file = args.work / "study.json"
    study = json.loads(study_file.read_text()) if study_file.exists() else {}
    for ds in args.datasets:
        t0 = time.time()
        if args.phase in ("all", "build"):
            build(args.work, ds, args.size)
        if args.phase == "build":
            continue
        entry = study.setdefault(ds, {})
        entry["thresholds"] = threshold_scores(args.work, ds)
        entry["chosen"] = choose(entry["thresholds"])
        if args.phase in ("all", "selftrain"):
            entry.setdefault("selftrain", {}).update(selftrain(args.work, ds, entry["chosen"], args))
        entry["seconds"] = entry.get("seconds", 0) + time.time() - t0
        study_file.parent.mkdir(parents=True, exist_ok=True)
        study_file.write_text(json.dumps(study, indent=1, default=str))
    if args.phase in ("all", "table", "selftrain"):
        backfill(study, args.work)
        study_file.write_text(json.dumps(study, indent=1, default=str))
        write_table(study, args.table, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
