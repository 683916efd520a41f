"""GPU throughput: is the data loader the bottleneck of training? Images/s of the trainer's own step, two ways fed.

Both arms run ``Loop.train_step`` of ``trainer/loop.py`` (the trainer's model, Adam, focal-Tversky loss, autocast,
GradScaler, augmentation on the device, channels_last) with the config's settings (default: the paper-sized
``trainer/configs/paper_gpu.yaml``: U-Net resnet50 + scSE, bf16, channels_last, batch 16, 8 loader workers):

  loader     batches from ``ShardStream`` + ``make_loader`` over a real medsass store, built as ``run_training``
             builds them (the config's num_workers, pin_memory, prefetch_factor, shuffle_buffer, in_memory_limit_mb)
  synthetic  one batch of the same store, copied to the device once and fed again every step (no loader, no copy)

and prints images/s of both, their ratio loader / synthetic (issue 12 target: >= 0.9 on one GPU) and, to tell the
two apart when it is missed, the loader's own rate without a training step. Warm-up steps are not timed; each
timed span starts and ends with ``torch.cuda.synchronize``.

    python benchmarks/gpu_throughput.py --store data/store_256.zarr --out gpu_throughput.json   # + gpu_throughput.txt
    python benchmarks/gpu_throughput.py --data data_manifests/cxr_shenzhen.yaml   # builds a 256 px store with medsass-prep
    python benchmarks/gpu_throughput.py --device cpu --encoder resnet18 --size 64 --steps 3 --batch-size 2   # smoke

Without ``--store`` / ``--data`` the store is built from the bundled sample (``data_manifests/sample.yaml``, 16
tiles). On ``--device cpu`` the precision and memory layout fall back to the trainer's ``auto`` (fp32, NCHW:
``trainer/precision.py``) and torch to 1 thread, unless ``--amp`` or ``--set runtime.channels_last=...`` /
``runtime.threads=...`` say otherwise: a CPU run checks the script, it measures nothing the issue asks for.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from medsass.trainer import checkpoint as ck
from medsass.trainer.config import TrainConfig, load_config
from medsass.trainer.data import ShardStream, Source, make_loader, select_rows
from medsass.trainer.distributed import DistInfo, pick_device
from medsass.trainer.loop import Loop, LoopState
from medsass.trainer.losses import build_loss
from medsass.trainer.model import build_model
from medsass.trainer.precision import amp_dtype, use_channels_last
from medsass.trainer.targets import binary_target

from medsass import store as store_mod
from medsass.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATASET = REPO / "data_manifests" / "sample.yaml"
TARGET = 0.9  # issue 12: loader / synthetic >= 0.9 on one GPU
SPLITS = ["train", "val", "test"]  # a speed test: every usable record streams (the trainer's pretrain takes train only)
Batch = dict[str, torch.Tensor]


def build_store(data: Path, out: Path, size: int, workers: int) -> Path:
    """A medsass store of ``data`` (a dataset YAML such as ``data_manifests/sample.yaml``, or a folder of images) at
    ``size`` px, by medsass-prep's ``build`` (resumes / reuses a finished store at ``out``)."""
    from medsass.pipeline.build import build
    from medsass.pipeline.config import BuildConfig, InputSource, load_dataset_file

    sets = [f"out={out}", f"geometry.size={size}", f"runtime.workers={workers}", "runtime.progress=false"]
    if data.suffix in (".yaml", ".yml"):
        cfg = load_dataset_file(data, sets)
    else:
        cfg = BuildConfig(sources=[InputSource(path=str(data))], out=str(out))
        cfg.geometry.size, cfg.runtime.workers, cfg.runtime.progress = size, workers, False
    build(cfg)
    return out


def train_config(args: argparse.Namespace, store: Path, out_dir: Path) -> TrainConfig:
    """The config ``args.config`` with the store, the command line's choices and ``--set`` overrides."""
    sets = [f"stores.main={store}", f"out_dir={out_dir}"]
    for key, value in (("model.encoder", args.encoder), ("pretrain.batch_size", args.batch_size),
                       ("runtime.num_workers", args.num_workers), ("runtime.device", args.device), ("runtime.amp", args.amp)):
        if value is not None:
            sets.append(f"{key}={value}")
    cfg = load_config(args.config, [*sets, *args.set])
    device = pick_device(cfg.runtime.device, option="--device")
    chosen = {s.split("=", 1)[0] for s in [*sets, *args.set]}
    if device.type == "cpu":  # a GPU config on a CPU: the trainer's auto rule (fp32, NCHW) and 1 thread, unless asked
        cpu_sets = [f"{k}=auto" for k in ("runtime.amp", "runtime.channels_last") if k not in chosen]
        cpu_sets += [] if "runtime.threads" in chosen else ["runtime.threads=1"]  # OpenMP threads thrash on a busy machine
        cfg = load_config(args.config, [*sets, *cpu_sets, *args.set])
    return cfg


