"""Which records to train on, and in which order: pure functions of the manifest and row indices.

* :func:`select_rows` picks rows from a store's manifest (split, status, degenerate, labels, label budgets, or
  exactly the records of a list of sample ids: :func:`read_sample_ids`, :func:`check_sample_ids`).
* :func:`plan_blocks` groups selected rows into read blocks (the selected rows of one shard, split
  further when there are too few shards for the consumers).
* :func:`epoch_blocks` / :func:`epoch_order` give one consumer's (rank x dataloader worker) share of
  an epoch. They read no image data, which is what makes exact resume cheap.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from medsass import manifest as manifest_mod
from medsass import store as store_mod
from medsass.errors import ConfigError, StoreError

# Tags keep the random streams derived from one user seed independent of each other.
TAG_EPOCH, TAG_BLOCK, TAG_MIX, TAG_SHUFFLE = 1, 2, 3, 4
_MASK64 = (1 << 64) - 1


def _entropy(*values: int) -> list[int]:
    """Non-negative entropy words for ``np.random.SeedSequence`` (seeds may be negative)."""
    return [int(v) & _MASK64 for v in values]


def rng_for(*values: int) -> np.random.Generator:
    """A generator seeded by a tuple of ints (seed, tag, ...); same tuple, same stream."""
    return np.random.default_rng(np.random.SeedSequence(_entropy(*values)))


def check_target(target: str) -> None:
    """Raise ConfigError unless ``target`` names a mask array of the store layout."""
    ok = target in (store_mod.PSEUDO_MASK, store_mod.LABEL) or (
        target.startswith(store_mod.PSEUDO_GROUP + "/") and len(target) > len(store_mod.PSEUDO_GROUP) + 1
    )
    if not ok:
        raise ConfigError(
            f"unknown target {target!r}; available options are 'pseudo_mask', 'label' or 'pseudo_labels/<name>'"
        )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _priority(rows: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 key per row.

    The key of a row depends only on (row, seed), so the subset picked for a budget does not change
    when other rows are added or removed, and smaller budgets are prefixes of larger ones.
    """
    salt = _splitmix64(np.array([int(seed) & _MASK64], np.uint64))[0]
    return _splitmix64(rows.astype(np.uint64) ^ salt)


def label_subset(labeled: np.ndarray, *, seed: int, fraction: float | None = None, count: int | None = None) -> np.ndarray:
    """Seeded nested subset of ``labeled`` rows (sorted result): count = max(1, round(fraction * n)).

    Rows are ranked by a seeded hash of their index and the first ``count`` are kept, so a smaller
    budget is always a subset of a larger one with the same seed (1% ⊂ 10% ⊂ 100%).
    """
    n = len(labeled)
    if fraction is not None and count is not None:
        raise ConfigError("give label_fraction or label_count, not both")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"label_fraction must be in (0, 1], got {fraction}")
        count = max(1, int(round(fraction * n)))
    if count is None:
        return np.sort(labeled)
    if count < 1 or count > n:
        raise ConfigError(f"label_count must be between 1 and the {n} labeled records available, got {count}")
    keys = _priority(labeled, seed)
    order = np.lexsort((labeled, keys))  # ties (never seen in practice) broken by row
    return np.sort(labeled[order[:count]])


