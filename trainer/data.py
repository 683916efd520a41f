"""Training data: record selection, the infinite shard stream, and evaluation batches.

The one import point for the rest of the trainer. Selection and ordering (pure row-index functions)
live in :mod:`medsass.trainer.records`; shard reading and the stream in :mod:`medsass.trainer.stream`;
the evaluation iterator is here.

Typical use::

    rows = select_rows(store, splits=["train"])                        # pretrain on pseudo-masks
    ds = ShardStream([Source(store, rows)], seed=0, batch_size=16, rank=r, world_size=w, start_batch=k)
    loader = make_loader(ds, batch_size=16, num_workers=4, pin_memory=True)
    for batch in loader: ...                                           # infinite: stop by step count
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from medsass.trainer.records import (
    check_sample_ids,
    epoch_blocks,
    epoch_order,
    label_subset,
    plan_blocks,
    read_sample_ids,
    select_rows,
)
from medsass.trainer.stream import (
    ArrayReader,
    ShardStream,
    Source,
    make_loader,
    read_rows,
)

from medsass import store as store_mod
from medsass.errors import ConfigError

__all__ = [
    "ArrayReader", "ShardStream", "Source", "check_sample_ids", "epoch_blocks", "epoch_order", "iter_eval",
    "label_subset", "make_loader", "plan_blocks", "read_rows", "read_sample_ids", "select_rows",
]


def iter_eval(store: str | Path, rows: np.ndarray, *, batch_size: int, rank: int = 0, world_size: int = 1,
              arrays: Sequence[str] = ("image", "label", "pseudo_mask")) -> Iterator[dict[str, torch.Tensor]]:
    """Un-augmented batches over ``rows`` in row order: ``{'row': (B,) int64, name: (B,1,S,S) uint8}``.

    Rank ``r`` takes the ``r``-th of ``world_size`` contiguous, nearly equal parts of the sorted
    rows, so all ranks together cover every row once (ranks may get one batch more or less).
    """
    if not 0 <= rank < world_size or batch_size < 1:
        raise ConfigError(f"need 0 <= rank < world_size and batch_size >= 1 (got {rank}, {world_size}, {batch_size})")
    store_mod.open_store(store)
    readers = {name: ArrayReader(store, name) for name in arrays}
    part = np.array_split(np.unique(np.asarray(rows, np.int64)), world_size)[rank]
    shard_records = next(iter(readers.values())).shard_records if readers else 1
    pending: dict[str, list[np.ndarray]] = {name: [] for name in ["row", *arrays]}
    n_pending = 0
    groups = np.split(part, np.flatnonzero(np.diff(part // shard_records)) + 1) if len(part) else []
    for i, group in enumerate(groups):  # one group = the rows of one shard: one read per array
        pending["row"].append(group)
        for name, reader in readers.items():
            pending[name].append(reader.read(group))
        n_pending += len(group)
        last = i == len(groups) - 1
        if n_pending < batch_size and not last:
            continue
        cat = {k: np.concatenate(v) for k, v in pending.items()}
        n_out = n_pending if last else n_pending - n_pending % batch_size
        for a in range(0, n_out, batch_size):
            b = min(a + batch_size, n_out)
            yield {k: torch.from_numpy(v[a:b] if k == "row" else v[a:b, None]) for k, v in cat.items()}
        pending, n_pending = {k: [v[n_out:]] for k, v in cat.items()}, n_pending - n_out
