"""Paired bootstrap intervals over test images and seeds, from per-image confusion counts.

A run's score is the micro IoU of its test split (pixels pooled over images, as ``smp.metrics``). An arm's score at
a budget is the mean over seeds. The paired difference of two arms resamples, in each bootstrap draw, the same test
images (with replacement) for both arms and every seed, and the seeds (with replacement) for both arms, then takes
the difference of the two seed-mean micro IoUs. The 95% interval is the 2.5th and 97.5th percentile of those draws.
Seeds pair the arms (same labeled subset, initial weights and batch order); images pair the runs of one seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsass.metrics import micro_iou

__all__ = ["MIN_SEEDS_BOLD", "Estimate", "estimate", "micro_iou", "paired_difference"]

MIN_SEEDS_BOLD = 3  # with fewer seeds the interval leaves out training randomness: shown, never bold (nor filled)



@dataclass(frozen=True)
class Estimate:
    mean: float  # seed-mean micro IoU (or difference)
    sd: float  # sd over seeds
    lo: float  # 95% bootstrap interval
    hi: float
    n_seeds: int

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def _draws(n_images: int, n_seeds: int, reps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, n_images, size=(reps, n_images))
    weights = np.zeros((reps, n_images), np.float64)
    np.add.at(weights, (np.arange(reps)[:, None], img), 1.0)
    return weights, rng.integers(0, n_seeds, size=(reps, n_seeds))


def _boot_ious(counts: np.ndarray, weights: np.ndarray, seed_idx: np.ndarray) -> np.ndarray:
    """counts (S, N, 3) -> (reps,) seed-mean micro IoU for each draw."""
    sums = np.einsum("rn,snk->rsk", weights, counts.astype(np.float64))  # (reps, S, 3)
    den = sums.sum(-1)
    ious = np.where(den > 0, sums[..., 0] / np.maximum(den, 1e-12), 1.0)  # (reps, S)
    return np.take_along_axis(ious, seed_idx, axis=1).mean(1)


def estimate(counts: np.ndarray, *, reps: int = 2000, seed: int = 0) -> Estimate:
    """Seed-mean micro IoU of one arm with its bootstrap interval. counts: (S, N, 3)."""
    counts = np.asarray(counts).reshape(len(counts), -1, 3)
    per_seed = np.array([micro_iou(c) for c in counts])
    w, s = _draws(counts.shape[1], counts.shape[0], reps, seed)
    boot = _boot_ious(counts, w, s)
    return Estimate(float(per_seed.mean()), _sd(per_seed), *np.percentile(boot, [2.5, 97.5]).tolist(), len(counts))


def paired_difference(a: np.ndarray, b: np.ndarray, *, reps: int = 2000, seed: int = 0) -> Estimate:
    """Seed-mean micro IoU of ``a`` minus ``b`` (both (S, N, 3), same seeds and images in the same order)."""
    a, b = (np.asarray(x).reshape(len(x), -1, 3) for x in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"paired arms need the same seeds and test images, got shapes {a.shape} and {b.shape}")
    diff = np.array([micro_iou(x) - micro_iou(y) for x, y in zip(a, b)])
    w, s = _draws(a.shape[1], a.shape[0], reps, seed)
    boot = _boot_ious(a, w, s) - _boot_ious(b, w, s)
    return Estimate(float(diff.mean()), _sd(diff), *np.percentile(boot, [2.5, 97.5]).tolist(), len(a))


def _sd(x: np.ndarray) -> float:
    return float(x.std(ddof=1)) if len(x) > 1 else float("nan")
