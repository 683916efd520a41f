#!/usr/bin/env bash
# Every CPU study behind docs/results/label_efficiency.md, in order (each resumable; finished runs are skipped):
#   bash benchmarks/studies/run_cpu.sh
# 1. cpu.yaml: the main grid (5 datasets x 5 budgets x 3 arms x 3 seeds) + threshold methods as targets (seed 0);
# 2. cpu_fov_otsu_hull.yaml: the arms pretrained on region-aware fov_otsu_hull pseudo-masks (issue 6), PH2 + CXR;
# 3. cpu_finetune100.yaml: scratch vs end-to-end with 4x longer fine-tuning (is scratch just undertrained?);
# 4. cpu_finetune100_fov.yaml: the same control for the fov_otsu_hull target, then its paired difference
#    against the otsu target (docs/results/label_efficiency/finetune100_fov_vs_otsu.md).
set -uo pipefail
cd "$(dirname "$0")/../.."
rc=0
for study in cpu cpu_fov_otsu_hull cpu_finetune100 cpu_finetune100_fov; do
  python benchmarks/label_efficiency.py "benchmarks/studies/$study.yaml" "$@" || rc=$?
done
res=docs/results/label_efficiency
python benchmarks/label_efficiency.py compare $res/finetune100_fov_otsu_hull/results.csv $res/finetune100/results.csv \
  > $res/finetune100_fov_vs_otsu.md || rc=$?
exit $rc
