"""``--polarity store``: one polarity for the whole store, decided in the plan phase by a majority vote of the per-image
``auto`` rule (docs/pseudo_masks.md, "Store-level polarity and implausible coverage").

One archive is usually one modality, and an image whose own auto decision disagrees with its store's majority is more
often an error of the rule than a finding (cxr_shenzhen: 123 of 662 X-rays "bright", the rest "dark"). So:

* the vote reads frame 0 of a seeded sample of at most :data:`SAMPLE_MAX` planned inputs with the pipeline's own
  readers and asks :func:`.threshold.auto_polarity` (the side ``pseudo_mask(..., polarity="auto")`` would take);
  a volume (NIfTI) is read as its records are, cut across ``geometry.slice_axis`` and windowed by
  ``threshold.window``, and votes with the majority of :data:`VOLUME_VOTE_SLICES` slices spread over it (the
  centres of equal parts, :func:`vote_slices`), leaving out ``no_body`` slices, which pretraining leaves out too.
  Its slice 0 is often outside the body (air around a CT), where the auto rule sees noise and says "dark"; one
  middle slice would be right more often, but a few spread slices keep one odd slice from deciding a volume, for
  the cost of one read of the volume (which the reader decompresses whole even for one slice);
* the sample is the inputs with the smallest ``sha256(seed:sample_base)`` -- independent of the salt, of the order
  the files were found in and of the number of workers -- and the decision is saved in
  ``_medsass/polarity_vote.json`` before any shard is written: a resumed run or ``--retry-failed`` reads it back
  instead of voting again, so every shard of a store uses the same side;
* every record is then thresholded with that side; a record whose own auto decision differs gets the QC flag
  ``polarity_minority`` (informative, not degenerate by itself);
* a vote whose minority is at least :data:`MIXED_SHARE` (a tie included) is ``mixed``: the store most likely holds
  several modalities (e.g. a folder of assorted DICOMs, where forcing one side would invert the masks of a third or
  more of the images), so **every image keeps its own auto side**, as with ``--polarity auto`` (the vote's
  ``polarity`` is then ``"auto"``; ``majority`` is still recorded), with a warning. ``--polarity bright|dark``
  forces one side. Stores voted before this rule (their saved vote has no ``majority``) keep the side they took.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path


from medsass import manifest
from medsass.errors import MedsassWarning

from .levels import all_finite
from .methods import STORE_POLARITY
from .output import BuildJob
from .parallel import run_tasks
from .plan import PlanEntry
from .readers import VOLUME_FORMATS, read
from .readers.nifti import NO_BODY
from .threshold import auto_polarity

SAMPLE_MAX = 200  # inputs read for the vote
VOTE_BATCH = 25  # inputs per Dask task
VOLUME_VOTE_SLICES = 5  # slices of a sampled volume that vote (its vote is their majority)
MIXED_SHARE = 1 / 3  # a minority of at least a third (or a tie) marks the vote "mixed", with a warning
VOTE_FILE = "polarity_vote.json"


@dataclass
class StoreVote:
    """The store's polarity and how it was decided (``manifest.json`` ``polarity_vote``, store attrs)."""

    polarity: str  # bright | dark: the side every image takes; auto: a mixed vote, each image keeps its own side
    votes: dict[str, int]  # {"bright": n, "dark": n} over the readable sampled inputs
    n_sampled: int  # inputs read (<= SAMPLE_MAX)
    n_inputs: int  # planned inputs (with rows) the sample was drawn from
    unreadable: int  # sampled inputs whose frame 0 (volumes: vote slices) could not be read (no vote)
    seed: int  # split.seed: the sample's seed
    method: str
    mixed: bool = False
    sample: list[str] = field(default_factory=list)  # sample_base of the sampled inputs, in sample order
    majority: str | None = None  # bright | dark: the vote's majority (a tie: bright); None in votes saved before it

    def as_dict(self, *, with_sample: bool = True) -> dict:
        d = asdict(self)
        if not with_sample:
            d.pop("sample")
        return d


def sample_entries(entries: Sequence[PlanEntry], seed: int, n: int = SAMPLE_MAX) -> list[PlanEntry]:
    """The planned inputs (with rows) whose ``sha256(f"{seed}:{sample_base}")`` is smallest, at most ``n``."""
    planned = [e for e in entries if e.row_start >= 0]
    key = lambda e: hashlib.sha256(f"{seed}:{e.sample_base}".encode()).hexdigest()  # noqa: E731
    return sorted(planned, key=key)[:n]


