"""Grouped, deterministic train/val/test splits.

Every record of a group (a DICOM patient, a file's frames and tiles, a folder, a CSV group) lands in
the same split, so no patient leaks across splits. Groups are ordered by ``sha256(seed:identity)`` and
filled into test, then val, until each holds its share of the records; the rest is train. The identity
(an unsalted hash of the PatientID, the CSV group, the regex match, or the path relative to the inputs'
common parent) never leaves memory, so the same data and seed give the same split whatever the salt and
wherever the folder lies; the stored ``group`` column is a salted hash of it.

When some records have real labels (and ``split_unlabeled`` is off), the shares are taken over the
*labeled* groups only and groups without any label all go to train: a large unlabeled archive feeds
pretraining instead of sitting unused in val/test, and test keeps its share of labels.
"""
from __future__ import annotations

import csv
import hashlib
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from medsass.errors import ConfigError

from .config import SplitConfig


def salted_hash(salt: str, value: str) -> str:
    return hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:16]


class GroupKeys:
    """The group of a file: an *identity* (kept in memory only; it orders the split, so splits do not
    depend on the salt) and the salted hash of it that is stored."""

    def __init__(self, cfg: SplitConfig, salt: str):
        self.cfg = cfg
        self.salt = salt
        self.regex = re.compile(cfg.group_by[6:]) if cfg.group_by.startswith("regex:") else None
        self.csv: dict[str, str] = _read_groups(Path(cfg.groups_csv), cfg) if cfg.groups_csv else {}

    def identity(self, rel: str, dicom_patient: str | None) -> str:
        """``rel``: the path relative to the inputs' common parent; ``dicom_patient``: an unsalted hash of
        the DICOM PatientID (readers never return the raw ID)."""
        if dicom_patient:
            return "dicom:" + dicom_patient
        rel_p = PurePosixPath(rel)
        if self.csv:
            hit = self.csv.get(rel) or self.csv.get(rel_p.name) or self.csv.get(rel_p.stem)
            if hit is not None:
                return "csv:" + hit
        if self.regex is not None:
            m = self.regex.search(rel)
            if m:
                return "re:" + (m.group(1) if m.groups() else m.group(0))
        if self.cfg.group_by == "dir":
            return f"dir:{rel_p.parent}"
        return f"file:{rel}"

    def stored(self, identity: str) -> str:
        return salted_hash(self.salt, identity)

    def key(self, rel: str, dicom_patient: str | None = None) -> str:
        return self.stored(self.identity(rel, dicom_patient))


def _read_groups(path: Path, cfg: SplitConfig) -> dict[str, str]:
    if not path.exists():
        raise ConfigError(f"split.groups_csv {path} does not exist")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        for col in (cfg.groups_key, cfg.groups_column):
            if col not in cols:
                raise ConfigError(f"split.groups_csv {path} has no column {col!r} (columns: {cols}); set split.groups_key / split.groups_column")
        return {row[cfg.groups_key]: row[cfg.groups_column] for row in reader if row[cfg.groups_key]}


def assign_splits(
    groups: Sequence[str], n_records: Sequence[int], labeled: Sequence[bool], cfg: SplitConfig
) -> list[str]:
    """Split name per entry; entries sharing a group get the same split."""
    sizes: dict[str, int] = defaultdict(int)
    has_label: dict[str, bool] = defaultdict(bool)
    for g, n, lab in zip(groups, n_records, labeled):
        sizes[g] += n
        has_label[g] |= bool(lab)
    any_label = any(has_label.values())
    stratified = any_label and not cfg.split_unlabeled
    pool = [g for g in sizes if has_label[g]] if stratified else list(sizes)
    result = {g: "train" for g in sizes}
    result.update(_fill(pool, sizes, cfg))
    return [result[g] for g in groups]


def _fill(pool: list[str], sizes: dict[str, int], cfg: SplitConfig) -> dict[str, str]:
    order = sorted(pool, key=lambda g: hashlib.sha256(f"{cfg.seed}:{g}".encode()).hexdigest())
    total = sum(sizes[g] for g in pool)
    targets = [("test", round(cfg.test * total)), ("val", round(cfg.val * total))]
    out: dict[str, str] = {}
    i = 0
    for name, target in targets:
        count = 0
        while i < len(order) and count < target:
            out[order[i]] = name
            count += sizes[order[i]]
            i += 1
    for g in order[i:]:
        out[g] = "train"
    return out
