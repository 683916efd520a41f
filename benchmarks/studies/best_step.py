"""Can one run tell whether its fine-tune was long enough? For every scratch fine-tune in a study's ledger that has
a partner at twice the steps (same dataset, seed and labeled images; the convergence check's pairs and the
step-only recipes'), where its best val checkpoint fell (best_step / steps) against what doubling the steps did to
test IoU. A run "flags itself" when its best val checkpoint is in the last fifth of the schedule (val IoU still
rising at the end); the summary says how often flagged and unflagged runs gained from the longer schedule.

    python benchmarks/studies/best_step.py benchmarks/studies/scale_cpu.yaml
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medsass.trainer.study import ledger
from medsass.trainer.study.spec import load_study
from medsass.trainer.study.stats import micro_iou

LATE = 0.8  # best_step / steps at or above this: the best val checkpoint is in the schedule's last fifth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", type=Path)
    args = ap.parse_args()
    study, _ = load_study(str(args.study), [])
    steps_only = {None} | {r.name for r in study.recipes if set(r.finetune) == {"steps"}}
    tol = study.convergence.tolerance if study.convergence else 0.01
    runs: dict[tuple, dict] = {}
    for r in ledger.read_ledger(study.results_dir).values():
        if (r.get("kind") != "finetune" or r.get("arm") != "scratch" or r.get("recipe") not in steps_only
                or "test" not in r.get("evals", {}) or r.get("train_metrics", {}).get("best_step") is None):
            continue
        key = (r["dataset"], r["seed"], json.dumps(r["labeled_ids"]), r["finetune_steps"])
        runs.setdefault(key, r)

    def test_iou(r: dict) -> float:
        return micro_iou(np.asarray(r["evals"]["test"]["counts"], dtype=np.float64).reshape(-1, 3))

    print("dataset | seed | labels | steps | best val step / steps | 2x steps − 1x, test IoU")
    flagged, unflagged = [], []
    for (name, seed, ids, steps), r in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[1]["n_labels"], kv[0][3], kv[0][1])):
        long = runs.get((name, seed, ids, steps * 2))
        if long is None:
            continue
        frac = r["train_metrics"]["best_step"] / r["train_metrics"]["step"]
        gain = test_iou(long) - test_iou(r)
        (flagged if frac >= LATE else unflagged).append(gain)
        print(f"{name} | {seed} | {r['n_labels']} | {steps} | {frac:.2f} | {gain:+.3f}")
    for what, gains in (("best val in the last fifth", flagged), ("best val earlier", unflagged)):
        g = np.array(gains)
        if len(g):
            print(f"{what}: {len(g)} runs; 2x steps gained >= {tol} in {int((g >= tol).sum())} of them; "
                  f"mean change {g.mean():+.3f}, median {np.median(g):+.3f}")


if __name__ == "__main__":
    main()
