"""Reading the store: whole-shard reads and the infinite, exactly resumable training stream.

The training stream is built in two layers. A *key stream* — (source, block, index) triples computed
from row indices only (:mod:`medsass.trainer.records`), interleaved across sources and passed
through a seeded shuffle buffer — decides what every consumer yields. Image data is attached to keys
block by block. Resuming at batch ``k`` replays the key stream without reading images, then reads
only the rows still sitting in the shuffle buffer, so the resumed stream is bit-identical.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from medsass.trainer.records import (
    TAG_MIX,
    TAG_SHUFFLE,
    block_permutation,
    check_target,
    epoch_blocks,
    plan_blocks,
    rng_for,
)
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medsass import store as store_mod
from medsass.errors import ConfigError, StoreError


class ArrayReader:
    """Reads rows of one (N, S, S) store array through zarr, one slice read per shard.

    The shard's inner chunks are decoded as one batch (``codec_pipeline.batch_size``), which is
    ~1.5x faster than zarr's default chunk-by-chunk pipeline; sparse selections use ``oindex``.
    The zarr array is opened lazily, so the reader pickles into DataLoader workers unopened.
    """

    def __init__(self, store: str | Path, name: str):
        self.path = Path(store) / name
        meta = store_mod.array_meta(store, name)
        self.n_records, self.size, self.shard_records = meta.n_records, meta.size, meta.shard_records
        self._zarr: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zarr": None}

    def read(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), S, S) uint8 for sorted ``rows`` that all lie in one shard."""
        shard = int(rows[0]) // self.shard_records
        if int(rows[-1]) // self.shard_records != shard:
            raise ValueError(f"rows {rows[0]}..{rows[-1]} span several shards of {self.path}; use read_rows()")
        if self._zarr is None:
            self._zarr = zarr.open_array(store=str(self.path), mode="r")
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        with zarr.config.set({"codec_pipeline.batch_size": max(1, hi - lo)}):
            if len(rows) * 2 >= hi - lo:
                return np.ascontiguousarray(self._zarr[lo:hi][rows - lo])
            return np.ascontiguousarray(self._zarr.oindex[rows])


