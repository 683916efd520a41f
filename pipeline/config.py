"""Typed configuration of ``build-masks``: CLI flags and dataset files (``--dataset NAME.yaml``) map here.

A dataset file is this dataclass in YAML (see ``data_manifests/*.yaml``); relative paths in it are
resolved against the file's folder. CLI flags override it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medsass import configio
from medsass.errors import ConfigError


@dataclass
class LabelSource:
    """Where the real masks for one group of inputs are, and how they pair with the images."""

    dir: str | None = None  # folder of masks (searched recursively by relative path, then by name)
    pattern: str = "{stem}.*"  # template: {stem} {name} {ext} {rel_stem} {rel_dir} + named groups of stem_regex; * allowed
    stem_regex: str | None = None  # e.g. 't(?P<id>\\d+)' so pattern 'man_seg{id}.tif' pairs t01.tif with man_seg01.tif
    pairs: str | None = None  # CSV with columns image,mask (paths relative to the CSV); replaces dir/pattern


@dataclass
class Source:
    """One input folder (or file) and its labels."""

    path: str
    labels: LabelSource = field(default_factory=LabelSource)


@dataclass
class GeometryConfig:
    size: int = 256  # stored images are size x size
    resize: Literal["stretch", "pad"] = "stretch"  # pad keeps the aspect ratio (zero padding, centred)
    tile: bool = False  # cut images into size x size tiles at native resolution instead of resizing
    tile_overlap: int = 0  # pixels of overlap between neighbouring tiles
    max_pixels: int = 2**28  # decompression-bomb guard per file (all frames)

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 4096:
            raise ValueError(f"geometry.size={self.size}: choose a size between 16 and 4096")
        if not 0 <= self.tile_overlap < self.size:
            raise ValueError(f"geometry.tile_overlap={self.tile_overlap} must be in [0, size)")


@dataclass
class ThresholdConfig:
    # one of medsass.pipeline.threshold.METHODS. Default: the region-aware fov_otsu_hull, which beat the paper's plain
    # "otsu" on pseudo-mask IoU and as a pretraining target on both PH2 and CXR (docs/results/label_efficiency.md).
    method: str = "fov_otsu_hull"
    polarity: Literal["auto", "bright", "dark"] = "auto"
    intensity: Literal["percentile", "minmax"] = "percentile"  # how non-8-bit images map to uint8

    def __post_init__(self) -> None:
        from .methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not a method prep knows; choose one of {', '.join(METHODS)}")


@dataclass
class SplitConfig:
    val: float = 0.1
    test: float = 0.2
    seed: int = 0
    group_by: str = "file"  # file | dir | regex:<pattern with one group> ; DICOM PatientID (hashed) wins when present
    groups_csv: str | None = None  # CSV mapping file name or relative path -> group (e.g. patient)
    groups_key: str = "filename"  # column of groups_csv holding the file name / relative path
    groups_column: str = "patientid"  # column of groups_csv holding the group
    split_unlabeled: bool = False  # False: when labels exist, groups without labels all go to train

    def __post_init__(self) -> None:
        if self.val < 0 or self.test < 0 or self.val + self.test >= 1:
            raise ValueError(f"split val={self.val}, test={self.test}: each >= 0 and together < 1")
        if not (self.group_by in ("file", "dir") or self.group_by.startswith("regex:")):
            raise ValueError(f"split.group_by={self.group_by!r}: use file, dir or regex:<pattern>")


@dataclass
class RuntimeConfig:
    workers: int = 0  # Dask workers for the local cluster; 0 = one per core
    scheduler: str | None = None  # address of an existing Dask scheduler (e.g. from dask-jobqueue)
    shard_records: int = 256  # records per Zarr shard = per task
    salt: str | None = None  # salt for hashing DICOM PatientID; default: random, kept in <store>/_medsass/salt
    strict: bool = False  # stop at the first failed input
    progress: bool = True
    dashboard_address: str | None = None  # local cluster's dashboard host:port; None = $MEDSASS_DASHBOARD_ADDRESS or 127.0.0.1:0


@dataclass
class BuildConfig:
    sources: list[Source]
    out: str
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    name: str = ""  # dataset name (informational)

    def output_params(self) -> dict:
        """Everything that changes what is written: compared when an existing store is re-opened."""
        data = configio.to_dict(self)
        runtime = data.pop("runtime")
        data.pop("out")
        data.pop("name")
        data["shard_records"] = runtime["shard_records"]
        return data

    def params_digest(self) -> str:
        blob = json.dumps(self.output_params(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_dataset_file(path: str | Path, overrides: list[str] = ()) -> BuildConfig:
    """Read ``data_manifests/NAME.yaml``; paths in it are relative to the file's folder."""
    path = Path(path)
    data = configio.read_yaml(path)
    data.setdefault("out", f"{path.stem}.zarr")
    data.setdefault("name", path.stem)
    cfg = configio.load(BuildConfig, data, overrides)
    return resolve_paths(cfg, path.parent)


def resolve_paths(cfg: BuildConfig, base: Path) -> BuildConfig:
    def res(p: str | None) -> str | None:
        if p is None:
            return None
        p = os.path.expanduser(os.path.expandvars(p))
        return str((base / p).resolve()) if not os.path.isabs(p) else p

    for src in cfg.sources:
        src.path = res(src.path)
        src.labels.dir = res(src.labels.dir)
        src.labels.pairs = res(src.labels.pairs)
        if src.labels.stem_regex:
            try:
                re.compile(src.labels.stem_regex)
            except re.error as exc:
                raise ConfigError(f"labels.stem_regex {src.labels.stem_regex!r} is not a valid regex: {exc}") from None
    cfg.split.groups_csv = res(cfg.split.groups_csv)
    return cfg
