"""benchmarks/gpu_throughput.py on a CPU, tiny: both arms run the trainer's step and report images/s, the ratio is
loader / synthetic, --out writes the JSON and the report beside it; the store is built by medsass-prep; a store with
fewer records than loader workers is refused (such a stream would wait for ever)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from medsass import store as store_mod
from medsass.errors import ConfigError
from medsass.testing import TINY_ENCODER, make_synthetic_store

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--encoder", TINY_ENCODER, "--batch-size", "2", "--steps", "2", "--warmup", "1",
        "--set", "runtime.threads=1", "--set", "runtime.shuffle_buffer=4"]


@pytest.fixture(scope="module")
def bench():
    """The script as ``python benchmarks/gpu_throughput.py`` imports it (benchmarks/ is a folder of scripts)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "benchmarks"))
        return importlib.import_module("gpu_throughput")


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    return make_synthetic_store(tmp_path_factory.mktemp("gpu_tp") / "s.zarr", n=12, size=32, shard_records=4)


def test_both_arms_and_their_ratio(bench, small_store, tmp_path, capsys):
    out = tmp_path / "res" / "gpu_throughput.json"
    res = bench.main(["--store", str(small_store), "--num-workers", "2", "--out", str(out), *TINY])
    assert res["synthetic_images_per_s"] > 0 and res["loader_images_per_s"] > 0 and res["loader_alone_images_per_s"] > 0
    assert res["ratio_loader_over_synthetic"] == pytest.approx(res["loader_images_per_s"] / res["synthetic_images_per_s"])
    assert res["target_met"] == (res["ratio_loader_over_synthetic"] >= 0.9)
    # the GPU config's settings, with the command line's and the CPU fallback (fp32, NCHW: trainer/precision.py)
    assert (res["encoder"], res["batch_size"], res["num_workers"], res["size"], res["records"]) == (TINY_ENCODER, 2, 2, 32, 12)
    assert (res["amp"], res["channels_last"], res["pin_memory"], res["device_type"]) == ("fp32", False, False, "cpu")
    assert (res["prefetch_factor"], res["in_memory_limit_mb"], res["loss"]) == (4, 4096, "focal_tversky")  # paper_gpu.yaml
    assert res["warmup_steps"] == 2  # raised to num_workers: every worker's first batch is untimed
    assert json.loads(out.read_text()) == res
    text = out.with_suffix(".txt").read_text()
    assert "loader / synthetic" in text and text.strip() in capsys.readouterr().out


def test_explicit_precision_is_kept_on_a_cpu(bench, small_store, tmp_path):
    args = bench.argparse.Namespace(config="paper_gpu", encoder=None, batch_size=None, num_workers=None, device="cpu",
                                    amp="bf16", set=["runtime.threads=2"])
    cfg = bench.train_config(args, small_store, tmp_path)
    assert (cfg.runtime.amp, cfg.runtime.channels_last, cfg.runtime.threads) == ("bf16", "auto", 2)
    assert (cfg.model.encoder, cfg.pretrain.batch_size, cfg.runtime.num_workers) == ("resnet50", 16, 8)


def test_too_few_records_for_the_workers(bench, small_store):
    with pytest.raises(ConfigError, match="12 usable records for 13 loader workers"):
        bench.main(["--store", str(small_store), "--num-workers", "13", *TINY])


def test_size_must_match_the_store(bench, small_store):
    with pytest.raises(SystemExit):
        bench.main(["--store", str(small_store), "--size", "64", *TINY])


def test_store_built_from_the_bundled_sample(bench, tmp_path):
    out = bench.build_store(bench.SAMPLE_DATASET, tmp_path / "sample_32.zarr", 32, workers=1)
    _, info = store_mod.open_store(out)
    assert (info.size, info.n_records) == (32, 16)  # sample_data/dsb2018_nuclei: 16 tiles
