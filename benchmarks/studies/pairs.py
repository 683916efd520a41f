"""Paired differences between any two arms of a study, with the per-seed values behind them: the figures the
results docs quote that table.md does not print (two non-main targets against each other, a recipe's per-seed
pairs). The pairs and the interval are the report's own (``Index.pair`` / ``Index.diff``: same seed, same labels,
runs that share a start where both arms started from one pretraining).

An arm is ARM[:TARGET], ARM as table.md's rows name them in results.csv (scratch, end_to_end, ssl, encoder_only,
end_to_end+strong_aug, strategy:uncertain, ...); TARGET defaults to the dataset's main target.

    python benchmarks/studies/pairs.py benchmarks/studies/scale_cpu.yaml --dataset cxr_shenzhen \\
        --a end_to_end:fov_otsu_hull@store --b end_to_end:otsu --labels 1,10 --eval test,site:cxr_lungs
    python benchmarks/studies/pairs.py benchmarks/studies/scale_cpu.yaml --dataset nuclei_dsb2018 \
        --a end_to_end+long --b scratch+long --b-steps-factor 2 --labels 10,379   # against scratch at 2x the steps
"""
from __future__ import annotations

import argparse
from pathlib import Path

from medsass.trainer.study import ledger
from medsass.trainer.study.jobs import adopt_reruns, make_jobs
from medsass.trainer.study.report import Index, runs_from_ledger
from medsass.trainer.study.runner import prepare
from medsass.trainer.study.spec import load_study
from medsass.trainer.study.stats import micro_iou


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", type=Path)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--a", required=True, help="ARM[:TARGET], the minuend")
    ap.add_argument("--b", required=True, help="ARM[:TARGET], the subtrahend")
    ap.add_argument("--labels", required=True, help="comma-separated label counts, e.g. 1,2,10")
    ap.add_argument("--eval", default="test", help="comma-separated: test, val, site:NAME [test]")
    ap.add_argument("--steps-factor", type=int, default=1, help="the runs' fine-tune steps factor (2: the "
                    "convergence check's runs) [1]")
    ap.add_argument("--b-steps-factor", type=int, default=None,
                    help="the subtrahend's, where it differs: e.g. a model against scratch fine-tuned 2x as long")
    ap.add_argument("--errors", action="store_true", help="also each arm's false positives and false negatives per "
                    "seed, as shares of the true foreground (micro: pixels summed over the eval's images)")
    args = ap.parse_args()

    study, train = load_study(str(args.study), [])
    data = [d for d in prepare(study, [args.dataset], lambda *_: None, build_missing=False)]
    if not data:
        raise SystemExit(f"{args.dataset}: not in {args.study}, or its stores are not built here "
                         "(medsass-train study STUDY --dataset NAME --dry-run builds them)")
    d = data[0]
    rows = ledger.read_ledger(study.results_dir)
    idx = Index(runs_from_ledger(rows, adopt_reruns(make_jobs(study, train, data), rows)))

    def key(spec: str, where: str, n: int, factor: int) -> tuple:
        arm, _, target = spec.partition(":")
        return (d.name, where, target or d.main_target, arm, n, factor)

    for where in args.eval.split(","):
        for n in (int(x) for x in args.labels.split(",")):
            a = key(args.a, where, n, args.steps_factor)
            b = key(args.b, where, n, args.steps_factor if args.b_steps_factor is None else args.b_steps_factor)
            seeds = sorted(set(idx.counts.get(a, {})) & set(idx.counts.get(b, {})))
            per_seed = [(s, p) for s in seeds if (p := idx.pair(a, b, s)) is not None]
            e = idx.diff(a, b, study.bootstrap)
            if e is None:
                print(f"{where} {n} labels: {args.a} − {args.b}: no pair")
                continue
            seeds_txt = ", ".join(f"seed {s} {micro_iou(x) - micro_iou(y):+.4f}" for s, (x, y) in per_seed)
            print(f"{where} {n} labels: {args.a} − {args.b} = {e.mean:+.3f} [{e.lo:+.3f}, {e.hi:+.3f}] "
                  f"({e.n_seeds} seed{'s' if e.n_seeds > 1 else ''}; {seeds_txt})")
            if args.errors:
                for name, k in ((args.a, a), (args.b, b)):
                    print(f"    {name}: " + "; ".join(f"seed {s} {_errors(x if k == a else y)}" for s, (x, y) in per_seed))


def _errors(counts) -> str:
    """False positives and false negatives as shares of the true foreground, from (tp, fp, fn) rows."""
    tp, fp, fn = (float(v) for v in counts.sum(0))
    return f"FP {fp / (tp + fn):.3f}, FN {fn / (tp + fn):.3f}"


if __name__ == "__main__":
    main()