def read_rows(reader: ArrayReader, rows: np.ndarray) -> np.ndarray:
    """(len(rows), S, S) for sorted ``rows`` spanning any number of shards (one read per shard)."""
    cuts = np.flatnonzero(np.diff(rows // reader.shard_records)) + 1
    parts = [reader.read(part) for part in np.split(rows, cuts)] if len(rows) else []
    return np.concatenate(parts) if parts else np.zeros((0, reader.size, reader.size), np.uint8)


@dataclass(frozen=True, eq=False)
class Source:
    """One store to stream from: its selected rows, mixing weight and target array."""

    store: Path
    rows: np.ndarray  # from select_rows: sorted, unique int64
    weight: float = 1.0  # sampling weight when several stores are mixed (normalised over sources)
    target: str = "pseudo_mask"  # 'pseudo_mask', 'label' or 'pseudo_labels/<name>'

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        object.__setattr__(self, "rows", np.asarray(self.rows, dtype=np.int64))


class _Shuffler:
    """Seeded shuffle buffer whose decisions depend only on its rng, never on the items."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng, self.items = size, rng, []
        self._draws: Iterator[int] = iter(())

    def push(self, item: Any) -> Any | None:
        """Add ``item``; return the item leaving the buffer, or None while it fills."""
        if self.size <= 1:
            return item
        if len(self.items) < self.size:
            self.items.append(item)
            return None
        j = next(self._draws, None)
        if j is None:
            self._draws = iter(self.rng.integers(0, self.size, 4096).tolist())
            j = next(self._draws)
        out, self.items[j] = self.items[j], item
        return out


def _source_keys(plan: list[np.ndarray], source: int, seed: int, consumer: int, n_consumers: int) -> Iterator[tuple[int, int, int]]:
    """(source, block, index-in-block) of one source for one consumer, epoch after epoch."""
    epoch = 0
    while True:
        for b in epoch_blocks(len(plan), seed=seed, source=source, epoch=epoch, consumer=consumer, n_consumers=n_consumers).tolist():
            for i in block_permutation(len(plan[b]), seed=seed, source=source, epoch=epoch, block=b).tolist():
                yield source, b, i
        epoch += 1


def key_stream(plans: list[list[np.ndarray]], weights: np.ndarray, seed: int, consumer: int, n_consumers: int) -> Iterator[tuple[int, int, int]]:
    """Sources interleaved by a seeded weighted choice; each source cycles its own epochs."""
    its = [_source_keys(plan, s, seed, consumer, n_consumers) for s, plan in enumerate(plans)]
    if len(its) == 1:
        yield from its[0]
        return
    rng, p = rng_for(seed, TAG_MIX, consumer, n_consumers), weights / weights.sum()
    while True:
        for s in rng.choice(len(its), size=1024, p=p).tolist():
            yield next(its[s])


class ShardStream(IterableDataset):
    """An infinite, exactly resumable stream of samples from one or more stores.

    Samples are ``{'image': uint8 (1,S,S), 'target': uint8 (1,S,S) in {0,1}, 'row': int, 'source': int}``.
    The stream is a pure function of (sources, seed, world_size, rank, num_workers, batch_size);
    ``start_batch=k`` continues as if this rank's DataLoader had already yielded ``k`` batches.
    Each (rank, worker) consumer reads a disjoint share of every source's blocks per epoch, through a
    seeded shuffle buffer of ``shuffle_buffer`` samples (0 or 1: none). A source whose selected
    image+target bytes fit ``in_memory_limit_mb`` is kept in each worker's memory once read.
    Nothing is opened before iteration, so the object pickles to fork and spawn workers alike.
    """

    def __init__(self, sources: Sequence[Source], *, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 256, batch_size: int, start_batch: int = 0, in_memory_limit_mb: int = 512):
        super().__init__()
        if not sources:
            raise ConfigError("ShardStream needs at least one Source")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is out of range for world_size {world_size}")
        if batch_size < 1 or start_batch < 0 or shuffle_buffer < 0:
            raise ConfigError(f"batch_size must be >= 1 and start_batch, shuffle_buffer >= 0 (got {batch_size}, {start_batch}, {shuffle_buffer})")
        self.sources, self.seed, self.rank, self.world_size = list(sources), int(seed), rank, world_size
        self.shuffle_buffer, self.batch_size, self.start_batch = shuffle_buffer, batch_size, start_batch
        self.in_memory_limit_mb = in_memory_limit_mb
        self.image_size = _check_sources(self.sources)
        self.weights = np.array([s.weight for s in self.sources], np.float64)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        n_workers = 1 if info is None else info.num_workers
        # A new DataLoader starts its round-robin at worker 0, but batch start_batch of the original
        # run came from worker start_batch % n_workers: DataLoader worker w plays that logical worker.
        worker = 0 if info is None else (info.id + self.start_batch) % n_workers
        consumer, n_consumers = self.rank * n_workers + worker, self.world_size * n_workers
        readers = [(ArrayReader(s.store, store_mod.IMAGE), ArrayReader(s.store, s.target)) for s in self.sources]
        plans = [plan_blocks(s.rows, r[0].shard_records, n_consumers) for s, r in zip(self.sources, readers)]
        keys = key_stream(plans, self.weights, self.seed, consumer, n_consumers)
        shuffler = _Shuffler(self.shuffle_buffer, rng_for(self.seed, TAG_SHUFFLE, consumer, n_consumers))
        # Skip what this logical worker contributed to the first start_batch batches (batch i comes
        # from worker i % n_workers), on row indices only.
        to_skip = len(range(worker, self.start_batch, n_workers)) * self.batch_size
        while to_skip:
            if shuffler.push(next(keys)) is not None:
                to_skip -= 1
        blocks = _BlockReader(self.sources, readers, plans, self.in_memory_limit_mb)
        shuffler.items = blocks.samples(shuffler.items)
        for key in keys:
            out = shuffler.push(blocks.sample(key))
            if out is not None:
                yield out


class _BlockReader:
    """Attaches image data to keys: one read per block, whole sources cached when small."""

    def __init__(self, sources: list[Source], readers: list[tuple[ArrayReader, ArrayReader]], plans: list[list[np.ndarray]], limit_mb: int):
        self.readers, self.plans = readers, plans
        self.current: list[tuple[int, np.ndarray, np.ndarray] | None] = [None] * len(sources)
        size = readers[0][0].size
        self.cache: list[dict[int, tuple[np.ndarray, np.ndarray]] | None] = [
            {} if len(s.rows) * size * size * 2 <= limit_mb * 2**20 else None for s in sources
        ]

    def _block(self, s: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        cache = self.cache[s]
        if cache is not None and b in cache:
            return cache[b]
        rows = self.plans[s][b]
        data = (self.readers[s][0].read(rows), self.readers[s][1].read(rows))
        if cache is not None:
            cache[b] = data
        return data

    def sample(self, key: tuple[int, int, int]) -> dict[str, Any]:
        s, b, i = key
        cur = self.current[s]
        if cur is None or cur[0] != b:
            cur = self.current[s] = (b, *self._block(s, b))
        return _sample(cur[1][i], cur[2][i], int(self.plans[s][b][i]), s)

    def samples(self, keys: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
        """Data for arbitrary keys (the shuffle buffer on resume): one read per (source, shard)."""
        out: list[dict[str, Any] | None] = [None] * len(keys)
        for s, (img_reader, tgt_reader) in enumerate(self.readers):
            mine = [(n, int(self.plans[s][b][i])) for n, (src, b, i) in enumerate(keys) if src == s]
            rows = np.unique(np.array([row for _, row in mine], np.int64))
            images, targets = read_rows(img_reader, rows), read_rows(tgt_reader, rows)
            for n, row in mine:
                j = int(np.searchsorted(rows, row))
                out[n] = _sample(images[j], targets[j], row, s)
        return out  # type: ignore[return-value]


def _sample(image: np.ndarray, target: np.ndarray, row: int, source: int) -> dict[str, Any]:
    # Copies: a sample must not keep its whole block alive while it waits in the shuffle buffer.
    return {"image": torch.from_numpy(image[None].copy()), "target": torch.from_numpy(target[None].copy()), "row": row, "source": source}


def _check_sources(sources: list[Source]) -> int:
    """Validate sources against their stores (without keeping anything open); return the common S."""
    size, first = None, None
    for src in sources:
        check_target(src.target)
        _, info = store_mod.open_store(src.store)
        rows = src.rows
        if rows.ndim != 1 or len(rows) == 0:
            raise ConfigError(f"source {src.store}: no rows selected; use select_rows() to pick them")
        if np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= info.n_records:
            raise ConfigError(f"source {src.store}: rows must be sorted, unique and in [0, {info.n_records}); use select_rows()")
        if not (src.weight > 0 and np.isfinite(src.weight)):
            raise ConfigError(f"source {src.store}: weight must be a positive number, got {src.weight}")
        image, target = ArrayReader(src.store, store_mod.IMAGE), ArrayReader(src.store, src.target)  # StoreError if missing
        if image.shard_records != target.shard_records:
            raise StoreError(f"{src.store}: arrays image and {src.target} have different shard sizes; rebuild {src.target}")
        if size is None:
            size, first = info.size, src.store
        elif info.size != size:
            raise StoreError(f"stores {first} (S={size}) and {src.store} (S={info.size}) have different image sizes; "
                             "rebuild one with the same --size to mix them")
    assert size is not None
    return size


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGTERM, which the trainer handles.

    torch's workers die on a SIGTERM that their parent did not send, and the trainer then fails with "DataLoader
    worker killed" instead of writing ``last.pt`` (:mod:`medsass.trainer.preempt`). SLURM's pre-emption and
    ``scancel`` signal every process of the job, workers included. Ignoring it is safe: a worker still exits when
    the trainer shuts the loader down, and when the trainer dies (torch's watchdog checks the parent).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: ShardStream, *, batch_size: int, num_workers: int, pin_memory: bool,
                prefetch_factor: int = 4, multiprocessing_context: str | None = None) -> DataLoader:
    """The DataLoader for a :class:`ShardStream`: batch ``i`` comes from worker ``i % num_workers``.

    Create one iterator per run (``iter(loader)`` restarts the stream at ``start_batch``); to resume,
    build a new stream with ``start_batch`` = batches already taken and the same ``num_workers``.
    Workers ignore SIGTERM (:func:`ignore_sigterm`): the trainer decides when to stop.
    """
    if batch_size != dataset.batch_size:
        raise ConfigError(f"make_loader batch_size={batch_size} differs from the stream's batch_size={dataset.batch_size}; "
                          "they must match for exact resume")
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=prefetch_factor if num_workers > 0 else None, in_order=True,
                      worker_init_fn=ignore_sigterm if num_workers > 0 else None,
                      multiprocessing_context=multiprocessing_context if num_workers > 0 else None)
