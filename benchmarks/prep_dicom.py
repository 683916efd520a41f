"""Prep benchmark on hospital-archive DICOMs: build-masks against the pydicom decode floor, in one run.

    python benchmarks/prep_dicom.py                          # 64 DX 2048^2 per encoding + CT + 3000x2500 (minutes)
    python benchmarks/prep_dicom.py --quick                  # < 1 minute: 64 DX 1024^2, uncompressed and RLE
    python benchmarks/prep_dicom.py --digests OUT.json       # build each generated set, digest every stored byte

Inputs, generated once per work folder (benchmarks/dicom_fixtures.py; distinct images, realistic geometry):
  dx     DX, --side^2 (default 2048), 12-bit in 16, MONOCHROME2/MONOCHROME1 alternating, window or VOI LUT;
  large  CR 3000x2500, 16-bit, same mix, a quarter as many (peak RSS per worker is measured on these);
  ct     CT 512^2 int16, RescaleIntercept -1024, soft-tissue window, four times as many;
each in every encoding of --encodings that an installed encoder writes (raw, rle, j2k = JPEG 2000 lossless,
jls = JPEG-LS lossless).

Arms per set and encoding, interleaved, best of --repeat:
  floor   ``pydicom.dcmread(path).pixel_array`` over all files in 2 processes (a Pool; warmed up);
  build   ``medsass-prep build-masks --size 256 --no-progress`` with 1 and 2 workers, default method and ``otsu``,
          and with 2 workers ``--polarity auto`` (per image, the default before 2026-12-05: the price of the vote):
          the whole command (start-up included) and its shard phase alone (from the store's runs.jsonl).
Prints images/s, MB/s (decoded pixel bytes), the ratios build / floor, CPU ms per image of the floor (the decode)
and of build-masks' tasks (summed over workers; on a busy machine their ratio is the steadier figure), and (unless
--no-stages) the time of each prep stage on the first DX file in this process (benchmarks/prep_stages.py);
--out-json keeps them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from dicom_fixtures import encodable, make_dicoms  # noqa: E402 (benchmarks/ is not a package)

METHODS = {"default": None, "otsu": "otsu"}
# arms timed: label -> (build-masks options, worker counts). "auto": the default method with per-image polarity, the
# default before 2026-12-05 (the default's store-level polarity adds a vote that reads up to 200 inputs once more)
ARMS = {"default": ((), (1, 2)), "auto": (("--polarity", "auto"), (2,)), "otsu": (("--method", "otsu"), (1, 2))}


def set_specs(n: int, side: int) -> dict[str, dict]:
    return {
        "dx": dict(kind="dx", n=n, shape=(side, side), bits=12, photometric="mixed", voi="mixed"),
        "large": dict(kind="cr", n=max(2, n // 4), shape=(3000, 2500), bits=16, photometric="mixed", voi="mixed"),
        "ct": dict(kind="ct", n=4 * n, shape=(512, 512)),
    }


def inputs(work: Path, name: str, spec: dict, syntax: str) -> Path:
    """The folder of one set in one encoding, generated unless a complete one is there."""
    folder = work / f"{name}_{syntax}_{spec['n']}_{spec['shape'][0]}x{spec['shape'][1]}"
    done = folder / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        make_dicoms(folder, syntax=syntax, **spec)
        done.write_text("")
        print(f"  generated {folder.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return folder


def files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _decode(path: Path) -> tuple[int, float]:
    from pydicom import dcmread

    cpu = time.process_time()
    nbytes = int(dcmread(path).pixel_array.nbytes)
    return nbytes, time.process_time() - cpu


def decode_floor(paths: list[Path], procs: int = 2) -> tuple[float, float, float]:
    """(images/s, decoded MB/s, CPU ms per image) of pydicom's decode in ``procs`` processes."""
    with Pool(procs) as pool:
        pool.map(_decode, paths[: 2 * procs])  # warm up: imports and plugins
        t = time.perf_counter()
        done = pool.map(_decode, paths, chunksize=max(1, len(paths) // (4 * procs)))
        dt = time.perf_counter() - t
    return len(paths) / dt, sum(b for b, _ in done) / 1e6 / dt, 1000 * sum(c for _, c in done) / len(paths)


class PeakRSS:
    """Peak resident memory (VmHWM) of each Dask worker process under a command, polled every 50 ms."""

    def __init__(self, pid: int):
        self.pid, self.peaks, self._stop = pid, {}, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            for pid, parent in _descendants(self.pid):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    # Dask's workers: forked by the fork server (the command's grandchildren) or spawned; not the
                    # fork server or multiprocessing's resource tracker (the nannies live in the command's process)
                    if parent == self.pid and b"spawn_main" not in cmd:
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peaks[pid] = max(self.peaks.get(pid, 0), int(line.split()[1]) * 1024)
                except OSError:
                    pass
            self._stop.wait(0.05)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def _descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, parent pid) of every process under ``pid``."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = []
        for task in Path(f"/proc/{p}/task").glob("*"):  # children of every thread (Dask starts workers from its own)
            try:
                kids += [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                pass
        out += [(k, p) for k in kids]
        todo += kids
    return out


def build_masks(src: Path, out: Path, workers: int, method: str | None, *, memory: bool = False,
                extra: tuple[str, ...] = ()) -> dict:
    """One build-masks command: images/s whole and in the shard phase; with ``memory``, peak RSS per worker."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "medsass.pipeline.cli", "build-masks", str(src), "--out", str(out), "--size", "256",
           "--workers", str(workers), "--no-progress", *(["--method", method] if method else []), *extra]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rss = PeakRSS(proc.pid) if memory else None
    _, err = proc.communicate()
    whole = time.perf_counter() - t
    peaks = rss.stop() if rss else {}
    if proc.returncode != 0:
        raise RuntimeError(f"build-masks failed ({proc.returncode}): {err[-2000:]}")
    n = len(files(src))
    run = [json.loads(line) for line in (out / "_medsass" / "runs.jsonl").read_text().splitlines()][-1]
    res = {"whole": n / whole, "shards": n / run["shard_seconds"], "whole_s": whole, "shard_s": run["shard_seconds"],
           "startup_s": whole - run["shard_seconds"], "cpu_ms": 1000 * run["task_cpu_seconds"] / n}
    if peaks:
        res["peak_rss_mb"] = max(peaks.values()) / 1e6
    return res


def pixel_mb(paths: list[Path]) -> float:
    from pydicom import dcmread

    ds = dcmread(paths[0], stop_before_pixels=True)
    return len(paths) * int(ds.Rows) * int(ds.Columns) * 2 / 1e6


def run_benchmark(args) -> dict:
    work = args.workdir
    specs = set_specs(args.n, args.side)
    encodings = [e for e in args.encodings.split(",") if e in encodable()]
    skipped = sorted(set(args.encodings.split(",")) - set(encodings))
    if skipped:
        print(f"no installed encoder writes {', '.join(skipped)}: skipped", file=sys.stderr)
    results: dict[str, dict] = {}
    for name in args.sets.split(","):
        for syntax in (encodings if name != "large" else encodings[:1]):
            src = inputs(work, name, specs[name], syntax)
            paths = files(src)
            key = f"{name}/{syntax}"
            r: dict = {"n": len(paths), "shape": list(specs[name]["shape"]), "pixel_mb": pixel_mb(paths),
                       "input_mb": sum(p.stat().st_size for p in paths) / 1e6}
            for _ in range(args.repeat):
                floor = decode_floor(paths)
                r["floor"] = max(r.get("floor", 0.0), floor[0])
                r["floor_cpu_ms"] = min(r.get("floor_cpu_ms", float("inf")), floor[2])
                for label, (opts, workers) in ARMS.items():
                    for w in workers:
                        res = build_masks(src, work / "store.zarr", w, None, memory=name == "large", extra=opts)
                        arm = f"{label}_{w}w"
                        prev = r.get(arm)
                        if prev is None or res["whole"] > prev["whole"]:
                            r[arm] = res
            results[key] = r
            print(f"  {key}: floor {r['floor']:.1f} img/s, default 2w {r['default_2w']['whole']:.1f} img/s "
                  f"(shards {r['default_2w']['shards']:.1f})", file=sys.stderr)
    return results


def report(results: dict) -> str:
    lines = ["images/s (MB/s of decoded pixels); ratio = build-masks / decode floor; whole command, then shard phase;",
             "CPU ms per image (floor: the decode; build-masks: its tasks, summed over workers) and their ratio, which",
             "the load of other processes hardly changes",
             f"{'input':12s} {'n':>4s} {'floor 2p':>14s} {'arm':12s} {'whole':>14s} {'ratio':>6s} {'shards':>14s} "
             f"{'ratio':>6s} {'start-up s':>10s} {'cpu ms':>8s} {'ratio':>6s}"]
    for key, r in results.items():
        mb = r["pixel_mb"] / r["n"]
        first = True
        for label, (_, workers) in ARMS.items():
            for w in workers:
                a = r[f"{label}_{w}w"]
                floor = f"{r['floor']:6.1f} ({r['floor'] * mb:5.0f})" if first else ""
                cpu = f"{r['floor_cpu_ms']:.1f} /" if first else ""
                lines.append(
                    f"{key if first else '':12s} {r['n'] if first else '':>4} {floor:>14s} {f'{label} {w}w':12s} "
                    f"{a['whole']:6.1f} ({a['whole'] * mb:5.0f}) {a['whole'] / r['floor']:6.2f} "
                    f"{a['shards']:6.1f} ({a['shards'] * mb:5.0f}) {a['shards'] / r['floor']:6.2f} {a['startup_s']:10.1f} "
                    f"{cpu:>8s} {a['cpu_ms']:6.1f} {r['floor_cpu_ms'] / a['cpu_ms']:6.2f}")
                first = False
        peaks = [r[f"{m}_{w}w"].get("peak_rss_mb") for m, (_, workers) in ARMS.items() for w in workers]
        if any(peaks):
            lines.append(f"{'':12s} peak RSS per worker: {max(p for p in peaks if p):.0f} MB "
                         f"({r['shape'][0]}x{r['shape'][1]}, {r['pixel_mb'] / r['n']:.0f} MB of pixels per image)")
    return "\n".join(lines)


def digests(args) -> dict:
    """Build every generated set (1 worker, fixed salt) with both methods; the digests of every stored byte."""
    from store_identity import store_digests

    out = {}
    specs = set_specs(args.n, args.side)
    for name in args.sets.split(","):
        for syntax in (e for e in args.encodings.split(",") if e in encodable()):
            src = inputs(args.workdir, name, specs[name], syntax)
            for label, method in METHODS.items():
                store = args.workdir / "identity.zarr"
                build_masks(src, store, 1, method, extra=("--salt", "prep-dicom"))
                out[f"{name}_{syntax}_{label}"] = store_digests(store)
                print(f"{name}_{syntax}_{label}: {out[f'{name}_{syntax}_{label}']}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="DX images per encoding (CT: 4x, 3000x2500: n/4); shards hold >= 32")
    ap.add_argument("--side", type=int, default=2048, help="DX image side")
    ap.add_argument("--sets", default="dx,ct,large")
    ap.add_argument("--encodings", default="raw,rle,j2k,jls", help="the large set uses the first one only")
    ap.add_argument("--repeat", type=int, default=1, help="runs per arm; the best is kept")
    ap.add_argument("--quick", action="store_true", help="--n 64 --side 1024 --sets dx --encodings raw,rle")
    ap.add_argument("--workdir", type=Path, default=None, help="keeps the generated inputs between runs")
    ap.add_argument("--out-json", type=Path, default=None)
    ap.add_argument("--no-stages", dest="stages", action="store_false", help="skip the per-stage timing")
    ap.add_argument("--digests", type=Path, default=None, metavar="OUT.json",
                    help="instead of timing: build each set with each method and write the store digests")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.side, args.sets, args.encodings = 64, 1024, "dx", "raw,rle"
    args.workdir = args.workdir or Path(tempfile.gettempdir()) / "medsass-prep-dicom"
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.digests:
        args.digests.write_text(json.dumps(digests(args), indent=1, sort_keys=True))
        return 0
    t = time.perf_counter()
    results = run_benchmark(args)
    text = report(results)
    if args.stages and "dx" in args.sets.split(","):
        from prep_stages import stage_times

        first = files(inputs(args.workdir, "dx", set_specs(args.n, args.side)["dx"], args.encodings.split(",")[0]))[0]
        stages = stage_times(first)
        results["stages"] = {"file": first.name, **stages}
        text += (f"\nper image, one process, {first.name} ({args.side}^2, best of 7): "
                 + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items() if isinstance(v, float)))
    print(f"\nprep on DICOM, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end, "
          f"{time.perf_counter() - t:.0f} s\n{text}")
    if args.out_json:
        args.out_json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