def timed_steps(loop: Loop, batches: Iterator[Batch], *, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` train steps after ``warmup`` untimed ones, synchronised on CUDA."""
    state = LoopState()
    for _ in range(warmup):
        loop.train_step(batches, state)
    sync(loop.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loop.train_step(batches, state)
    sync(loop.device)
    return time.perf_counter() - t0


def timed_batches(batches: Iterator[Batch], *, warmup: int, steps: int) -> float:
    """Seconds the loader alone takes to yield ``steps`` batches after ``warmup`` (no step, no copy)."""
    for _ in range(warmup):
        next(batches)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"


def measure(cfg: TrainConfig, store: Path, *, steps: int, warmup: int) -> dict[str, Any]:
    """Both arms (and the loader alone) on the config's model, step and loader; rates in images/s."""
    rt, scfg = cfg.runtime, cfg.pretrain
    if rt.threads:
        torch.set_num_threads(rt.threads)
    device = pick_device(rt.device, option="--device")
    dist = DistInfo(device=device)
    rows = select_rows(store, splits=SPLITS, target=scfg.target, exclude_degenerate=scfg.exclude_degenerate)
    if len(rows) < max(1, rt.num_workers):  # a worker with no block of rows would wait for ever
        raise ConfigError(f"{store} has {len(rows)} usable records for {rt.num_workers} loader workers; "
                          "give a larger --store / --data, or fewer --num-workers")
    warmup = max(warmup, rt.num_workers)  # every worker's first batch (its shuffle buffer filled) stays untimed

    def stream() -> ShardStream:  # as run_training builds it (rank 0 of 1, from batch 0)
        return ShardStream([Source(store=store, rows=rows, target=scfg.target)], seed=cfg.seed, shuffle_buffer=rt.shuffle_buffer,
                           batch_size=scfg.batch_size, in_memory_limit_mb=rt.in_memory_limit_mb)

    def loader(num_workers: int = rt.num_workers) -> Iterator[Batch]:
        return iter(make_loader(stream(), batch_size=scfg.batch_size, num_workers=num_workers,
                                pin_memory=rt.pin_memory and device.type == "cuda", prefetch_factor=rt.prefetch_factor))

    ck.seed_everything(cfg.seed)
    model = build_model(cfg.model).to(device)
    loop = Loop(model, scfg, build_loss(cfg.loss), seed=cfg.seed, dist=dist, amp=rt.amp,
                channels_last=use_channels_last(rt.channels_last, device), compile=rt.compile, target_transform=binary_target)
    per_step = scfg.batch_size * scfg.grad_accum
    first = next(loader(num_workers=0))
    on_device = {k: first[k].to(device) for k in ("image", "target")}
    synthetic_s = timed_steps(loop, itertools.repeat(on_device), warmup=warmup, steps=steps)
    batches = loader()
    loader_s = timed_steps(loop, batches, warmup=warmup, steps=steps)
    del batches  # its workers end before the next loader's start
    batches = loader()
    alone_s = timed_batches(batches, warmup=warmup * scfg.grad_accum, steps=steps * scfg.grad_accum)
    del batches
    dtype = amp_dtype(rt.amp, device)
    res: dict[str, Any] = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "cuda": torch.version.cuda, "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
        "store": str(store), "records": int(len(rows)), "size": store_mod.open_store(store)[1].size,
        "encoder": cfg.model.encoder, "decoder_attention_type": cfg.model.decoder_attention_type,
        "batch_size": scfg.batch_size, "grad_accum": scfg.grad_accum, "amp": str(dtype).removeprefix("torch.") if dtype else "fp32",
        "channels_last": loop.channels_last, "compile": rt.compile, "loss": cfg.loss.name,
        "num_workers": rt.num_workers, "pin_memory": rt.pin_memory and device.type == "cuda", "prefetch_factor": rt.prefetch_factor,
        "shuffle_buffer": rt.shuffle_buffer, "in_memory_limit_mb": rt.in_memory_limit_mb,
        "warmup_steps": warmup, "steps": steps, "queued_batches_max": rt.num_workers * rt.prefetch_factor if rt.num_workers else 0,
        "synthetic_images_per_s": steps * per_step / synthetic_s,
        "loader_images_per_s": steps * per_step / loader_s,
        "loader_alone_images_per_s": steps * per_step / alone_s,
    }
    res["ratio_loader_over_synthetic"] = res["loader_images_per_s"] / res["synthetic_images_per_s"]
    res["target"], res["target_met"] = TARGET, res["ratio_loader_over_synthetic"] >= TARGET
    return res


def report(r: dict[str, Any]) -> str:
    lines = [
        f"device: {r['device']}  (torch {r['torch']}, CUDA {r['cuda']}, {r['cpus']} CPUs, {r['torch_threads']} torch threads)",
        f"store: {r['store']}  ({r['records']} records, {r['size']} px)",
        f"model: Unet {r['encoder']} + {r['decoder_attention_type']}, {r['amp']}, channels_last={r['channels_last']}, "
        f"compile={r['compile']}, loss {r['loss']}; batch {r['batch_size']} x grad_accum {r['grad_accum']}",
        f"loader: num_workers={r['num_workers']}, pin_memory={r['pin_memory']}, prefetch_factor={r['prefetch_factor']}, "
        f"shuffle_buffer={r['shuffle_buffer']}, in_memory_limit_mb={r['in_memory_limit_mb']}",
        f"timed: {r['steps']} steps after {r['warmup_steps']} warm-up steps per arm "
        f"(the loader arm may start with up to {r['queued_batches_max']} batches already queued)",
        "",
        f"{'arm':44s} {'images/s':>10s}",
        f"{'synthetic (one batch already on the device)':44s} {r['synthetic_images_per_s']:10.1f}",
        f"{'loader (ShardStream + make_loader)':44s} {r['loader_images_per_s']:10.1f}",
        f"{'loader alone (no train step)':44s} {r['loader_alone_images_per_s']:10.1f}",
        "",
        f"loader / synthetic: {r['ratio_loader_over_synthetic']:.3f}   target >= {r['target']}: "
        + ("met" if r["target_met"] else "missed") + ("" if r["device_type"] == "cuda" else " (not a GPU: the target is for one GPU)"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--store", type=Path, help="an existing medsass store (prep output)")
    src.add_argument("--data", type=Path, help="a dataset YAML or an image folder to build a store from "
                                               f"(default: {SAMPLE_DATASET.relative_to(REPO)})")
    ap.add_argument("--size", type=int, default=None, help="px of the store built from --data (default 256)")
    ap.add_argument("--config", default="paper_gpu", help="trainer config (a file or a trainer/configs name; default paper_gpu)")
    ap.add_argument("--encoder", help="model.encoder (default: the config's)")
    ap.add_argument("--batch-size", type=int, help="pretrain.batch_size (default: the config's)")
    ap.add_argument("--num-workers", type=int, help="runtime.num_workers (default: the config's)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], help="runtime.device (default: the config's)")
    ap.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], help="runtime.amp (default: the config's; auto on a CPU)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config override, as medsass-train's")
    ap.add_argument("--steps", type=int, default=400, help="timed steps per arm (the loader may start with up to "
                    "num_workers x prefetch_factor batches queued: 32 with paper_gpu, under 10%% of 400)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps per arm (at least num_workers)")
    ap.add_argument("--prep-workers", type=int, default=2, help="Dask workers building the store")
    ap.add_argument("--workdir", type=Path, help="build the store here and keep it (default: a temporary folder)")
    ap.add_argument("--out", type=Path, help="write the figures to this .json and the report beside it (.txt)")
    ap.add_argument("--build-only", action="store_true", help="build the store from --data into --workdir, then stop")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.build_only and (args.store is not None or args.workdir is None):
        ap.error("--build-only builds a store from --data (default: the bundled sample) into --workdir: give --workdir, not --store")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        if args.store is not None:
            store = args.store
            size = store_mod.open_store(store)[1].size
            if args.size is not None and args.size != size:
                ap.error(f"--size {args.size} but {store} holds {size} px images; drop --size or give a {args.size} px store")
        else:
            data, size = args.data or SAMPLE_DATASET, args.size or 256
            t0 = time.perf_counter()
            store = build_store(data.resolve(), (work / f"{data.stem}_{size}.zarr").resolve(), size, args.prep_workers)
            print(f"store {store} ready in {time.perf_counter() - t0:.1f} s", flush=True)
            if args.build_only:
                return {"store": str(store), "size": size}
        cfg = train_config(args, store.resolve(), work / "run")
        res = measure(cfg, store.resolve(), steps=args.steps, warmup=args.warmup)
    text = report(res)
    print(text, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        args.out.with_suffix(".txt").write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
