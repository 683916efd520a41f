"""The shard stream: coverage per epoch, determinism, mixing, exact resume, workers, readers, eval."""
from __future__ import annotations

import itertools
import pickle
import shutil

import numpy as np
import pytest
import torch
import zarr
from medsass.trainer.data import (
    ArrayReader,
    ShardStream,
    Source,
    epoch_order,
    iter_eval,
    make_loader,
    read_rows,
    select_rows,
)

from medsass import store as store_mod
from medsass.errors import ConfigError, StoreError
from medsass.testing import make_synthetic_store


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """70 records, 42 train rows over 6 shards (the last partial), every 7th pseudo-mask degenerate."""
    return make_synthetic_store(tmp_path_factory.mktemp("big") / "big.zarr", n=70, size=16, shard_records=8,
                                degenerate_every=7, seed=2)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("small") / "small.zarr", n=20, size=16, shard_records=4, seed=3)


def _batches(ds, n, num_workers, **kw):
    loader = make_loader(ds, batch_size=ds.batch_size, num_workers=num_workers, pin_memory=False, prefetch_factor=2, **kw)
    return list(itertools.islice(iter(loader), n))


def _per_worker_rows(batches, num_workers):
    """Undo the DataLoader's round-robin: batch i came from worker i % num_workers."""
    out = [[] for _ in range(max(1, num_workers))]
    for i, b in enumerate(batches):
        out[i % max(1, num_workers)] += b["row"].tolist()
    return out


