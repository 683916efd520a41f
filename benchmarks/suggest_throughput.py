"""Throughput of ``medsass-train suggest``: the model pass over the candidates and k-center greedy selection.

Builds a synthetic store of N unlabeled train records (medsass.testing) and a checkpoint of an untrained
U-Net (speed does not depend on the weights), then prints records/s of
  (a) the encoder-only embedding pass (what ``diverse`` runs over every candidate),
  (b) the whole-U-Net pass: embeddings + zero-shot scores (``uncertain`` / ``hybrid``),
  (c) k-center greedy picking K of the N embeddings, and of K among ``--kcenter-n`` random 512-d unit vectors
      (the O(N K) selection alone, at a scale a real store's pass would take hours to produce on a CPU),
  (d) whole ``suggest`` commands (random, diverse, hybrid) including the picks' pass, gallery and files,
and the projected time of each pass for 10,000 records.

    python benchmarks/suggest_throughput.py --n 2000 --size 128 --encoder resnet18 --threads 1

Measured 2026-12-05 on the 2-core CPU machine while other jobs ran (load 3-5), 1 thread, batch 32, N=2000 at
128 px, resnet18 + scSE: embedding pass 59 records/s (10,000: ~2.8 min), whole-U-Net pass 17 records/s
(~9.7 min), k-center 50 of 2,000 in 0.023 s and 50 of 200,000 in 4.1 s (2026-12-06, `--n 64 --kcenter-n
1000000`: 50 of 1,000,000 in 7.4 s beside two training runs); whole commands: random 1.7 s,
diverse 31 s, hybrid 116 s. Unloaded, the same model ran 79 (encoder) / 24 (whole) images/s on one thread.
Reading image + pseudo-mask from the store alone: ~1,170 records/s in one process.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="records in the synthetic store")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--k", type=int, default=50, help="picks for the k-center timing")
    ap.add_argument("--kcenter-n", type=int, default=200_000, help="random embeddings for the large k-center timing (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 when the machine is shared)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workdir", type=Path, default=None, help="keep the store here (default: a temp dir)")
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(args, args.workdir or Path(tmp))
    print(json.dumps(results, indent=2))
    if args.out_json:
        args.out_json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from medsass.trainer import checkpoint as ck
    from medsass.trainer.config import ModelConfig
    from medsass.trainer.model import build_model, model_args
    from medsass.trainer.suggest import candidates, forward_pass, k_center_greedy, suggest

    from medsass.testing import make_synthetic_store

    work.mkdir(parents=True, exist_ok=True)
    store = work / f"suggest_{args.n}_{args.size}.zarr"
    t = time.perf_counter()
    if not (store / "manifest.json").exists():
        make_synthetic_store(store, n=args.n, size=args.size, shard_records=256, labeled_fraction=0.0, splits=(1.0, 0.0, 0.0))
    build_s = time.perf_counter() - t
    cfg = ModelConfig(encoder=args.encoder)
    torch.manual_seed(0)
    model = build_model(cfg)
    ckpt = work / "pretrain" / "final.pt"
    ck.save(ckpt, {"kind": "final", "stage": "pretrain", "model": model.state_dict(), "model_args": model_args(cfg), "step": 0})
    device = torch.device(args.device)
    model.to(device).eval()
    rows = candidates(store)[0]["row"].to_numpy()
    warm = rows[: args.batch_size]
    forward_pass(model, store, warm, batch_size=args.batch_size, device=device)  # first-call costs (allocator, zarr open)
    out: dict[str, Any] = {"n": int(len(rows)), "size": args.size, "encoder": args.encoder, "batch_size": args.batch_size,
                           "threads": torch.get_num_threads(), "device": str(device), "store_build_s": round(build_s, 1)}
    emb: dict[str, torch.Tensor] = {}

    def enc_pass():
        emb["x"] = forward_pass(model, store, rows, batch_size=args.batch_size, device=device, scores=False)["embedding"]

    for name, fn in (("embedding_pass", enc_pass),
                     ("full_pass", lambda: forward_pass(model, store, rows, batch_size=args.batch_size, device=device))):
        s = timed(fn)
        out[name] = {"seconds": round(s, 2), "records_per_s": round(len(rows) / s, 1), "projected_10k_min": round(10_000 / (len(rows) / s) / 60, 1)}
    s = timed(lambda: k_center_greedy(emb["x"], args.k, first=0), repeat=3)
    out["kcenter"] = {"n": int(len(rows)), "k": args.k, "dim": int(emb["x"].shape[1]), "seconds": round(s, 4),
                      "records_per_s": round(len(rows) / s)}
    if args.kcenter_n:
        big = torch.nn.functional.normalize(torch.randn(args.kcenter_n, 512, generator=torch.Generator().manual_seed(0)), dim=1).to(device)
        s = timed(lambda: k_center_greedy(big, args.k, first=0))
        out["kcenter_large"] = {"n": args.kcenter_n, "k": args.k, "dim": 512, "seconds": round(s, 3),
                                "records_per_s": round(args.kcenter_n / s), "record_steps_per_s": round(args.kcenter_n * args.k / s)}
        del big
    commands = {}
    for strategy in ("random", "diverse", "hybrid"):
        s = timed(lambda: suggest(ckpt, store, 10, work / f"out_{strategy}", strategy=strategy, batch_size=args.batch_size,
                                  device=args.device, threads=args.threads))
        commands[strategy] = round(s, 2)
    out["suggest_command_s"] = commands
    return out


if __name__ == "__main__":
    main()
