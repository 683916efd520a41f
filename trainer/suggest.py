"""``medsass-train suggest``: which unlabeled train images should the expert label next?

Candidates are the store's records with ``status == ok``, ``split == train`` and ``has_label`` false.
Records whose pseudo-mask failed QC (``degenerate``: fg_low, fg_high, constant) are left out by
default: the ``uncertain`` score compares the model against that pseudo-mask, and fg_low/fg_high
records are mostly blank frames or thresholding failures (``include_degenerate=True`` keeps them);
``constant`` images (one value, nothing to draw) are always left out. Records with a label that
could not be read (``label_status`` missing / shape_mismatch / unreadable) have ``has_label`` false
and stay candidates.

One batched, no-grad pass of the pretrained U-Net over the candidates gives per record:

* ``embedding``: the deepest encoder feature map, global-average-pooled and L2-normalised;
* ``disagreement`` = 1 - IoU(zero-shot prediction >= 0.5, stored pseudo-mask) (both empty: 0);
* ``entropy``: mean binary predictive entropy of the probability map, in bits (0..1).

``disagreement`` is the ``uncertain`` score. The model was pretrained to reproduce exactly these
pseudo-masks, so where it still disagrees is where the pseudo-mask is inconsistent with what the
model learned from the rest of the store (a thresholding failure, or a hard image): the place an
expert mask adds most over the free one. Mean entropy is kept as a column but not ranked by: the
focal-Tversky loss (false negatives weighted 0.7) leaves the probabilities uncalibrated (inflated),
and mean entropy grows with the length of the objects' boundary, so it ranks "many or large objects"
more than "hard". Disagreement also explains itself to the user ("zero-shot vs pseudo-mask IoU 0.31").

Strategies (``score`` in picks.csv is what the strategy ranked by):

* ``random``: candidates in a seeded random order; score = the uniform key (smaller first).
* ``diverse``: k-center greedy on the embeddings, first pick seeded; score = Euclidean distance
  to the nearest earlier pick when picked (empty for the first).
* ``uncertain``: the n highest disagreements (ties by row); score = disagreement.
* ``hybrid``: k-center greedy (first pick seeded) among the max(4n, 50) most uncertain; score = distance.

Only what a strategy needs is computed over all candidates: ``random`` reads just its picks,
``diverse`` runs the encoder alone (about 3x cheaper than the whole U-Net at 128 px on a CPU),
``uncertain`` and ``hybrid`` run the whole U-Net. The picks themselves always get a full pass
(scores and maps for the gallery). Probability maps are reduced to scalars batch by batch, never
kept for all candidates; embeddings stay on the device, where k-center greedy runs in O(N k) time
and O(N) extra memory (a min-distance vector, no N x N matrix).
"""
from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from medsass.trainer import checkpoint as ck
from medsass.trainer.data import iter_eval
from medsass.trainer.distributed import pick_device
from medsass.trainer.metrics import confusion, iou
from medsass.trainer.model import build_model, load_weights
from medsass.trainer.precision import amp_dtype, use_channels_last
from medsass.trainer.records import rng_for
from medsass.trainer.suggest_gallery import write_gallery
from tqdm.auto import tqdm

import medsass
from medsass.errors import ConfigError, StoreError
from medsass.manifest import atomic_write_bytes, file_digest, manifest_digest, read_manifest, write_json
from medsass.store import open_store

STRATEGIES = ("random", "diverse", "uncertain", "hybrid")
DEFAULT_STRATEGY = "random"  # the scale study found no strategy that beats it under the default recipe (issue 11)
CSV_NAME, GALLERY_NAME, JSON_NAME = "picks.csv", "gallery.html", "suggest.json"
CSV_COLUMNS = ("rank", "sample_id", "source_rel", "strategy", "score", "reason",
               "disagreement", "zero_shot_iou", "entropy", "distance", "row")
THRESHOLD = 0.5
TAG_RANDOM, TAG_FIRST = 11, 12  # independent random streams from one seed (see records.rng_for)


def hybrid_pool_size(n: int) -> int:
    return max(4 * n, 50)


