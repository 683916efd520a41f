#!/usr/bin/env bash
# The GPU checks of issue 12 in one device call: the CUDA test, then benchmarks/gpu_throughput.py (U-Net resnet50,
# 256 px, bf16, channels_last, batch 16, 8 workers: trainer/configs/paper_gpu.yaml) on a real 256 px store, twice:
# with the config's in-memory cache (as training runs) and streaming every block from the store (in_memory_limit_mb=0).
#
#   1. here, on the CPU machine, once (~1 min; needs pip's index and ../shared/data):
#        bash benchmarks/gpu_check.sh prepare
#      -> .gpu_check/ (git-ignored via .git/info/exclude): wheels for what the device's python3 (3.12, with torch,
#         timm, scipy, skimage, pyarrow, pytest) lacks, and a 256 px store of ../shared/data/cxr_shenzhen (662 X-rays;
#         GPU_CHECK_DATA=<dataset yaml or folder> for another; the bundled sample when that is missing). About 40 MB.
#   2. device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_check"], timeout_s=540)
#      -> $OUT: nvidia_smi.txt, pytest.txt, gpu_throughput.{json,txt} (cached), gpu_throughput_stream.{json,txt}.
#      About 2-3 minutes after the machine's start; each step has its own timeout, so the whole stays under 8.
# The device's image is not this venv: .venv (6.5 GB) cannot travel, so the missing packages travel as wheels and
# medsass is put on the path as pyproject maps it (medsass.pipeline -> pipeline/, medsass.trainer -> trainer/).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.gpu_check
# imported by the benchmark (zarr stack, smp) and by the trainer tests' conftest (medsass.testing: pydicom, nibabel)
WHEELS=(zarr numcodecs donfig google-crc32c segmentation-models-pytorch pydicom nibabel)

prepare() {
    local py=${PY:-.venv/bin/python} data=${GPU_CHECK_DATA:-data_manifests/cxr_shenzhen.yaml}
    grep -qxF "/$DIR/" .git/info/exclude 2>/dev/null || echo "/$DIR/" >> .git/info/exclude
    mkdir -p "$DIR/whl"
    # the versions this venv runs, as cp312 manylinux wheels (the device's python3 is 3.12)
    local pins
    pins=$("$py" -c "import sys; from importlib.metadata import version; print(' '.join(f'{n}=={version(n)}' for n in sys.argv[1:]))" "${WHEELS[@]}")
    # shellcheck disable=SC2086
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DIR/whl" $pins
    if [[ $data == data_manifests/cxr_shenzhen.yaml && ! -d ../shared/data/cxr_shenzhen ]]; then
        echo "../shared/data/cxr_shenzhen is missing: the store is built from the bundled sample (16 tiles)" >&2
        data=data_manifests/sample.yaml
    fi
    "$py" benchmarks/gpu_throughput.py --data "$data" --size 256 --workdir "$DIR" --build-only
    du -sh "$DIR"
}

device() {
    : "${OUT:?run this on the device machine (OUT unset); here, run: bash benchmarks/gpu_check.sh prepare}"
    local store
    store=$(find "$DIR" -maxdepth 1 -name '*_256.zarr' | head -1)
    [[ -n $store ]] || { echo "no $DIR/*_256.zarr: run 'bash benchmarks/gpu_check.sh prepare' here and carry $DIR" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DIR"/whl/*.whl
    mkdir -p /tmp/shim/medsass
    for f in medsass/*.py; do ln -sf "$PWD/$f" /tmp/shim/medsass/; done
    ln -sfn "$PWD/pipeline" /tmp/shim/medsass/pipeline
    ln -sfn "$PWD/trainer" /tmp/shim/medsass/trainer
    export PYTHONPATH=/tmp/shim:/tmp/site PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
    python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print(torch.__version__, torch.cuda.get_device_name())"
    # -P: the repo root stays off sys.path, so 'medsass' is the shim's (the root's medsass/ lacks pipeline, trainer).
    # The store-building test is left out: prep's Dask does not travel (the store was built by 'prepare').
    local failed=0
    timeout 120 python3 -P -m pytest -q -rs -p no:cacheprovider \
        tests/trainer/test_augment.py::test_cuda_matches_cpu_with_a_cpu_generator tests/test_gpu_throughput.py \
        --deselect tests/test_gpu_throughput.py::test_store_built_from_the_bundled_sample 2>&1 \
        | tee "$OUT/pytest.txt" || failed=1  # the benchmarks still run; the exit status says it
    timeout 150 python3 benchmarks/gpu_throughput.py --store "$store" --out "$OUT/gpu_throughput.json" || failed=1
    timeout 150 python3 benchmarks/gpu_throughput.py --store "$store" --set runtime.in_memory_limit_mb=0 \
        --out "$OUT/gpu_throughput_stream.json" || failed=1
    return $failed
}

case "${1:-device}" in
    prepare) prepare ;;
    device) device ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [prepare|device]" >&2; exit 2 ;;
esac
