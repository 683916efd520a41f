"""Loader throughput: the streaming Zarr loader vs. on-the-fly "research code" loading vs. a CPU train step.

Prints samples/s for
  (a) ShardStream + make_loader over a sharded store, batches augmented (augment_batch) in the
      consuming process as the training loop does, with 1 and 2 workers (and the loader alone);
  (b) a map-style Dataset whose __getitem__ decodes a 512² PNG with PIL, converts it to gray,
      thresholds it with skimage Otsu and resizes image and mask to S (1 and 2 workers);
  (c) one CPU training step of a CPU-sized U-Net (smp Unet resnet18 + scse, as the scale study uses; batch 8 at 128 px,
      Adam, BCE),
and the ratios (a)/(b) per worker (target >= 3) and (a, 2 workers)/(c) (target >= 2).

    python benchmarks/loader_throughput.py --n-images 500 --size 128 --out-json loader.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from medsass.trainer.augment import AugmentConfig, augment_batch
from medsass.trainer.data import ShardStream, Source, make_loader, select_rows
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from medsass.testing import blob_image

SOURCE_SIZE = 512


def make_pngs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` realistic 512² grayscale PNGs: smooth blobs + texture + noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img, _ = blob_image(rng, SOURCE_SIZE, n_blobs=int(rng.integers(2, 6)))
        path = folder / f"img_{i:05d}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def otsu_and_resize(path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The research-code recipe: PIL decode -> gray -> skimage Otsu -> resize image and mask to size."""
    from skimage.filters import threshold_otsu

    with Image.open(path) as im:
        gray = np.array(im.convert("L"))
    mask = (gray > threshold_otsu(gray)).astype(np.uint8)
    img = np.array(Image.fromarray(gray).resize((size, size), Image.BILINEAR))
    msk = np.array(Image.fromarray(mask).resize((size, size), Image.NEAREST))
    return img, msk


def build_store(png_dir: Path, out: Path, size: int, shard_records: int = 256) -> Path:
    """The store for (a), built by the real prep stage (`medsass-prep build-masks`), every record in train."""
    from medsass.pipeline.build import build
    from medsass.pipeline.config import BuildConfig, InputSource, SplitConfig

    cfg = BuildConfig(sources=[InputSource(path=str(png_dir))], out=str(out), split=SplitConfig(val=0.0, test=0.0))
    cfg.geometry.size = size
    cfg.runtime.shard_records = shard_records
    cfg.runtime.workers = 2
    cfg.runtime.progress = False
    build(cfg)
    return out


