"""What the labeling strategies of a study picked: the picked images' pseudo-mask quality, against the labeled train
split that ``random`` draws from (issue 11: why a strategy wins on one set and loses on another).

Reads the study's ledger (the labeled sample ids of every fine-tune run; a row is matched to the grid's run by its key,
as the report does) and the dataset's store of that target (its labels and pseudo-masks), and prints one markdown row per (strategy, labels): the runs (seeds), the distinct images picked over
them, the picks' mean pseudo-mask IoU with the label, the share of picks whose pseudo-mask IoU is below 0.5, their
mean label foreground fraction and image intensity, and the runs' test IoU (micro, mean over seeds).

    python benchmarks/studies/picks_profile.py benchmarks/studies/scale_cpu.yaml --dataset nuclei_dsb2018
    python benchmarks/studies/picks_profile.py benchmarks/studies/scale_cpu.yaml --dataset cxr_shenzhen \\
        --target fov_otsu_hull --set 'strategies.targets=[fov_otsu_hull]'   # the first runs, on the per-image target
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from medsass.trainer.study import ledger
from medsass.trainer.study.jobs import adopt_reruns, make_jobs, strategy_targets
from medsass.trainer.study.runner import prepare
from medsass.trainer.study.spec import load_study

from medsass.metrics import micro_iou

BAD = 0.5  # pseudo-mask IoU below this: the free target is mostly wrong on that image


def image_table(store: Path) -> pd.DataFrame:
    """Per labeled record: pseudo-mask IoU with the label, label foreground fraction, mean image intensity."""
    man = pd.read_parquet(store / "manifest.parquet")
    man = man[(man["status"] == "ok") & man["has_label"]].set_index("sample_id")
    group = zarr.open_group(str(store), mode="r")
    rows = man["row"].to_numpy()
    image, label, pseudo = (np.asarray(group[a].get_orthogonal_selection((rows,))) for a in ("image", "label", "pseudo_mask"))
    lab, pm = label > 0, pseudo > 0
    inter = (lab & pm).sum((1, 2))
    union = (lab | pm).sum((1, 2))
    return pd.DataFrame({"split": man["split"].to_numpy(), "pseudo_iou": np.where(union > 0, inter / np.maximum(union, 1), 1.0),
                         "label_fg": lab.mean((1, 2)), "intensity": image.reshape(len(rows), -1).mean(1) / 255},
                        index=man.index)


def profile(ids: list[str], table: pd.DataFrame) -> str:
    sub = table.loc[ids]
    return (f"{sub['pseudo_iou'].mean():.3f} | {(sub['pseudo_iou'] < BAD).mean():.0%} | {sub['label_fg'].mean():.3f} | "
            f"{sub['intensity'].mean():.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", type=Path)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--target", default=None, help="the pseudo-mask target of the end-to-end runs [strategies.targets' "
                    "first the dataset has, else its main target]")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="a study key, as medsass-train study --set")
    args = ap.parse_args()
    study, train = load_study(args.study, args.overrides)
    data = prepare(study, [args.dataset], log=lambda *_: None)
    if not data:
        raise SystemExit(f"{args.study}: no dataset {args.dataset!r} ({', '.join(d.name for d in study.datasets)})")
    d = data[0]
    target = args.target or (strategy_targets(study.strategies, d) if study.strategies else [d.main_target])[0]
    if target not in d.stores:
        raise SystemExit(f"--target {target}: {d.name} has {', '.join(d.stores)}")
    rows = ledger.read_ledger(study.results_dir)
    jobs = {j.key: j for j in adopt_reruns(make_jobs(study, train, data), rows)}  # runs from adopted reruns too
    table = image_table(Path(d.stores[target]))
    picks: dict[tuple[str, int], dict[int, tuple[list[str], float]]] = defaultdict(dict)
    for key, row in rows.items():
        j = jobs.get(key)
        if j is None or (j.kind, j.arm, j.target, j.recipe, j.steps_factor) != ("finetune", "end_to_end", target, None, 1):
            continue
        if j.partner_of:  # random picks run again from an adopted rerun: the same images; the table keeps the original's
            continue
        iou = micro_iou(np.asarray(row["evals"]["test"]["counts"]))
        picks[(j.strategy or "random", j.n_labels)][j.seed] = (row["labeled_ids"], iou)
    train = table[table["split"] == "train"]
    print(f"{args.dataset} ({target}): {len(train)} labeled train images; pseudo-mask IoU < {BAD} on "
          f"{(train['pseudo_iou'] < BAD).mean():.0%} of them\n")
    print("| strategy | labels | runs | distinct images | pseudo-mask IoU | IoU < 0.5 | label fg | intensity | test IoU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| labeled train split (what random draws from) | | | {len(train)} | {profile(list(train.index), table)} | |")
    for (strategy, n), runs in sorted(picks.items(), key=lambda kv: (kv[0][1], kv[0][0] != "random", kv[0][0])):
        ids = [i for run, _ in runs.values() for i in run]
        iou = np.mean([v for _, v in runs.values()])
        print(f"| {strategy} | {n} | {len(runs)} | {len(set(ids))} | {profile(ids, table)} | {iou:.3f} |")


if __name__ == "__main__":
    main()
