"""The Zarr store layout (schema version 1), shared by prep (writer) and trainer (reader).

::

    STORE.zarr/
      zarr.json                 group; attrs["medsass"] = {schema_version, size, n_records, shard_records, params, ...}
      image/                    (N, S, S) uint8   chunks (1, S, S), shards (K, S, S), zstd
      pseudo_mask/              (N, S, S) uint8   {0, 1}  Otsu (or --method) pseudo-mask
      label/                    (N, S, S) uint8   {0, 1}  real mask where manifest.has_label, else 0
      pseudo_labels/<name>/     (N, S, S) uint8   extra pseudo-labels (e.g. self-training rounds), never overwriting pseudo_mask
      manifest.parquet          one row per record / failed / skipped input (medsass.manifest)
      manifest.json             schema version, parameters, package versions, counts
      _medsass/                 prep's working files (plan, finished-shard parts); safe to delete once finished

Exactly one task writes a shard (rows ``[k*K, (k+1)*K)``) of every array: zarr 3 loses data
when two writers touch one shard. Plain ``zarr.open_group(STORE)`` reads everything.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.sync import sync

from medsass.errors import StoreError
from medsass.manifest import SCHEMA_VERSION, check_schema_version

ATTRS_KEY = "medsass"
IMAGE = "image"
PSEUDO_MASK = "pseudo_mask"
LABEL = "label"
PSEUDO_GROUP = "pseudo_labels"
IMAGE_ARRAYS = (IMAGE, PSEUDO_MASK, LABEL)
WORK_DIR = "_medsass"
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class StoreInfo:
    path: Path
    schema_version: int
    size: int
    n_records: int
    shard_records: int
    attrs: dict[str, Any]

    @property
    def n_shards(self) -> int:
        return n_shards(self.n_records, self.shard_records)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        return shard_bounds(shard, self.shard_records, self.n_records)


def n_shards(n_records: int, shard_records: int) -> int:
    return -(-n_records // shard_records) if n_records else 0


def shard_bounds(shard: int, shard_records: int, n_records: int) -> tuple[int, int]:
    start = shard * shard_records
    return start, min(start + shard_records, n_records)


def create(path: str | Path, *, n_records: int, size: int, shard_records: int, attrs: dict[str, Any]) -> zarr.Group:
    """Create the group and its three (N, S, S) arrays; ``attrs`` go under ``attrs['medsass']``.

    Idempotent: a creation interrupted half-way is completed by calling it again."""
    group = zarr.open_group(str(path), mode="a", zarr_format=3)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "kind": "medsass-store",
        "size": size,
        "n_records": n_records,
        "shard_records": shard_records,
        **attrs,
    }
    if ATTRS_KEY not in group.attrs:
        group.attrs[ATTRS_KEY] = meta
    for name in IMAGE_ARRAYS:
        if not is_store(Path(path) / name):
            _create_array(group, name, n_records, size, shard_records)
    return group


def _create_array(group: zarr.Group, name: str, n_records: int, size: int, shard_records: int) -> zarr.Array:
    n = max(n_records, 1)  # zarr needs a positive shard shape; an empty store still gets its arrays
    return group.create_array(
        name,
        shape=(n_records, size, size),
        chunks=(1, size, size),
        shards=(min(shard_records, n), size, size),
        dtype="uint8",
        compressors=ZstdCodec(level=ZSTD_LEVEL),
        fill_value=0,
    )


def is_store(path: str | Path) -> bool:
    """Whether ``path`` holds a Zarr v3 group or array (its ``zarr.json``)."""
    return (Path(path) / "zarr.json").exists()


@dataclass(frozen=True)
class ArrayMeta:
    """One store array's shape and sharding, read from its ``zarr.json`` without opening zarr (cheap in workers)."""

    n_records: int
    size: int
    shard_records: int
    attrs: dict[str, Any]  # the array's attrs['medsass'] (e.g. a pseudo-label array's encoding)