def candidates(store: str | Path, *, include_degenerate: bool = False, pool: str = "unlabeled"):
    """The candidate manifest rows (sorted by row) and how many stored records each rule left out.

    ``pool="labeled"`` ranks the labeled train records instead, as if unlabeled (a study simulating the expert:
    the picks' labels are already in the store)."""
    if pool not in ("unlabeled", "labeled"):
        raise ConfigError(f"--pool {pool!r}: available options are unlabeled, labeled")
    df = read_manifest(store)
    stored = (df["status"] == "ok") & (df["row"] >= 0)
    train = stored & (df["split"] == "train")
    has_label = df["has_label"].astype(bool)
    unlabeled = train & (has_label if pool == "labeled" else ~has_label)
    constant = df["qc_flags"].fillna("").str.contains(r"(?:^|,)constant(?:,|$)")
    usable = unlabeled & ~constant
    keep = usable & (include_degenerate | ~df["degenerate"].astype(bool))
    excluded = {"other_split": int((stored & ~train).sum()), "unlabeled" if pool == "labeled" else "labeled": int((train & ~unlabeled).sum()),
                "constant": int((unlabeled & constant).sum()), "degenerate": int((usable & ~keep).sum())}
    return df[keep].sort_values("row").reset_index(drop=True), excluded


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of Bernoulli(p), elementwise (0 at p = 0 or 1, 1 at p = 0.5)."""
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


@torch.inference_mode()
def forward_pass(model, store: str | Path, rows: np.ndarray, *, batch_size: int, device: torch.device,
                 amp: torch.dtype | None = None, embeddings: bool = True, scores: bool = True, keep_maps: bool = False,
                 progress: bool = False) -> dict[str, Any]:
    """Batched pass over ``rows`` (sorted, unique). Returns ``row`` (np.int64) and what was asked for:

    ``embedding`` (N, C) float32 tensor on ``device``; ``disagreement``, ``zero_shot_iou``, ``entropy``
    (np.float64, N); with ``keep_maps`` also ``image``, ``pseudo_mask`` (uint8) and ``prob`` (float32) maps
    (N, S, S) on the CPU - only for a few rows (the picks)."""
    if not (embeddings or scores):
        raise ValueError("forward_pass needs embeddings or scores")
    model.eval()
    captured: dict[str, torch.Tensor] = {}
    hook = model.encoder.register_forward_hook(lambda _m, _i, out: captured.__setitem__("deep", out[-1])) if embeddings and scores else None
    arrays = ("image", "pseudo_mask") if scores else ("image",)
    parts: dict[str, list] = {k: [] for k in ("row", "embedding", "disagreement", "zero_shot_iou", "entropy", "image", "pseudo_mask", "prob")}
    bar = tqdm(total=len(rows), desc="suggest: model pass", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for batch in iter_eval(store, rows, batch_size=batch_size, arrays=arrays):
            x = batch["image"].to(device, non_blocking=True).float().div_(255)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                if scores:
                    logits = model(x)
                    deep = captured.pop("deep", None)
                else:
                    deep = model.encoder(x)[-1]
            parts["row"].append(batch["row"].numpy())
            if embeddings:
                parts["embedding"].append(F.normalize(deep.float().mean(dim=(2, 3)), dim=1))
            if scores:
                p = torch.sigmoid(logits.float())
                pseudo = batch["pseudo_mask"].to(device) > 0
                tp, fp, fn, _ = confusion(p >= THRESHOLD, pseudo).cpu().numpy().T
                zs = iou(tp, fp, fn)
                parts["zero_shot_iou"].append(zs)
                parts["disagreement"].append(1.0 - zs)
                parts["entropy"].append(binary_entropy(p).mean(dim=(1, 2, 3)).double().cpu().numpy())
                if keep_maps:
                    parts["image"].append(batch["image"][:, 0].numpy())
                    parts["pseudo_mask"].append(batch["pseudo_mask"][:, 0].numpy())
                    parts["prob"].append(p[:, 0].cpu().numpy())
            bar.update(len(x))
    finally:
        bar.close()
        if hook is not None:
            hook.remove()
    out: dict[str, Any] = {"row": np.concatenate(parts["row"]) if parts["row"] else np.zeros(0, np.int64)}
    for key, val in parts.items():
        if key != "row" and val:
            out[key] = torch.cat(val) if key == "embedding" else np.concatenate(val)
    return out


def random_order(m: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``n`` of ``m`` candidates in a seeded random order, and their uniform keys.

    Same seed and candidates, same order; a smaller ``n`` gives a prefix of a larger one."""
    keys = rng_for(seed, TAG_RANDOM).random(m)
    order = np.argsort(keys, kind="stable")[:n]
    return order, keys[order]


def seeded_first(m: int, seed: int) -> int:
    return int(rng_for(seed, TAG_FIRST).integers(m))


