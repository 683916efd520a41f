"""Record selection, label budgets, block plans and per-consumer epoch orders."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from medsass.trainer.records import (
    epoch_blocks,
    epoch_order,
    label_subset,
    plan_blocks,
    select_rows,
)

from medsass import manifest
from medsass.errors import ConfigError, StoreError
from medsass.testing import make_synthetic_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """70 records (42 train), every 5th pseudo-mask degenerate, ~half labeled, shards of 8 rows."""
    return make_synthetic_store(tmp_path_factory.mktemp("rec") / "s.zarr", n=70, size=8, shard_records=8,
                                labeled_fraction=0.5, degenerate_every=5, seed=1)


def _manifest(store):
    return manifest.read_manifest(store)


def test_select_train_pseudo_mask_excludes_degenerate(store):
    df = _manifest(store)
    rows = select_rows(store, splits=["train"])
    expected = df[(df.split == "train") & ~df.degenerate].row.to_numpy()
    assert rows.dtype == np.int64 and np.array_equal(rows, np.sort(expected))
    assert not df.set_index("row").loc[rows, "degenerate"].any()
    every = select_rows(store, splits=["train"], exclude_degenerate=False)
    assert np.array_equal(every, np.sort(df[df.split == "train"].row.to_numpy()))
    both = select_rows(store, splits=["train", "val"])
    assert set(rows) < set(both)


def test_select_labels(store):
    df = _manifest(store)
    rows = select_rows(store, splits=["train"], target="label")
    assert np.array_equal(rows, np.sort(df[(df.split == "train") & df.has_label].row.to_numpy()))
    # degenerate pseudo-masks do not matter for real labels
    assert df.set_index("row").loc[rows, "degenerate"].any()
    assert np.array_equal(select_rows(store, splits=["train"], require_label=True), rows)


def test_select_only_ok_records(tmp_path):
    path = make_synthetic_store(tmp_path / "s.zarr", n=16, size=8, shard_records=8)
    table = manifest.read_table(manifest.manifest_path(path))
    failed = manifest.rows_to_table([manifest.empty_row(sample_id="bad.png", status="failed", reason_code="decode_error")])
    manifest.write_table(pa.concat_tables([table, failed]), manifest.manifest_path(path))
    rows = select_rows(path, splits=["train"])
    assert rows.min() >= 0 and len(rows) == round(0.6 * 16)


def test_label_fraction_nested_and_deterministic(store):
    labeled = select_rows(store, splits=["train"], target="label")
    subsets = [select_rows(store, splits=["train"], target="label", label_fraction=f, seed=3) for f in (0.01, 0.1, 0.5, 1.0)]
    sizes = [len(s) for s in subsets]
    assert sizes == [max(1, round(f * len(labeled))) for f in (0.01, 0.1, 0.5, 1.0)]
    for small, big in zip(subsets, subsets[1:]):
        assert set(small) <= set(big)
    assert np.array_equal(subsets[-1], labeled)
    again = select_rows(store, splits=["train"], target="label", label_fraction=0.5, seed=3)
    assert np.array_equal(again, subsets[2])
    other = select_rows(store, splits=["train"], target="label", label_fraction=0.5, seed=4)
    assert not np.array_equal(other, subsets[2])
    # a budget implies labels, whatever the target, and depends only on (labeled rows, seed)
    via_pseudo = select_rows(store, splits=["train"], target="pseudo_mask", label_fraction=0.5, seed=3)
    assert np.array_equal(via_pseudo, subsets[2])
    assert np.array_equal(select_rows(store, splits=["train"], target="label", label_count=len(subsets[1]), seed=3), subsets[1])


def test_label_subset_stable_when_rows_are_added():
    rows = np.arange(0, 1000, 3)
    grown = label_subset(np.union1d(rows, np.arange(1, 1000, 3)), seed=0, count=60)
    # a row's rank depends only on (row, seed): the old rows picked from the grown set are exactly
    # the subset the old set alone would give for that many rows
    kept = np.intersect1d(grown, rows)
    assert 0 < len(kept) < 60
    assert np.array_equal(label_subset(rows, seed=0, count=len(kept)), kept)
    assert np.array_equal(label_subset(rows, seed=0, fraction=1.0), rows)


def test_selection_errors(store, tmp_path):
    unlabeled = make_synthetic_store(tmp_path / "u.zarr", n=16, size=8, shard_records=8, labeled_fraction=0.0)
    with pytest.raises(StoreError, match="no labeled records in split train .*--labels"):
        select_rows(unlabeled, splits=["train"], target="label")
    all_degenerate = make_synthetic_store(tmp_path / "d.zarr", n=16, size=8, shard_records=8, degenerate_every=1)
    with pytest.raises(StoreError, match="degenerate"):
        select_rows(all_degenerate, splits=["train"])
    with pytest.raises(ConfigError, match="unknown split"):
        select_rows(store, splits=["training"])
    with pytest.raises(ConfigError, match="unknown target"):
        select_rows(store, splits=["train"], target="mask")
    for kwargs in ({"label_fraction": 0.0}, {"label_fraction": 1.5}, {"label_count": 0}, {"label_count": 10_000},
                   {"label_fraction": 0.1, "label_count": 2}):
        with pytest.raises(ConfigError):
            select_rows(store, splits=["train"], target="label", **kwargs)
    with pytest.raises(StoreError, match="no manifest.json|not a finished"):
        select_rows(tmp_path, splits=["train"])


def test_plan_blocks_one_per_shard_or_split_for_consumers():
    rows = np.array([0, 2, 3, 9, 10, 17, 40, 41, 47])
    blocks = plan_blocks(rows, 8, n_consumers=1)
    assert [b.tolist() for b in blocks] == [[0, 2, 3], [9, 10], [17], [40, 41, 47]]
    for n_consumers in (2, 3, 8):
        blocks = plan_blocks(rows, 8, n_consumers)
        assert np.array_equal(np.concatenate(blocks), rows)
        assert len(blocks) >= min(len(rows), n_consumers)
        assert all(len(set(b // 8)) == 1 for b in blocks)  # never across shards


@pytest.mark.parametrize("n_rows,shard", [(42, 8), (3, 8), (1000, 64)])
def test_epoch_orders_partition_rows_across_ranks_and_workers(n_rows, shard):
    rows = np.sort(np.random.default_rng(0).choice(5 * n_rows, n_rows, replace=False))
    world_size, workers = 2, 2
    n_consumers = world_size * workers
    for epoch in range(3):
        parts = [epoch_order(rows, shard_records=shard, seed=7, epoch=epoch, consumer=r * workers + w, n_consumers=n_consumers)
                 for r in range(world_size) for w in range(workers)]
        joined = np.concatenate(parts)
        assert len(joined) == len(rows) and np.array_equal(np.sort(joined), rows)  # exactly once, disjoint
        if n_rows >= 2 * n_consumers:
            assert all(len(p) for p in parts)  # everyone has work
    same = epoch_order(rows, shard_records=shard, seed=7, epoch=0, consumer=1, n_consumers=4)
    assert np.array_equal(same, epoch_order(rows, shard_records=shard, seed=7, epoch=0, consumer=1, n_consumers=4))
    if n_rows > 10:
        assert not np.array_equal(same, epoch_order(rows, shard_records=shard, seed=8, epoch=0, consumer=1, n_consumers=4))
        assert not np.array_equal(same, epoch_order(rows, shard_records=shard, seed=7, epoch=1, consumer=1, n_consumers=4))


def test_epoch_blocks_rotate_who_gets_fewer():
    got = np.zeros(5, int)
    for epoch in range(200):
        for c in range(5):
            got[c] += len(epoch_blocks(3, seed=0, source=0, epoch=epoch, consumer=c, n_consumers=5))
    assert got.sum() == 600 and got.min() > 60  # 3 blocks, 5 consumers: nobody starves
