"""Typed configuration of ``build-masks``: CLI flags and dataset files (``--dataset NAME.yaml``) map here.

A dataset file is this dataclass in YAML (see ``data_manifests/*.yaml``); relative paths in it are
resolved against the file's folder. CLI flags override it: :func:`command_line_config` merges the two.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medsass import configio
from medsass.errors import ConfigError

from .methods import METHODS, unknown_method
from .window import parse_window


@dataclass
class LabelSource:
    """Where the real masks for one group of inputs are, and how they pair with the images."""

    dir: str | None = None  # folder of masks (searched recursively by relative path, then by name)
    pattern: str = "{stem}.*"  # template: {stem} {name} {ext} {rel_stem} {rel_dir} + named groups of stem_regex; * allowed
    stem_regex: str | None = None  # e.g. 't(?P<id>\\d+)' so pattern 'man_seg{id}.tif' pairs t01.tif with man_seg01.tif
    pairs: str | None = None  # CSV with columns image,mask (paths relative to the CSV); replaces dir/pattern


@dataclass
class InputSource:
    """One input folder (or file) and its labels: an item of ``sources`` (the trainer's ``stream.Source`` is a store)."""

    path: str
    labels: LabelSource = field(default_factory=LabelSource)


@dataclass
class GeometryConfig:
    size: int = 256  # stored images are size x size
    resize: Literal["stretch", "pad"] = "stretch"  # pad keeps the aspect ratio (zero padding, centred)
    tile: bool = False  # cut images into size x size tiles at native resolution instead of resizing
    tile_overlap: int = 0  # pixels of overlap between neighbouring tiles
    max_pixels: int = 2**28  # decompression-bomb guard per file (all frames)
    # volumes (NIfTI): one record per slice across this axis, after reorientation to RAS+ (pipeline/readers/nifti.py)
    slice_axis: Literal["axial", "coronal", "sagittal"] = "axial"

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
    # store (default): one side per store, the majority of the per-image auto decisions; a mixed vote (several
    # modalities) keeps per-image sides (pipeline/store_polarity.py). auto: per image. bright|dark: forced.
    polarity: Literal["auto", "bright", "dark", "store"] = "store"
    intensity: Literal["percentile", "minmax"] = "percentile"  # how non-8-bit images map to uint8
    # volumes (NIfTI): lung | soft-tissue | bone | C/W (HU) | percentile (the volume's, for MR); None: as `intensity`
    window: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {unknown_method(self.method)}")
        parsed = parse_window(self.window)
        self.window = parsed.spec if parsed else None


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
class BuildRuntimeConfig:
    """``runtime``: how the build runs (never what it writes, except shard_records); not the trainer's RuntimeConfig."""

    workers: int = 0  # Dask workers for the local cluster; 0 = one per core
    scheduler: str | None = None  # address of an existing Dask scheduler (e.g. from dask-jobqueue)
    shard_records: int = 256  # records per Zarr shard = per task
    salt: str | None = None  # salt for hashing DICOM PatientID; default: random, kept in <store>/_medsass/salt
    strict: bool = False  # stop at the first failed input
    progress: bool = True
    dashboard_address: str | None = None  # local cluster's dashboard host:port; None = $MEDSASS_DASHBOARD_ADDRESS or 127.0.0.1:0


@dataclass
class BuildConfig:
    sources: list[InputSource]
    out: str
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    runtime: BuildRuntimeConfig = field(default_factory=BuildRuntimeConfig)
    name: str = ""  # dataset name (informational)

    def output_params(self) -> dict:
        """Everything that changes what is written: compared when an existing store is re-opened."""
        data = configio.to_dict(self)
        runtime = data.pop("runtime")
        data.pop("out")
        data.pop("name")
        data["shard_records"] = runtime["shard_records"]
        # the volume settings are recorded only when they differ from the defaults: stores of other inputs keep
        # the parameters (and digest) they had before the settings existed
        if data["geometry"]["slice_axis"] == GeometryConfig.slice_axis:
            del data["geometry"]["slice_axis"]
        if data["threshold"]["window"] is None:
            del data["threshold"]["window"]
        return data

    def params_digest(self) -> str:
        blob = json.dumps(self.output_params(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class IncompleteCommand(ConfigError):
    """A command line without a dataset file that lacks inputs or an output store (a usage error)."""


def command_line_config(*, inputs: Sequence[str] = (), dataset: str | Path | None = None,
                        labels: Mapping[str, str | None] | None = None, flags: Mapping[str, Any] | None = None,
                        overrides: Sequence[str] = (), cwd: Path | None = None) -> BuildConfig:
    """The config of one ``build-masks`` command line. Later wins: the dataset file, its ``--set KEY=VALUE``
    ``overrides``, the ``inputs`` (they replace the file's sources), the label flags (``labels``: LabelSource field ->
    value, for every source) and the other flags (``flags``: dotted key -> value). None means a flag was not given.
    The dataset file's relative paths are relative to its folder, the command line's to ``cwd`` (default: the
    current folder)."""
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    label_values = {k: v for k, v in (labels or {}).items() if v is not None}
    if dataset:
        data = configio.to_dict(load_dataset_file(dataset, overrides))
    else:
        if not inputs:
            raise IncompleteCommand("give INPUT files/folders or --dataset FILE")
        data = configio.apply_overrides({}, overrides)
        data.setdefault("sources", [])
    if inputs:
        data["sources"] = [{"path": p, "labels": dict(label_values)} for p in inputs]
    elif label_values:
        for src in data["sources"]:
            src["labels"].update(label_values)
    if "out" not in given and not data.get("out"):
        raise IncompleteCommand("--out STORE.zarr is required")
    cfg = configio.from_dict(BuildConfig, configio.set_values(data, given))
    return resolve_paths(cfg, Path.cwd() if cwd is None else cwd)


def load_dataset_file(path: str | Path, overrides: Sequence[str] = ()) -> BuildConfig:
    """Read ``data_manifests/NAME.yaml``; paths in it are relative to the file's folder."""
    path = Path(path)
    data = configio.read_yaml(path)
    data.setdefault("out", f"{path.stem}.zarr")
    data.setdefault("name", path.stem)
    cfg = configio.load(BuildConfig, data, overrides)
    return resolve_paths(cfg, path.parent)


def resolve_path(path: str | None, base: Path) -> str | None:
    """``path`` with ``~`` and ``$VARS`` expanded; a relative one made absolute against ``base``."""
    if path is None:
        return None
    path = os.path.expanduser(os.path.expandvars(path))
    return str((base / path).resolve()) if not os.path.isabs(path) else path


def resolve_paths(cfg: BuildConfig, base: Path) -> BuildConfig:
    """The config's input, label and groups paths resolved against ``base`` (see :func:`resolve_path`)."""
    for src in cfg.sources:
        src.path = resolve_path(src.path, base)
        src.labels.dir = resolve_path(src.labels.dir, base)
        src.labels.pairs = resolve_path(src.labels.pairs, base)
        if src.labels.stem_regex:
            try:
                re.compile(src.labels.stem_regex)
            except re.error as exc:
                raise ConfigError(f"labels.stem_regex {src.labels.stem_regex!r} is not a valid regex: {exc}") from None
    cfg.split.groups_csv = resolve_path(cfg.split.groups_csv, base)
    return cfg