def select_rows(
    store: str | Path,
    *,
    splits: Sequence[str],
    target: str = "pseudo_mask",
    exclude_degenerate: bool = True,
    require_label: bool = False,
    label_fraction: float | None = None,
    label_count: int | None = None,
    sample_ids: Sequence[str] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Sorted int64 row indices of ``status == 'ok'`` records of ``store`` in ``splits``.

    target 'pseudo_mask' or 'pseudo_labels/<name>' drops degenerate records when
    ``exclude_degenerate``; target 'label' or ``require_label`` keeps labeled records only.
    A 'pseudo_labels/<name>' target with a sidecar table (:func:`pseudo_label_sidecar`) keeps only
    the rows the sidecar lists and takes their ``degenerate`` flag from it.
    ``label_fraction`` (0 < f <= 1) or ``label_count`` keep a seeded, nested subset of the labeled
    rows (and imply ``require_label``); see :func:`label_subset`. ``sample_ids`` keeps exactly the labeled
    records with those ids instead (implies ``require_label``; :func:`check_sample_ids` says what is wrong
    with ids that select nothing).
    """
    if sample_ids is not None and (label_fraction is not None or label_count is not None):
        raise ConfigError("give sample_ids (finetune.labeled_ids) or label_fraction / label_count, not both")
    check_target(target)
    if isinstance(splits, str):
        splits = [splits]
    unknown = [s for s in splits if s not in manifest_mod.SPLITS or not s]
    if not splits or unknown:
        raise ConfigError(f"unknown split(s) {list(unknown) or list(splits)}; available options are 'train', 'val', 'test'")
    df = manifest_mod.read_manifest(store)
    where = f"split {'+'.join(splits)} of {store}"
    keep = (df["status"] == "ok").to_numpy() & df["split"].isin(list(splits)).to_numpy() & (df["row"] >= 0).to_numpy()
    sidecar = pseudo_label_sidecar(store, target)
    if sidecar is not None:  # rows never re-labelled (test, other splits) have no pseudo-label; its own QC flag applies
        flags = dict(zip(sidecar["row"].tolist(), sidecar["degenerate"].tolist()))
        keep &= df["row"].isin(list(flags)).to_numpy()
        df = df.assign(degenerate=[bool(flags.get(r, True)) for r in df["row"].tolist()])
        where += f" covered by {target}"
    if not keep.any():
        present = sorted(set(df.loc[df["status"] == "ok", "split"]))
        raise StoreError(f"no stored records in {where} (splits present: {present}); rebuild the store or pick another split")
    labels_only = (require_label or target == store_mod.LABEL or label_fraction is not None or label_count is not None
                   or sample_ids is not None)
    if labels_only:
        keep &= df["has_label"].to_numpy(bool)
        if not keep.any():
            raise StoreError(f"no labeled records in {where}: build the store with --labels, or add them with "
                             f"`medsass-prep add-labels {store} --labels DIR`")
        if sample_ids is not None:
            keep &= df["sample_id"].isin(list(sample_ids)).to_numpy()
            if not keep.any():
                raise StoreError(f"none of the {len(sample_ids)} listed sample ids is a labeled record in {where}")
    elif exclude_degenerate:
        n_before = int(keep.sum())
        keep &= ~df["degenerate"].to_numpy(bool)
        if not keep.any():
            raise StoreError(
                f"all {n_before} records in {where} have degenerate pseudo-masks; check the thresholding "
                "parameters of the store or pass exclude_degenerate=False"
            )
    rows = np.unique(df.loc[keep, "row"].to_numpy(np.int64))
    if label_fraction is not None or label_count is not None:
        rows = label_subset(rows, seed=seed, fraction=label_fraction, count=label_count)
    return rows.astype(np.int64)


def read_sample_ids(path: str | Path, *, key: str = "finetune.labeled_ids") -> list[str]:
    """Sample ids, in file order without repeats, from a CSV with a ``sample_id`` column (e.g. the picks.csv of
    ``medsass-train suggest``; other columns are ignored) or a text file with one id per line (blank lines and
    lines starting with ``#`` skipped)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}: {p} does not exist; give a picks.csv (column sample_id) or a text file with one "
                          "sample id per line")
    text = p.read_text(encoding="utf-8-sig")
    first = next((line for line in text.splitlines() if line.strip()), "")
    header = [h.strip() for h in next(csv.reader([first]), [])]
    if "sample_id" in header:
        reader = csv.reader(io.StringIO(text))
        col = [h.strip() for h in next(reader)].index("sample_id")
        ids = [row[col].strip() for row in reader if len(row) > col]
    else:
        ids = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    ids = list(dict.fromkeys(i for i in ids if i))
    if not ids:
        raise ConfigError(f"{key}: {p} lists no sample ids (a CSV needs a sample_id column; a text file one id per line)")
    return ids


def sample_ids_digest(ids: Sequence[str]) -> str:
    """sha256 of a set of sample ids (order and repeats do not matter)."""
    return hashlib.sha256("\n".join(sorted(set(ids))).encode()).hexdigest()


def check_sample_ids(stores: dict[str, str | Path], ids: Sequence[str], *, splits: Sequence[str], source: str,
                     key: str = "finetune.labeled_ids") -> None:
    """Raise ConfigError unless every id is a stored, labeled record in ``splits`` of one of ``stores`` and every
    store has at least one; the message names the ids and what to do about them."""
    usable: set[str] = set()
    why: dict[str, str] = {}
    empty = []
    for name, path in stores.items():
        df = manifest_mod.read_manifest(path)
        df = df[df["sample_id"].isin(list(ids))]
        ok = df[(df["status"] == "ok") & (df["row"] >= 0)]
        good = ok[ok["has_label"].astype(bool) & ok["split"].isin(list(splits))]
        usable |= set(good["sample_id"])
        if good.empty:
            empty.append(name)
        for sid, st, split, has in zip(df["sample_id"], df["status"], df["split"], df["has_label"]):
            if st != "ok":
                why.setdefault(sid, f"not stored in store {name!r} ({st} at build-masks)")
            elif split not in splits:
                why.setdefault(sid, f"in split {split!r} of store {name!r}, not in finetune.splits {list(splits)}")
            elif not has:
                why.setdefault(sid, f"no label yet in store {name!r} (add the masks with `medsass-prep add-labels {path} "
                                    "--labels DIR`)")
    bad = [i for i in ids if i not in usable]
    if bad:
        groups: dict[str, list[str]] = {}
        for i in bad:
            groups.setdefault(why.get(i, f"not a sample_id of store(s) {list(stores)} (was the file made for them?)"), []).append(i)
        parts = [f"{reason}: {', '.join(g[:5])}" + (f" and {len(g) - 5} more" if len(g) > 5 else "") for reason, g in groups.items()]
        raise ConfigError(f"{key}: {len(bad)} of the {len(ids)} ids in {source} are not labeled records to fine-tune "
                          "on; " + "; ".join(parts))
    if empty:
        raise ConfigError(f"{key}: {source} lists no record of finetune store(s) {empty}; give them weight 0 in "
                          "finetune.stores, or list some of their records")


def pseudo_label_sidecar(store: str | Path, target: str):
    """The per-record table ``<store>/pseudo_labels/<name>.parquet`` of a pseudo-label target, or None.

    Written by :mod:`medsass.trainer.selftrain` (columns sample_id, row, split, fg_fraction,
    mean_confidence, degenerate); None for other targets or arrays written without one.
    """
    if not target.startswith(store_mod.PSEUDO_GROUP + "/"):
        return None
    path = Path(store) / f"{target}.parquet"
    if not path.exists():
        return None
    return pq.read_table(path).to_pandas()


def plan_blocks(rows: np.ndarray, shard_records: int, n_consumers: int) -> list[np.ndarray]:
    """Split sorted ``rows`` into read blocks: the selected rows of each shard, in shard order.

    When there are fewer than ``2 * n_consumers`` shards, every block is split further into nearly
    equal contiguous pieces of at most ``ceil(len(rows) / (2 * n_consumers))`` rows (down to single
    rows), so that every consumer gets work. The plan never depends on the epoch.
    """
    rows = np.asarray(rows, np.int64)
    if len(rows) == 0:
        return []
    shard = rows // shard_records
    cuts = np.flatnonzero(np.diff(shard)) + 1
    blocks = np.split(rows, cuts)
    if len(blocks) >= 2 * n_consumers:
        return blocks
    max_len = max(1, math.ceil(len(rows) / (2 * n_consumers)))
    return [piece for b in blocks for piece in np.array_split(b, math.ceil(len(b) / max_len))]


def epoch_blocks(n_blocks: int, *, seed: int, source: int, epoch: int, consumer: int, n_consumers: int) -> np.ndarray:
    """Block ids (into :func:`plan_blocks`) that ``consumer`` reads in ``epoch``, in reading order.

    The blocks are permuted with a generator seeded by (seed, source, epoch) and dealt round-robin
    to the consumers from a seeded starting consumer, so the consumers' shares are disjoint, cover
    every block once per epoch, and no consumer is always the one left without a block.
    """
    if not 0 <= consumer < n_consumers:
        raise ValueError(f"consumer {consumer} out of range for {n_consumers} consumers")
    rng = rng_for(seed, TAG_EPOCH, source, epoch)
    perm = rng.permutation(n_blocks)
    shift = int(rng.integers(n_consumers))
    return perm[(consumer + shift) % n_consumers :: n_consumers]


def block_permutation(n: int, *, seed: int, source: int, epoch: int, block: int) -> np.ndarray:
    """The order in which the rows of one block are visited in one epoch."""
    return rng_for(seed, TAG_BLOCK, source, epoch, block).permutation(n)


def epoch_order(
    rows: np.ndarray,
    *,
    shard_records: int,
    seed: int,
    epoch: int,
    consumer: int,
    n_consumers: int,
    source: int = 0,
) -> np.ndarray:
    """Rows one consumer reads from one source in one epoch, before the shuffle buffer.

    ``consumer = rank * num_workers + worker`` and ``n_consumers = world_size * num_workers``
    (``num_workers`` counted as 1 when the DataLoader has none). This is exactly the order the
    stream uses; it is exposed for tests and tools.
    """
    plan = plan_blocks(rows, shard_records, n_consumers)
    ids = epoch_blocks(len(plan), seed=seed, source=source, epoch=epoch, consumer=consumer, n_consumers=n_consumers)
    parts = [plan[b][block_permutation(len(plan[b]), seed=seed, source=source, epoch=epoch, block=int(b))] for b in ids]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