def k_center_greedy(emb: torch.Tensor | np.ndarray, k: int, *, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center on the rows of ``emb`` (N, D), on ``emb``'s device; returns (picks, distances).

    Pick ``first``; then repeatedly the point farthest (Euclidean) from its nearest pick so far. Each
    step updates one min-distance vector with a matrix-vector product: O(N D) per pick, O(N) memory
    besides the embeddings, so it scales to millions of points on a GPU. ``distances[i]`` is pick i's
    distance to its nearest earlier pick (NaN for the first). Ties go to the lowest index; duplicates
    of picks are picked only when nothing else is left.
    """
    x = torch.as_tensor(emb)
    n = x.shape[0]
    if not 1 <= k <= n or not 0 <= first < n:
        raise ValueError(f"k-center greedy needs 1 <= k <= {n} and 0 <= first < {n} (got k={k}, first={first})")
    sq = (x * x).sum(dim=1)
    min_d2 = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    picks, dists, cur, d_cur = [], [float("nan")], first, float("nan")
    for i in range(k):
        picks.append(cur)
        d2 = (sq - 2 * (x @ x[cur]) + sq[cur]).clamp_min_(0)
        torch.minimum(min_d2, d2, out=min_d2)
        min_d2[cur] = -1.0  # never again, even against exact duplicates (distance 0)
        if i + 1 < k:
            cur = int(torch.argmax(min_d2))
            d_cur = float(min_d2[cur].clamp_min(0).sqrt())
            dists.append(d_cur)
    return np.asarray(picks, np.int64), np.asarray(dists, np.float64)


def top_uncertain(score: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` highest scores, highest first; ties by position (= row order)."""
    return np.lexsort((np.arange(len(score)), -np.asarray(score)))[:n]


def select(strategy: str, n: int, *, seed: int, embeddings=None, disagreement: np.ndarray | None = None,
           m: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n`` picks in rank order: (positions into the candidates, score, distance to the nearest earlier pick).

    ``random`` needs ``m`` (the number of candidates), ``uncertain`` ``disagreement``, ``diverse`` ``embeddings``
    and ``hybrid`` both; distance is NaN where the strategy measured none (and for the first k-center pick)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r}: available options are {', '.join(STRATEGIES)}")
    nan = np.full(n, np.nan)
    if strategy == "random":
        pos, keys = random_order(int(m), n, seed)
        return pos, keys, nan
    if strategy == "uncertain":
        pos = top_uncertain(disagreement, n)
        return pos, np.asarray(disagreement)[pos], nan
    pool = np.arange(len(embeddings)) if strategy == "diverse" else np.sort(top_uncertain(disagreement, hybrid_pool_size(n)))
    sub = embeddings if strategy == "diverse" else embeddings[torch.as_tensor(pool, device=embeddings.device)]
    local, dist = k_center_greedy(sub, n, first=seeded_first(len(pool), seed))
    return pool[local], dist, dist


def _reason(strategy: str, rec: dict[str, Any], *, seed: int, first: bool, pool: int) -> str:
    agree = f"zero-shot vs pseudo-mask IoU {rec['zero_shot_iou']:.2f}"
    if strategy == "random":
        return f"random pick (seed {seed}); {agree}"
    if strategy == "uncertain":
        return agree
    where = "first pick, drawn at random (seed %d)" % seed if first else f"most distant from picks so far (d={rec['distance']:.2f})"
    return where if strategy == "diverse" else f"among the {pool} most uncertain; {where}; {agree}"


def _load(checkpoint: str | Path, device: torch.device, *, size: int, threads: int | None):
    """The checkpoint's path and dict and its model, in eval mode on ``device``; sets the torch threads
    (``threads``, else the checkpoint config's ``runtime.threads``) and returns the autocast dtype."""
    path = ck.resolve(checkpoint, "pretrain")
    state = ck.load(path)
    model = build_model(state["model_args"])
    load_weights(model, state["model"], parts="all")
    runtime = (state.get("config") or {}).get("runtime") or {}
    threads = threads or runtime.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    stride = int(getattr(model.encoder, "output_stride", 32))
    if size % stride:
        raise ConfigError(f"the store holds {size} px images but the U-Net of {path} needs a multiple of {stride}; "
                          "rebuild the store with --size a multiple of it")
    model.to(device).eval()
    if use_channels_last(runtime.get("channels_last", "auto"), device):
        model.to(memory_format=torch.channels_last)
    return path, state, model, amp_dtype(runtime.get("amp", "auto"), device)


def suggest(checkpoint: str | Path, store: str | Path, n: int, out: str | Path, *, strategy: str = DEFAULT_STRATEGY,
            seed: int = 0, batch_size: int = 32, device: str = "auto", threads: int | None = None,
            include_degenerate: bool = False, progress: bool = False, pool: str = "unlabeled") -> dict[str, Any]:
    """Rank ``n`` candidates of ``store`` with the model of ``checkpoint`` (a .pt, or a run folder: its
    pretrain/final.pt); write OUT/picks.csv, OUT/gallery.html and OUT/suggest.json. Returns suggest.json's data."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r}: available options are {', '.join(STRATEGIES)}")
    if n < 1 or batch_size < 1:
        raise ConfigError(f"--n and --batch-size must be >= 1 (got {n}, {batch_size})")
    store, out = Path(store), Path(out)
    _, info = open_store(store)
    cand, excluded = candidates(store, include_degenerate=include_degenerate, pool=pool)
    if n > len(cand):
        raise StoreError(f"--n {n} but {store} has only {len(cand)} candidate records (unlabeled, train split, usable "
                         f"pseudo-mask; left out: {excluded}); lower --n" + ("" if include_degenerate else " or add --include-degenerate"))
    dev = pick_device(device, option="--device")
    path, state, model, amp = _load(checkpoint, dev, size=info.size, threads=threads)
    rows = cand["row"].to_numpy(np.int64)
    need_emb, need_scores = strategy in ("diverse", "hybrid"), strategy in ("uncertain", "hybrid")
    t0 = time.perf_counter()
    full = {}
    if need_emb or need_scores:
        full = forward_pass(model, store, rows, batch_size=batch_size, device=dev, amp=amp, embeddings=need_emb,
                            scores=need_scores, progress=progress)
        assert np.array_equal(full["row"], rows)  # iter_eval yields the sorted rows in order
    t_pass = time.perf_counter() - t0
    pos, score, dist = select(strategy, n, seed=seed, embeddings=full.get("embedding"), disagreement=full.get("disagreement"), m=len(rows))
    t_select = time.perf_counter() - t0 - t_pass
    maps = forward_pass(model, store, np.sort(rows[pos]), batch_size=batch_size, device=dev, amp=amp, embeddings=False, keep_maps=True)
    picks, order = _records(strategy, cand, pos, score, dist, full if need_scores else None, maps, seed=seed)
    summary = {
        "strategy": strategy, "n": n, "seed": seed, "batch_size": batch_size, "device": str(dev), "threads": torch.get_num_threads(),
        "include_degenerate": include_degenerate, "pool": pool, "threshold": THRESHOLD, "uncertain_score": "disagreement",
        "hybrid_pool": min(hybrid_pool_size(n), len(rows)) if strategy == "hybrid" else None,
        "checkpoint": {"path": str(path.resolve()), "sha256": file_digest(path), "stage": state.get("stage"), "kind": state.get("kind"),
                       "step": state.get("step"), "model_args": state["model_args"],
                       "trained_on_this_store": any(str(Path(s.get("path", "")).resolve()) == str(store.resolve())
                                                    for s in (state.get("stores") or {}).values())},
        "store": {"path": str(store.resolve()), "manifest_digest": manifest_digest(store), "size": info.size},
        "candidates": len(rows), "excluded": excluded,
        "timing_s": {"model_pass": round(t_pass, 3), "select": round(t_select, 4),
                     "records_per_s": round(len(rows) / t_pass, 1) if t_pass > 0 and full else None},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "medsass_version": medsass.__version__,
        "torch_version": str(torch.__version__), "outputs": [CSV_NAME, GALLERY_NAME],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_picks_csv(out / CSV_NAME, picks)
    write_gallery(out / GALLERY_NAME, picks, maps["image"][order], maps["pseudo_mask"][order], maps["prob"][order], summary)
    write_json(summary, out / JSON_NAME)
    return summary


def _records(strategy: str, cand, pos: np.ndarray, score: np.ndarray, dist: np.ndarray, full: dict[str, Any] | None,
             maps: dict[str, Any], *, seed: int) -> tuple[list[dict[str, Any]], list[int]]:
    """picks.csv rows in rank order, and each pick's index into ``maps`` (the picks' own pass, in row order).

    The scores come from the candidates' pass ``full`` where it computed them (indexed by position), else from ``maps``."""
    rows = cand["row"].to_numpy(np.int64)[pos]
    at = {int(r): i for i, r in enumerate(maps["row"])}
    order = [at[int(r)] for r in rows]
    pool = min(hybrid_pool_size(len(pos)), len(cand))
    picks = []
    for rank, (p, k, s, d) in enumerate(zip(pos, order, score, dist), start=1):
        src, i = (full, p) if full is not None else (maps, k)
        c = cand.iloc[p]
        rec = {"rank": rank, "sample_id": str(c["sample_id"]), "source_rel": str(c["source_rel"]), "strategy": strategy,
               "score": float(s), "disagreement": float(src["disagreement"][i]), "zero_shot_iou": float(src["zero_shot_iou"][i]),
               "entropy": float(src["entropy"][i]), "distance": float(d), "row": int(c["row"])}
        rec["reason"] = _reason(strategy, rec, seed=seed, first=rank == 1, pool=pool)
        picks.append(rec)
    return picks, order


def write_picks_csv(path: Path, picks: Sequence[dict[str, Any]]) -> None:
    """picks.csv: one row per pick in rank order; NaN (no distance, first k-center pick) is written empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in picks:
        writer.writerow({k: ("" if isinstance(v, float) and np.isnan(v) else round(v, 6) if isinstance(v, float) else v)
                         for k, v in rec.items()})
    atomic_write_bytes(path, buf.getvalue().encode())
