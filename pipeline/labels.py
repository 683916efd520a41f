"""Pair input images with real (expert) masks, and turn a mask file into a binary array.

Pairing, per source: an explicit CSV (``image,mask``), or a label folder plus a file-name template.
The template sees ``{stem} {name} {ext} {rel_stem} {rel_dir}`` of the image and the named groups
of ``stem_regex`` matched against its stem; ``*`` and ``?`` are wildcards. A template without a
``/`` is looked up first beside the image's relative folder inside the label folder, then by name
anywhere in it. Zero matches -> ``missing``; several -> ``ambiguous``; neither is fatal.

A ``.nii.gz`` name's ``{stem}`` is the name without ``.nii.gz`` and its ``{ext}`` is ``nii.gz``. The pattern
``nnunet`` pairs as nnU-Net does: ``imagesTr/case_0000.nii.gz`` (any 4-digit channel) with ``labelsTr/case.nii.gz``.
"""
from __future__ import annotations

import csv
import fnmatch
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from medsass.errors import ConfigError

from .config import LabelSource


@dataclass(frozen=True)
class Pairing:
    path: str  # '' when none
    status: str  # ok | missing | ambiguous | '' (no labels configured for this source)
    reason: str = ""
    candidates: tuple[str, ...] = ()  # the matching files when ambiguous


NO_LABELS = Pairing("", "", "")
NNUNET = "nnunet"  # the pattern value that pairs nnU-Net style
_NNUNET_REGEX = r"^(?P<case>.+)_\d{4}$"
_NNUNET_PATTERN = "{case}.{ext}"
_DOUBLE_SUFFIXES = (".nii.gz",)


def split_name(name: str) -> tuple[str, str]:
    """(stem, suffix) of a file name, the suffix with its dot: ``case_0000.nii.gz`` -> (``case_0000``, ``.nii.gz``)."""
    for suffix in _DOUBLE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    p = PurePosixPath(name)
    return p.stem, p.suffix


class LabelIndex:
    """Resolves the label file of each image of one source."""

    def __init__(self, spec: LabelSource):
        self.spec = spec
        self.pattern = spec.pattern
        self.regex = re.compile(spec.stem_regex) if spec.stem_regex else None
        if spec.pattern == NNUNET:
            if spec.stem_regex:
                raise ConfigError(f"label pattern {NNUNET!r} sets its own stem_regex; drop stem_regex {spec.stem_regex!r}")
            self.pattern, self.regex = _NNUNET_PATTERN, re.compile(_NNUNET_REGEX)
        self.pairs: dict[str, str] | None = None
        self.raw_pairs: dict[str, str] = {}  # the CSV's image values as written -> mask
        self.by_rel: dict[str, str] = {}
        self.by_name: dict[str, list[str]] = defaultdict(list)
        if spec.pairs:
            self.pairs, self.raw_pairs = _read_pairs(Path(spec.pairs))
        elif spec.dir:
            root = Path(spec.dir)
            if not root.is_dir():
                raise ConfigError(f"label folder {root} does not exist; fix labels.dir / --labels")
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in filenames:
                    if fn.startswith("."):
                        continue
                    full = os.path.join(dirpath, fn)
                    rel = PurePosixPath(Path(full).relative_to(root).as_posix())
                    self.by_rel[str(rel)] = full
                    self.by_name[fn].append(full)

    @property
    def active(self) -> bool:
        return self.pairs is not None or bool(self.spec.dir)

    @property
    def files(self) -> set[str]:
        """Every file that may serve as a label (excluded from the images)."""
        if self.pairs is not None:
            return {str(Path(p).resolve()) for p in self.pairs.values()}
        return {str(Path(p).resolve()) for p in self.by_rel.values()}

    def pair(self, image_path: str, rel: str, aliases: tuple[str, ...] = ()) -> Pairing:
        """The label of one image. ``aliases`` (e.g. a stored record's sample_id and source_rel) may also name
        the image in a pairs CSV's ``image`` column, as written there."""
        if not self.active:
            return NO_LABELS
        if self.pairs is not None:
            hit = self.pairs.get(str(Path(image_path).resolve()))
            hit = hit or next((self.raw_pairs[a] for a in aliases if a in self.raw_pairs), "")
            return Pairing(hit, "ok") if hit else Pairing("", "missing", f"no row for this image in {self.spec.pairs}")
        rel_p = PurePosixPath(rel)
        stem, suffix = split_name(rel_p.name)
        rel_dir = "" if str(rel_p.parent) == "." else str(rel_p.parent)
        fields = {
            "stem": stem,
            "name": rel_p.name,
            "ext": suffix.lstrip("."),
            "rel_stem": f"{rel_dir}/{stem}" if rel_dir else stem,
            "rel_dir": rel_dir,
        }
        if self.regex is not None:
            m = self.regex.search(stem)
            if not m:
                regex = self.spec.stem_regex or f"{_NNUNET_REGEX} (--label-pattern {NNUNET}: case_0000.nii.gz -> case.nii.gz)"
                return Pairing("", "missing", f"stem {stem!r} does not match stem_regex {regex!r}")
            fields.update({k: v for k, v in m.groupdict().items() if v is not None})
        try:
            target = self.pattern.format(**fields)
        except (KeyError, IndexError) as exc:
            raise ConfigError(
                f"label pattern {self.spec.pattern!r} uses {exc}, which is not one of {sorted(fields)}; "
                "add a named group to stem_regex or fix the pattern"
            ) from None
        hits = self._lookup(target, fields["rel_dir"])
        if len(hits) == 1:
            return Pairing(hits[0], "ok")
        if not hits:
            return Pairing("", "missing", f"no file matching {target!r} in {self.spec.dir}")
        shown = ", ".join(Path(h).name for h in hits[:3])
        return Pairing("", "ambiguous", f"{len(hits)} files match {target!r} in {self.spec.dir}: {shown}", tuple(hits))

    def _lookup(self, target: str, rel_dir: str) -> list[str]:
        wild = any(c in target for c in "*?[")
        if "/" in target:
            if not wild:
                hit = self.by_rel.get(target)
                return [hit] if hit else []
            return sorted(p for r, p in self.by_rel.items() if fnmatch.fnmatchcase(r, target))
        beside = f"{rel_dir}/{target}" if rel_dir else target
        if not wild:
            if beside in self.by_rel:
                return [self.by_rel[beside]]
            return sorted(self.by_name.get(target, []))
        near = sorted(p for r, p in self.by_rel.items() if fnmatch.fnmatchcase(r, beside))
        if near:
            return near
        return sorted(p for n, ps in self.by_name.items() if fnmatch.fnmatchcase(n, target) for p in ps)


def _read_pairs(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(resolved image path -> resolved mask path, image value as written -> resolved mask path)."""
    if not path.exists():
        raise ConfigError(f"pairs CSV {path} does not exist")
    out: dict[str, str] = {}
    raw: dict[str, str] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"image", "mask"} <= set(reader.fieldnames):
            raise ConfigError(f"pairs CSV {path} needs a header with columns 'image' and 'mask'")
        for row in reader:
            img = (path.parent / row["image"]).resolve()
            out[str(img)] = raw[row["image"]] = str((path.parent / row["mask"]).resolve())
    return out, raw


def binarize(label: np.ndarray) -> np.ndarray:
    """Any nonzero value is foreground (instance labels become binary)."""
    return np.asarray(label) != 0