class ResearchDataset(Dataset):
    """Map-style dataset doing all the work per sample, as typical research code does."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        img, msk = otsu_and_resize(self.paths[i], self.size)
        return {"image": torch.from_numpy(img)[None], "target": torch.from_numpy(msk)[None]}


def _cycle(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def rate(batches: Iterator[dict[str, torch.Tensor]], seconds: float, consume: Callable[[dict[str, torch.Tensor]], Any],
         warmup: int = 3) -> float:
    """Samples per second pulled through ``consume`` after ``warmup`` batches, for ~``seconds``."""
    for _ in range(warmup):
        consume(next(batches))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(consume(next(batches))["image"])
    return n / (time.perf_counter() - t0)


def cpu_rate(batches: Iterator[dict[str, torch.Tensor]], n_batches: int, consume: Callable[[dict[str, torch.Tensor]], Any]) -> float:
    """Samples per CPU-second of this process (in-process loading, num_workers=0): robust on a loaded machine."""
    consume(next(batches))
    n, t0 = 0, time.process_time()
    for _ in range(n_batches):
        n += len(consume(next(batches))["image"])
    return n / (time.process_time() - t0)


def augmenter(cfg: AugmentConfig) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)

    def consume(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = augment_batch(batch["image"].float().div_(255), (batch["target"] > 0).float(), cfg, gen)
        return {"image": x, "target": y}

    return consume


def train_step_rate(seconds: float, batch: int = 8, size: int = 128) -> float:
    import segmentation_models_pytorch as smp

    net = smp.Unet(encoder_name="resnet18", encoder_weights=None, decoder_attention_type="scse", in_channels=1, classes=1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x, y = torch.rand(batch, 1, size, size), (torch.rand(batch, 1, size, size) > 0.5).float()

    def step(_: Any) -> dict[str, torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()
        return {"image": x}

    return rate(itertools.repeat({}), seconds, step, warmup=2)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=500)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0, help="measuring time per configuration")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the PNGs and the store here (default: a temp dir)")
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        png_dir, store_path = work / "png", work / f"store_{args.size}.zarr"
        t0 = time.perf_counter()
        paths = sorted(png_dir.glob("*.png")) if png_dir.exists() else []
        if len(paths) < args.n_images:
            paths = make_pngs(png_dir, args.n_images)
        paths = paths[: args.n_images]
        if not store_path.exists():
            build_store(png_dir, store_path, args.size)
        print(f"{len(paths)} PNGs {SOURCE_SIZE}² and the store ready in {time.perf_counter() - t0:.1f} s", flush=True)
        results = measure(paths, store_path, args)
    report(results)
    if args.out_json:
        args.out_json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def measure(paths: list[Path], store_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)  # the consuming process gets one core; workers take the others
    bs = args.batch_size
    res: dict[str, Any] = {"n_images": len(paths), "size": args.size, "batch_size": bs, "cpus": len(os.sched_getaffinity(0))}
    rows = select_rows(store_path, splits=["train"])
    aug, plain = augmenter(AugmentConfig()), (lambda b: b)
    for workers in (1, 2):
        # in_memory_limit_mb=0: really stream from the store (no whole-source caching)
        ds = ShardStream([Source(store_path, rows)], seed=0, batch_size=bs, in_memory_limit_mb=0)
        res[f"a_stream_aug_w{workers}"] = rate(iter(make_loader(ds, batch_size=bs, num_workers=workers, pin_memory=False)), args.seconds, aug)
        res[f"a_stream_only_w{workers}"] = rate(iter(make_loader(ds, batch_size=bs, num_workers=workers, pin_memory=False)), args.seconds, plain)
        research = DataLoader(ResearchDataset(paths, args.size), batch_size=bs, shuffle=True, num_workers=workers, prefetch_factor=4)
        res[f"b_research_w{workers}"] = rate(_cycle(research), args.seconds, plain)
        print(f"  workers={workers}: done", flush=True)
    # The same work in this process, timed in CPU seconds: per-worker cost without contention noise.
    n_cpu = max(4, 2000 // bs)
    ds0 = ShardStream([Source(store_path, rows)], seed=0, batch_size=bs, in_memory_limit_mb=0)
    res["cpu_a_stream_aug"] = cpu_rate(iter(make_loader(ds0, batch_size=bs, num_workers=0, pin_memory=False)), n_cpu, aug)
    res["cpu_a_stream_only"] = cpu_rate(iter(make_loader(ds0, batch_size=bs, num_workers=0, pin_memory=False)), n_cpu, plain)
    research0 = DataLoader(ResearchDataset(paths, args.size), batch_size=bs, shuffle=True, num_workers=0)
    res["cpu_b_research"] = cpu_rate(_cycle(research0), max(2, n_cpu // 8), plain)
    fixed = next(iter(make_loader(ShardStream([Source(store_path, rows)], seed=0, batch_size=bs), batch_size=bs, num_workers=0, pin_memory=False)))
    res["augment_only"] = rate(itertools.repeat(fixed), args.seconds, aug)
    # (c) with 1 thread and with all cores; the better one counts (OpenMP threads thrash on a loaded machine)
    res["c_train_step_cpu_1thread"] = train_step_rate(args.seconds)
    torch.set_num_threads(res["cpus"])
    res["c_train_step_cpu_all_threads"] = train_step_rate(args.seconds)
    res["c_train_step_cpu"] = max(res["c_train_step_cpu_1thread"], res["c_train_step_cpu_all_threads"])
    for w in (1, 2):
        res[f"ratio_a_over_b_per_worker_w{w}"] = res[f"a_stream_aug_w{w}"] / res[f"b_research_w{w}"]
    res["cpu_ratio_a_over_b"] = res["cpu_a_stream_aug"] / res["cpu_b_research"]
    res["cpu_ratio_a_only_over_b"] = res["cpu_a_stream_only"] / res["cpu_b_research"]
    res["ratio_a_w2_over_c"] = res["a_stream_aug_w2"] / res["c_train_step_cpu"]
    return res


def report(r: dict[str, Any]) -> None:
    print(f"\n{r['n_images']} images, S={r['size']}, batch {r['batch_size']}  (samples/s; per worker = total / workers)")
    print(f"{'loader':48s} {'workers':>7s} {'total':>9s} {'per worker':>11s}")
    for key, label in [("a_stream_aug", "(a) ShardStream + augment_batch (consumer)"), ("a_stream_only", "    ShardStream alone"),
                       ("b_research", "(b) PNG -> gray -> Otsu -> resize per sample")]:
        for w in (1, 2):
            v = r[f"{key}_w{w}"]
            print(f"{label:48s} {w:7d} {v:9.0f} {v / w:11.0f}")
    print(f"{'    augment_batch alone, 1 thread':48s} {'-':>7s} {r['augment_only']:9.0f}")
    print(f"{'(c) CPU train step, Unet resnet18+scse, 8x128²':48s} {'-':>7s} {r['c_train_step_cpu']:9.1f}"
          f"   (1 thread {r['c_train_step_cpu_1thread']:.1f}, {r['cpus']} threads {r['c_train_step_cpu_all_threads']:.1f})")
    print("\nper CPU-second of one process (num_workers=0; immune to other load on the machine):")
    print(f"  (a) stream + augment {r['cpu_a_stream_aug']:.0f}, stream alone {r['cpu_a_stream_only']:.0f}, "
          f"(b) research {r['cpu_b_research']:.0f} samples/CPU-s  ->  (a)/(b) {r['cpu_ratio_a_over_b']:.1f}x "
          f"(stream alone {r['cpu_ratio_a_only_over_b']:.1f}x)")
    print(f"\n(a)/(b) per worker: {r['ratio_a_over_b_per_worker_w1']:.1f}x (1 worker), "
          f"{r['ratio_a_over_b_per_worker_w2']:.1f}x (2 workers)   target >= 3")
    print(f"(a, 2 workers)/(c): {r['ratio_a_w2_over_c']:.0f}x   target >= 2")


if __name__ == "__main__":
    main()
