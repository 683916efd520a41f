"""Prep benchmark: build-masks vs a decode-only floor and a naive research loop, in one run.

    python benchmarks/prep_throughput.py --n-images 2000 [--out-json bench_prep.json]

(a) decode-only floor: decode of every PNG to a numpy array, 2 processes, with Pillow and with libpng
    (imagecodecs, which prep uses for plain grayscale PNG); the faster is the floor;
(b) naive loop, 1 process, as a user would write it: PIL open -> skimage Otsu -> save the mask as a 1-bit PNG at
    full resolution (``Image.fromarray(mask).save``, what issue 12's independent check ran); the loop this benchmark
    ran before issue 12 saved ``mask * 255`` as an 8-bit PNG, which zlib takes ~4x longer to write: it is still
    measured (``naive_loop_1proc_8bit``) so the two figures can be compared, and the ratios use the 1-bit loop;
(c) ``medsass-prep build-masks --method otsu`` (the naive loop's threshold) with 1 and 2 Dask workers (whole
    command, cluster start-up included, and the shard phase alone);
(d) ``build-masks`` with its default ``--method fov_otsu_hull`` (region-aware; better masks, more work), 2 workers.
Prints images/s and the ratios the prep issue targets, plus store size vs input size. Every arm runs
``--repeat`` times (default 2) and keeps its best time, as ``timeit`` does: the machine's noise only ever adds
time, and the arms are interleaved so a slow spell does not favour one of them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, n: int, size: int = 512) -> list[Path]:
    """Realistic-ish 512² grayscale PNGs: smooth blobs + texture + noise (not constants)."""
    from medsass.testing import blob_image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    base = [blob_image(rng, size, n_blobs=int(rng.integers(2, 6)))[0] for _ in range(16)]
    for i in range(n):
        img = base[i % 16].astype(np.int16) + rng.normal(0, 6, (size, size)).astype(np.int16)
        img = np.roll(img, int(rng.integers(0, size)), axis=int(rng.integers(0, 2)))
        p = folder / f"img{i:05d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def _decode(path: Path) -> int:
    with Image.open(path) as im:
        return int(np.asarray(im).shape[0])


def _decode_libpng(path: Path) -> int:
    import imagecodecs

    return int(imagecodecs.png_decode(path.read_bytes()).shape[0])


def decode_floor(paths: list[Path], procs: int = 2, fn=_decode) -> float:
    with Pool(procs) as pool:
        pool.map(fn, paths[:50])  # warm up
        t = time.perf_counter()
        pool.map(fn, paths, chunksize=64)
        return len(paths) / (time.perf_counter() - t)


def naive_loop(paths: list[Path], out: Path, bits: int = 1) -> float:
    """images/s of the user's loop; ``bits=1`` saves the bool mask (a 1-bit PNG), 8 saves ``mask * 255``."""
    from skimage.filters import threshold_otsu

    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for p in paths:
        img = np.asarray(Image.open(p).convert("L"))
        mask = img > threshold_otsu(img)
        Image.fromarray(mask if bits == 1 else mask.astype(np.uint8) * 255).save(out / p.name)
    return len(paths) / (time.perf_counter() - t)


