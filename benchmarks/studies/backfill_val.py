"""Give the pretraining lines of an older study ledger their val evaluation (what the ``keep_start`` arm needs).

Pretraining runs recorded before 2026-12-05 were scored on the test split and the sites only. This scores each one's
``final.pt`` (still in the study's out_dir) on the val split of its main store, exactly as the runner now does after
every pretraining, and appends the completed line to the ledger (a later line for the same key wins). Lines that
already have it, or whose checkpoint is gone, are left as they are.

    python benchmarks/studies/backfill_val.py benchmarks/studies/scale_cpu.yaml [--datasets cxr_shenzhen]
    medsass-train study benchmarks/studies/scale_cpu.yaml --report-only
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from medsass.trainer.study import ledger
from medsass.trainer.study.execute import evaluate_val
from medsass.trainer.study.jobs import make_jobs
from medsass.trainer.study.runner import prepare
from medsass.trainer.study.spec import load_study


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study")
    ap.add_argument("--datasets", default="", help="comma-separated dataset names (default: all)")
    args = ap.parse_args()
    study, train = load_study(args.study, [])
    names = [n for n in args.datasets.split(",") if n]
    jobs = make_jobs(study, train, prepare(study, names))
    rows = ledger.read_ledger(study.results_dir)
    done = 0
    for job in jobs:
        row = rows.get(job.key)
        if job.kind != "pretrain" or row is None or "val" in row.get("evals", {}):
            continue
        ckpt = Path(job.dir) / "pretrain" / "final.pt"
        if not ckpt.exists():
            print(f"skipped (no {ckpt}): {job.label}")
            continue
        t0 = time.time()
        row["evals"]["val"] = evaluate_val(job, ckpt)
        row["seconds"]["val"] = round(time.time() - t0, 1)
        row["note"] = (row.get("note", "") + "; " if row.get("note") else "") + "val evaluation added by backfill_val.py"
        ledger.append(study.results_dir, row)
        done += 1
        print(f"val for {job.label}: {len(row['evals']['val']['ids'])} images ({row['seconds']['val']} s)")
    print(f"{done} pretraining lines completed")


if __name__ == "__main__":
    main()