def array_meta(store_path: str | Path, name: str) -> ArrayMeta:
    meta_file = Path(store_path) / name / "zarr.json"
    if not meta_file.exists():
        raise StoreError(f"{store_path} has no array {name!r} ({meta_file} is missing)")
    meta = json.loads(meta_file.read_text())
    return ArrayMeta(int(meta["shape"][0]), int(meta["shape"][-1]), int(meta["chunk_grid"]["configuration"]["chunk_shape"][0]),
                     dict((meta.get("attributes") or {}).get(ATTRS_KEY) or {}))


def open_store(path: str | Path, mode: str = "r") -> tuple[zarr.Group, StoreInfo]:
    """Open a medsass store, checking it is one and that its schema version is known."""
    path = Path(path)
    if not is_store(path):
        raise StoreError(f"{path} is not a Zarr v3 store (no zarr.json); build it with `medsass-prep build-masks --out {path}`")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group = zarr.open_group(str(path), mode=mode)
    meta = dict(group.attrs.get(ATTRS_KEY, {}) or {})
    if meta.get("kind") != "medsass-store":
        raise StoreError(f"{path} is a Zarr store but not a medsass store (no attrs['{ATTRS_KEY}'])")
    check_schema_version(meta.get("schema_version"), where=f"{path}/zarr.json")
    info = StoreInfo(
        path=path,
        schema_version=int(meta["schema_version"]),
        size=int(meta["size"]),
        n_records=int(meta["n_records"]),
        shard_records=int(meta["shard_records"]),
        attrs=meta,
    )
    return group, info


def write_rows(group: zarr.Group, start: int, arrays: dict[str, np.ndarray]) -> None:
    """Write whole-shard blocks ``arrays[name]`` (n, S, S) at rows ``start:start+n``.

    The inner chunks of a shard are encoded as one batch, concurrently (zarr's defaults encode them one
    by one: ~1.8 ms per image and mask pair in Python overhead, against ~1.0 ms this way and ~0.25 ms for
    zstd itself). Empty chunks are written too: zarr's check that a chunk is all fill value costs ~0.3 ms per
    image and mask pair, and an all-zero chunk stored costs ~20 bytes; readers see the same zeros either way."""
    n = max(block.shape[0] for block in arrays.values())
    cfg = {"codec_pipeline.batch_size": max(1, n), "async.concurrency": 64, "array.write_empty_chunks": True}
    with zarr.config.set(cfg):
        for name, block in arrays.items():
            group[name][start : start + block.shape[0]] = block


def drop_shard(group: zarr.Group, name: str, shard: int) -> None:
    """Delete shard ``shard`` of array ``name`` (readers see the fill value, 0, until it is written again).

    For rewriting a shard that may be torn (a write killed half-way): zarr 3 reads a shard back before writing
    into it, even when the write covers all of it, and fails on a damaged one."""
    arr = group[name]
    sync((arr.store_path / arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))).delete())


def pseudo_label_array(group: zarr.Group, name: str, *, create: bool = False) -> zarr.Array:
    """The extra pseudo-label array ``pseudo_labels/<name>`` (created empty when ``create``)."""
    meta = group.attrs[ATTRS_KEY]
    path = f"{PSEUDO_GROUP}/{name}"
    if create:
        sub = group.require_group(PSEUDO_GROUP)
        if name in sub:
            raise StoreError(f"pseudo-label array {path} already exists in the store; pick another name")
        return _create_array(sub, name, int(meta["n_records"]), int(meta["size"]), int(meta["shard_records"]))
    try:
        return group[path]
    except KeyError:
        raise StoreError(f"the store has no pseudo-label array {path}") from None


def consolidate(path: str | Path) -> None:
    """Consolidate metadata once writing is finished (quietly: our extra files are not Zarr nodes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def work_dir(path: str | Path) -> Path:
    return Path(path) / WORK_DIR