def test_every_row_once_per_epoch_across_ranks_and_workers(big):
    rows = select_rows(big, splits=["train"])
    world_size, workers, bs = 2, 2, 3
    seen = []
    for rank in range(world_size):
        ds = ShardStream([Source(big, rows)], seed=5, rank=rank, world_size=world_size, shuffle_buffer=0, batch_size=bs)
        per_worker = _per_worker_rows(_batches(ds, 2 * (len(rows) // bs + 2), workers), workers)
        for w in range(workers):
            expected = epoch_order(rows, shard_records=8, seed=5, epoch=0, consumer=rank * workers + w, n_consumers=4)
            assert per_worker[w][: len(expected)] == expected.tolist()  # the stream is exactly the planned order
            seen += per_worker[w][: len(expected)]
    assert sorted(seen) == rows.tolist()  # disjoint and complete


def test_degenerate_rows_never_streamed(big):
    rows = select_rows(big, splits=["train"])
    degenerate = {i for i in range(42) if i % 7 == 6}
    ds = ShardStream([Source(big, rows)], seed=0, batch_size=8, shuffle_buffer=16)
    streamed = {r for b in _batches(ds, 20, 0) for r in b["row"].tolist()}
    assert streamed == set(rows.tolist()) and not streamed & degenerate


def test_samples_match_store_and_types(big):
    rows = select_rows(big, splits=["train"])
    ds = ShardStream([Source(big, rows, target="label")], seed=0, batch_size=4, shuffle_buffer=8, in_memory_limit_mb=0)
    group = zarr.open_group(str(big), mode="r")
    for b in _batches(ds, 5, 0):
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (4, 1, 16, 16) and b["row"].dtype == torch.int64
        r = b["row"].numpy()
        assert np.array_equal(b["image"][:, 0].numpy(), group["image"].oindex[r])
        assert np.array_equal(b["target"][:, 0].numpy(), group["label"].oindex[r])
        assert set(np.unique(b["target"].numpy())) <= {0, 1}


def test_seed_determines_order(big):
    rows = select_rows(big, splits=["train"])

    def order(seed):
        ds = ShardStream([Source(big, rows)], seed=seed, batch_size=8, shuffle_buffer=16)
        return [b["row"].tolist() for b in _batches(ds, 6, 0)]

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_weighted_mixing_and_independent_epochs(big, small):
    a, b = select_rows(big, splits=["train"]), select_rows(small, splits=["train"])
    ds = ShardStream([Source(big, a, weight=3.0), Source(small, b, weight=1.0)], seed=0, batch_size=50, shuffle_buffer=32)
    batches = _batches(ds, 40, 0)
    source = torch.cat([x["source"] for x in batches]).numpy()
    assert abs((source == 0).mean() - 0.75) < 0.03
    rows_small = torch.cat([x["row"] for x in batches]).numpy()[source == 1]
    counts = np.bincount(rows_small, minlength=len(b))[b]
    assert counts.min() >= 30  # the 12-row store cycled ~40 epochs while the big one did ~36


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("limit_mb", [0, 512])  # streaming reads, and whole sources kept in memory
def test_resume_is_bit_exact(big, small, num_workers, limit_mb):
    a, b = select_rows(big, splits=["train"]), select_rows(small, splits=["train"])
    sources = [Source(big, a, weight=2.0), Source(small, b, weight=1.0, target="label")]
    k, m = 7, 6
    kw = dict(seed=11, rank=1, world_size=2, shuffle_buffer=10, batch_size=5, in_memory_limit_mb=limit_mb)
    fresh = _batches(ShardStream(sources, **kw), k + m, num_workers)
    resumed = _batches(ShardStream(sources, start_batch=k, **kw), m, num_workers)
    for x, y in zip(fresh[k:], resumed, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_fork_and_spawn_give_the_same_stream(big, context):
    rows = select_rows(big, splits=["train"])
    ds = ShardStream([Source(big, rows)], seed=3, batch_size=4, shuffle_buffer=8)
    assert not any(type(v).__module__.startswith("zarr") for v in vars(ds).values())  # nothing open
    expected = _batches(ds, 6, 2)  # the platform default context (fork on Linux)
    got = _batches(pickle.loads(pickle.dumps(ds)), 6, 2, multiprocessing_context=context)
    for x, y in zip(expected, got, strict=True):
        assert torch.equal(x["row"], y["row"]) and torch.equal(x["image"], y["image"])


def test_errors(big, small, tmp_path):
    rows = select_rows(big, splits=["train"])
    other = make_synthetic_store(tmp_path / "s32.zarr", n=8, size=32, shard_records=4)
    with pytest.raises(StoreError, match="big.zarr.*s32.zarr.*different image sizes"):
        ShardStream([Source(big, rows), Source(other, np.arange(4))], seed=0, batch_size=2)
    with pytest.raises(StoreError, match="pseudo_labels/round1"):
        ShardStream([Source(big, rows, target="pseudo_labels/round1")], seed=0, batch_size=2)
    with pytest.raises(ConfigError, match="unknown target"):
        ShardStream([Source(big, rows, target="mask")], seed=0, batch_size=2)
    with pytest.raises(ConfigError, match="rows"):
        ShardStream([Source(big, np.array([5, 3]))], seed=0, batch_size=2)
    with pytest.raises(ConfigError, match="rows"):
        ShardStream([Source(big, np.array([69, 70]))], seed=0, batch_size=2)
    with pytest.raises(ConfigError, match="rank"):
        ShardStream([Source(big, rows)], seed=0, batch_size=2, rank=2, world_size=2)
    ds = ShardStream([Source(big, rows)], seed=0, batch_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        make_loader(ds, batch_size=4, num_workers=0, pin_memory=False)


def test_pseudo_label_target(big, tmp_path):
    path = tmp_path / "p.zarr"
    shutil.copytree(big, path)
    group, _ = store_mod.open_store(path, mode="a")
    arr = store_mod.pseudo_label_array(group, "round1", create=True)
    arr[0:8] = np.ones((8, 16, 16), np.uint8)
    ds = ShardStream([Source(path, np.arange(10), target="pseudo_labels/round1")], seed=0, batch_size=10, shuffle_buffer=0)
    b = _batches(ds, 1, 0)[0]
    assert torch.equal(b["target"].flatten(1).amax(1), (b["row"] < 8).to(torch.uint8))  # unwritten shard reads as 0


def test_reader_matches_zarr_dense_sparse_and_partial_shards(big):
    group = zarr.open_group(str(big), mode="r")
    reader = ArrayReader(big, "image")
    for rows in (np.arange(64, 70), np.arange(8, 16), np.array([0, 3, 7]), np.array([17]), np.array([1, 9, 30, 31, 69])):
        assert np.array_equal(read_rows(reader, rows), group["image"].oindex[rows])


def test_iter_eval_covers_rows_once_in_order(big):
    rows = select_rows(big, splits=["val", "test"], exclude_degenerate=False)
    group = zarr.open_group(str(big), mode="r")
    seen = []
    for rank in range(3):
        batches = list(iter_eval(big, rows, batch_size=5, rank=rank, world_size=3, arrays=("image", "label")))
        assert all(len(b["row"]) == 5 for b in batches[:-1]) and batches
        for b in batches:
            r = b["row"].numpy()
            assert b["image"].shape == (len(r), 1, 16, 16) and b["label"].dtype == torch.uint8
            assert np.array_equal(b["image"][:, 0].numpy(), group["image"].oindex[r])
            assert np.array_equal(b["label"][:, 0].numpy(), group["label"].oindex[r])
            seen += r.tolist()
    assert seen == rows.tolist()  # ranks in order, rows in order, each once
    assert list(iter_eval(big, rows[:2], batch_size=4, rank=2, world_size=3)) == []
