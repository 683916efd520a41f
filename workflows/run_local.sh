#!/usr/bin/env bash
# The whole method on one workstation, one command; every step is an existing CLI:
#   1. medsass-prep build-masks --dataset DATASET_YAML --out OUT/store.zarr $PREP_ARGS
#   2. medsass-train run TRAIN_CONFIG --set stores.main=OUT/store.zarr --set out_dir=OUT/run [options]
#      (the config's stages: pretrain -> finetune -> evaluate)
#   3. medsass-prep report OUT/store.zarr --out OUT/store_report.html
#   4. medsass-train report OUT/run --out OUT/run_report.html
#
#   workflows/run_local.sh data_manifests/ph2_dermoscopy.yaml cpu_small out/ph2 --set pretrain.steps=100
#
# Options after OUT go to medsass-train run. PREP_ARGS (environment) adds build-masks flags, e.g.
# PREP_ARGS="--size 128 --workers 4". MEDSASS_STORE_NAME (default main) is the store's key in the config.
# With several GPUs (GPUS, see medsass.env) training runs under torchrun. Every step resumes or skips
# what is already done, so re-running the same command after an interruption continues where it stopped.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"
if [ $# -lt 3 ]; then
  echo "usage: $0 DATASET_YAML TRAIN_CONFIG OUT [medsass-train options, e.g. --set pretrain.steps=100]" >&2
  exit 2
fi
dataset=$1 config=$2 out=$3
shift 3
store="$out/store.zarr" run="$out/run"
: "${PREP_ARGS:=}" "${MEDSASS_STORE_NAME:=main}"
mkdir -p "$out"

step() {  # step NAME CMD...: run and time one step
  local name=$1 t0=$SECONDS rc=0
  shift
  medsass_log "== $name: $*"
  "$@" || rc=$?
  medsass_log "== $name: exit $rc after $((SECONDS - t0)) s"
  return $rc
}

rc=0
# shellcheck disable=SC2086
step prep medsass-prep build-masks --dataset "$dataset" --out "$store" $PREP_ARGS || rc=$?
if [ $rc -eq 3 ]; then
  medsass_log "some inputs failed (see: medsass-prep inspect $store); training on the others"
elif [ $rc -ne 0 ]; then
  exit $rc
fi

nproc=$(medsass_nproc)
train=(medsass-train)
if [ "$nproc" -gt 1 ]; then
  train=(torchrun --standalone --nproc_per_node="$nproc" -m medsass.trainer.cli)
fi
step train "${train[@]}" run "$config" --set "stores.$MEDSASS_STORE_NAME=$store" --set "out_dir=$run" "$@"

step "store report" medsass-prep report "$store" --out "$out/store_report.html"
step "run report" medsass-train report "$run" --out "$out/run_report.html"
medsass_log "done: store $store, run $run (metrics: $run/evaluate/metrics.json)"