def vote_slices(n_slices: int, k: int = VOLUME_VOTE_SLICES) -> list[int]:
    """The slices of a volume of ``n_slices`` that vote: the centres of ``k`` equal parts (all of a thinner one)."""
    return sorted({int((i + 0.5) * n_slices / k) for i in range(k)}) if n_slices > 0 else [0]


def vote_batch(items: Sequence[tuple[str, str, int]], method: str, max_pixels: int, slice_axis: str | None = None,
               window: str | None = None) -> list[str | None]:
    """The auto side of each ``(path, format, n_frames)`` (runs in a Dask task): frame 0's, or a volume's vote (the
    module's doc); None where it cannot be read. ``slice_axis``, ``window``: the build's, for volumes."""
    out: list[str | None] = []
    for path, fmt, n_frames in items:
        try:
            if fmt in VOLUME_FORMATS:
                frames = read(Path(path), fmt, vote_slices(n_frames), max_pixels=max_pixels, slice_axis=slice_axis,
                              window=window)
                body = [f for f in frames if NO_BODY not in f.meta.get("qc_flags", ())] or frames
                out.append(decide([auto_polarity(f.pixels, method=method, levels=f.levels) for f in body])[0])
                continue
            frame = read(Path(path), fmt, [0], max_pixels=max_pixels)[0]
            gray, levels = frame.pixels, frame.levels  # levels: DICOM's table of values (histogram from the codes)
            if not all_finite(gray, levels):  # as process_entry checks
                raise ValueError("non-finite pixels")
            out.append(auto_polarity(gray, method=method, levels=levels))  # as process_entry decides each record
        except Exception:  # noqa: BLE001 - a file the shards will report as failed; it just has no vote
            out.append(None)
    return out


def decide(votes: Sequence[str | None]) -> tuple[str, dict[str, int], bool]:
    """(polarity, counts, mixed) of per-image decisions (None = no vote): the majority, a tie going to bright."""
    counts = {"bright": sum(v == "bright" for v in votes), "dark": sum(v == "dark" for v in votes)}
    polarity = "dark" if counts["dark"] > counts["bright"] else "bright"
    total = counts["bright"] + counts["dark"]
    mixed = total > 0 and min(counts.values()) >= MIXED_SHARE * total
    return polarity, counts, mixed


def store_vote(job: BuildJob, client, entries: Sequence[PlanEntry]) -> StoreVote | None:
    """The store's vote when ``threshold.polarity`` is ``store`` (None otherwise): the saved one of an earlier run of
    this store, else a new vote (Dask tasks), saved before it is returned."""
    cfg = job.cfg
    if cfg.threshold.polarity != STORE_POLARITY:
        return None
    path = job.work / VOTE_FILE
    if path.exists():
        return StoreVote(**manifest.read_json(path))
    picked = sample_entries(entries, cfg.split.seed)
    items = [(e.source, e.format, e.n_frames) for e in picked]
    batches = [items[i : i + VOTE_BATCH] for i in range(0, len(items), VOTE_BATCH)]
    results: list[list[str | None]] = [[] for _ in batches]
    calls = [(b, cfg.threshold.method, cfg.geometry.max_pixels, cfg.geometry.slice_axis, cfg.threshold.window)
             for b in batches]
    for i, res in run_tasks(client, vote_batch, calls, desc="polarity vote", progress=cfg.runtime.progress):
        results[i] = res
    votes = [v for batch in results for v in batch]
    majority, counts, mixed = decide(votes)
    polarity = "auto" if mixed else majority
    vote = StoreVote(polarity=polarity, majority=majority, votes=counts, n_sampled=len(picked),
                     n_inputs=sum(e.row_start >= 0 for e in entries), unreadable=sum(v is None for v in votes),
                     seed=cfg.split.seed, method=cfg.threshold.method, mixed=mixed,
                     sample=[e.sample_base for e in picked])
    manifest.write_json(vote.as_dict(), path)
    if mixed:
        warnings.warn(f"{job.out}: the per-image polarity vote is mixed ({counts['bright']} bright, {counts['dark']} dark of "
                      f"{len(picked)} sampled inputs), as in a store of several modalities: every image keeps its own "
                      f"side (as with --polarity auto). To force one side for all, build with --polarity {majority} "
                      "(the majority) or the other side", MedsassWarning, stacklevel=2)
    return vote


__all__ = ["SAMPLE_MAX", "VOLUME_VOTE_SLICES", "StoreVote", "decide", "sample_entries", "store_vote", "vote_batch",
           "vote_slices"]