def build_masks(src: Path, out: Path, workers: int, method: str | None = "otsu") -> tuple[float, float, float]:
    """(images/s of the whole command, images/s of the shard phase alone, seconds outside the shard phase: the
    fixed cost of a run); ``method=None``: the default."""
    cmd = [sys.executable, "-m", "medsass.pipeline.cli", "build-masks", str(src), "--out", str(out), "--size", "256",
           "--workers", str(workers), "--no-progress", *(["--method", method] if method else [])]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    whole = time.perf_counter() - t
    n = len(list(src.iterdir()))
    runs = [json.loads(line) for line in (out / "_medsass" / "runs.jsonl").read_text().splitlines()]
    shard_s = runs[-1].get("shard_seconds") or runs[-1]["seconds"]
    return n / whole, n / shard_s, whole - shard_s


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out-json", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=2, help="runs per arm; the best is kept")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="medsass-bench-"))
    src = work / "pngs"
    if not src.exists() or len(list(src.iterdir())) != args.n_images:
        shutil.rmtree(src, ignore_errors=True)
        print(f"generating {args.n_images} 512x512 PNGs in {src} ...", file=sys.stderr)
        make_images(src, args.n_images)
    paths = sorted(src.iterdir())
    res: dict[str, float] = {"n_images": len(paths), "repeat": args.repeat}

    def best(key: str, value) -> None:
        for k, v in zip([key, f"{key}_shards"], value if isinstance(value, tuple) else (value,)):
            res[k] = max(res.get(k, 0.0), v)
        if isinstance(value, tuple):  # the fixed cost: the least seen
            res[f"{key}_fixed_s"] = min(res.get(f"{key}_fixed_s", float("inf")), value[2])

    def build_arm(w: int, method: str | None, name: str) -> tuple[float, float, float]:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        return build_masks(src, out, w, method)

    for _ in range(args.repeat):
        best("decode_floor_2proc_pillow", decode_floor(paths, 2))
        best("decode_floor_2proc_libpng", decode_floor(paths, 2, _decode_libpng))  # prep's decoder for gray PNG
        best("naive_loop_1proc", naive_loop(paths, work / "naive_masks"))
        best("naive_loop_1proc_8bit", naive_loop(paths, work / "naive_masks", bits=8))  # the loop before issue 12
        for w in (1, 2):
            best(f"build_masks_{w}w", build_arm(w, "otsu", f"store_w{w}.zarr"))
        best("build_masks_2w_default_method", build_arm(2, None, "store_default_w2.zarr"))
    res["decode_floor_2proc"] = max(res["decode_floor_2proc_pillow"], res["decode_floor_2proc_libpng"])
    res["input_mb"] = dir_bytes(src) / 1e6
    res["store_mb"] = dir_bytes(work / "store_w2.zarr") / 1e6
    ratios = {
        "otsu 2w / naive (target >= 2.5)": res["build_masks_2w"] / res["naive_loop_1proc"],
        "default 2w / naive (target >= 1.5)": res["build_masks_2w_default_method"] / res["naive_loop_1proc"],
        "otsu 2w / naive 8-bit mask (the old arm)": res["build_masks_2w"] / res["naive_loop_1proc_8bit"],
        "2w / decode floor (issue 2's target, withdrawn)": res["build_masks_2w"] / res["decode_floor_2proc"],
        "2w / 1w (target >= 1.7)": res["build_masks_2w"] / res["build_masks_1w"],
        "2w shard phase / decode floor": res["build_masks_2w_shards"] / res["decode_floor_2proc"],
        "2w / 1w shard phase": res["build_masks_2w_shards"] / res["build_masks_1w_shards"],
        "default method (fov_otsu_hull) / otsu, 2w": res["build_masks_2w_default_method"] / res["build_masks_2w"],
        "store / input size": res["store_mb"] / res["input_mb"],
    }
    print(f"\nprep throughput, {len(paths)} PNGs 512x512 -> 256x256 store (images/s, best of {args.repeat})")
    for k in ("decode_floor_2proc_pillow", "decode_floor_2proc_libpng", "naive_loop_1proc", "naive_loop_1proc_8bit",
              "build_masks_1w", "build_masks_2w", "build_masks_1w_shards",
              "build_masks_2w_shards", "build_masks_2w_default_method", "build_masks_2w_default_method_shards"):
        print(f"  {k:38s} {res[k]:8.1f}")
    print(f"  input {res['input_mb']:.1f} MB, store {res['store_mb']:.1f} MB")
    print("seconds outside the shard phase (start-up, planning, close, manifest: the fixed cost of a run):")
    for k in ("build_masks_1w", "build_masks_2w", "build_masks_2w_default_method"):
        print(f"  {k:38s} {res[k + '_fixed_s']:8.2f}")
    print("ratios:")
    for k, v in ratios.items():
        print(f"  {k:44s} {v:6.2f}")
    if args.out_json:
        args.out_json.write_text(json.dumps({"figures": res, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
