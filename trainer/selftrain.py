"""Self-training: re-label the unlabeled pool with a pretrained model's own predictions, pretrain again.

::

    medsass-train selftrain CONFIG [--rounds N] [--name NAME] [--set key=value ...]
    medsass-train selftrain CONFIG --label-only --set selftrain.source=RUN/finetune/best.pt selftrain.threshold=0.5

Round r (1..N) takes the model of round r-1 (round 0: the config's pretrain run, trained first if
missing, or ``selftrain.source``), predicts every stored record of the pretrain splits (train, and
val when the pretrain used it; **never test**) and writes ``pseudo_labels/<name>_r<r>`` in every
pretrain store. Rule (``selftrain.mode``), on the sigmoid probability p of each pixel:

* ``hard``: {0, 1} = p >= ``threshold``; every reader of the store sees a plain mask.
* ``soft``: round(255 p') as uint8 (array attribute ``encoding: probability_u8``), p' = sigmoid(logit p -
  logit threshold), so p' >= 0.5 is exactly the hard rule. The trainer reads p' back in [0, 1],
  resamples it with the image under augmentation, and uses it as ``loss.soft_labels`` says:
  thresholded at 0.5, confidence weights |2p' - 1|, or p' as the target.

``threshold`` is ``match_fg`` by default: the probability at which the pool's foreground fraction
equals that of the parent target on the same records, or a fixed number. A model pretrained with the
FN-heavy focal-Tversky loss (FN 0.7, FP 0.3) over-segments at 0.5, and each round inflates the masks
further (measured: docs/results/pseudo_labels.md); matching the parent's foreground fraction is a
label-free correction.

Then a fresh U-Net is pretrained on them (same config, ``pretrain.target: pseudo_labels/<name>_r<r>``)
into ``<out_dir>/selftrain/<name>_r<r>/`` and scored zero-shot on ``evaluate.splits`` (test).
Expert masks are read only by :func:`~medsass.trainer.mask_quality.mask_quality`, which *measures* the new pseudo-labels;
nothing they give is fed back. New labels with a foreground fraction outside
[``min_fg``, ``max_fg``] are flagged degenerate and left out of the next pretrain.

``--label-only`` writes round 1's labels from ``selftrain.source`` and stops: no pretraining. With a fine-tuned
model as the source that is self-training with the labels the user has; a joint fine-tune
(``finetune.pseudo_weight``) then fits them beside the labeled batch.

Provenance: ``attrs['medsass']['pseudo_labels'][name]`` of the store (source checkpoint and its
sha256, round, rule, parent target, date, versions, counts) and the sidecar table
``<store>/pseudo_labels/<name>.parquet`` (sample_id, row, split, fg_fraction, mean_confidence,
degenerate), read by :func:`medsass.trainer.records.select_rows`. Writing: rank r of W writes the
whole shards k with k % W == r; rank 0 then writes the sidecar and attributes and consolidates.
An existing name is never overwritten.
"""
from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import zarr
from medsass.pipeline.methods import FG_HIGH, FG_LOW
from medsass.trainer import checkpoint as ckpt_mod
from medsass.trainer.config import TrainConfig
from medsass.trainer.distributed import DistInfo, all_gather_objects, barrier, setup
from medsass.trainer.mask_quality import mask_quality
from medsass.trainer.model import build_model
from medsass.trainer.precision import amp_dtype
from medsass.trainer.records import pseudo_label_sidecar
from medsass.trainer.run import run_stages
from medsass.trainer.stream import ArrayReader, read_rows
from medsass.trainer.targets import BINARY, PROBABILITY, target_encoding, to_mask

import medsass
from medsass import configio
from medsass import manifest as manifest_mod
from medsass import store as store_mod
from medsass.errors import ConfigError, StoreError

SIDECAR_COLUMNS = ("sample_id", "row", "split", "fg_fraction", "mean_confidence", "degenerate")


# -- re-labelling -------------------------------------------------------------------------------------


def provenance(store: str | Path, name: str) -> dict[str, Any] | None:
    """The provenance entry of ``pseudo_labels/<name>``, or None."""
    _, info = store_mod.open_store(store)
    return (info.attrs.get(store_mod.PSEUDO_GROUP) or {}).get(name)


def _check_new_name(store: Path, name: str) -> None:
    taken = [p for p in (store / store_mod.PSEUDO_GROUP / name, store / store_mod.PSEUDO_GROUP / f"{name}.parquet") if p.exists()]
    if taken or provenance(store, name) is not None:
        raise StoreError(f"{store}: pseudo-label array {store_mod.PSEUDO_GROUP}/{name} already exists "
                         f"({', '.join(map(str, taken)) or 'provenance entry'}); pick another name "
                         "(existing pseudo-labels are never overwritten; delete them by hand if they are a leftover)")


def pool_rows(store: str | Path, splits: Sequence[str]):
    """Manifest rows (status ok, stored) of ``splits``: the pool to re-label. Test is refused."""
    if not splits or "test" in splits or not set(splits) <= {"train", "val"}:
        raise ConfigError(f"the pool to re-label must be a non-empty subset of [train, val] (never test), got {list(splits)}")
    df = manifest_mod.read_manifest(store)
    df = df[(df["status"] == "ok") & (df["row"] >= 0) & df["split"].isin(list(splits))].sort_values("row")
    if df.empty:
        raise StoreError(f"{store}: no stored records in split(s) {list(splits)} to re-label")
    return df


def load_model(checkpoint: str | Path, device):
    ck = ckpt_mod.load(checkpoint)
    model = build_model(ck["model_args"])
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), ck


def probabilities(model, images: np.ndarray, *, device, amp=None, batch_size: int = 32) -> np.ndarray:
    """Sigmoid probabilities (n, S, S) float32 of uint8 images (n, S, S)."""
    out = []
    with torch.no_grad():
        for a in range(0, len(images), batch_size):
            x = torch.from_numpy(images[a : a + batch_size, None]).to(device).float().div_(255)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(x)
            out.append(torch.sigmoid(logits.float())[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + images.shape[1:], np.float32)


def shift(p: np.ndarray, threshold: float) -> np.ndarray:
    """sigmoid(logit p - logit threshold): the probability re-centred so that ``threshold`` becomes 0.5."""
    if threshold == 0.5:
        return p
    a = p * (1 - threshold)
    return a / np.maximum(a + (1 - p) * threshold, 1e-12)


def encode(p: np.ndarray, mode: str, threshold: float) -> np.ndarray:
    """uint8 array of the rule: {0, 1} = p >= threshold (hard) or round(255 shift(p, threshold)) (soft)."""
    return (p >= threshold).astype(np.uint8) if mode == "hard" else np.rint(shift(p, threshold) * 255).astype(np.uint8)


def match_threshold(hist: np.ndarray, target_fg: float) -> float:
    """The bin edge t of a histogram of p over [0, 1] at which the fraction of pixels with p >= t is closest to ``target_fg``."""
    above = np.concatenate([np.cumsum(hist[::-1])[::-1], [0]]) / max(hist.sum(), 1)  # above[i]: fraction >= edge i
    edges = np.linspace(0, 1, len(hist) + 1)
    i = int(np.argmin(np.abs(above - target_fg)))
    return float(np.clip(edges[i], 1e-3, 1 - 1e-3))


def relabel(
    store: str | Path, checkpoint: str | Path, name: str, *, splits: Sequence[str], mode: str = "hard",
    threshold: float | str = 0.5, parent_target: str = "pseudo_mask", round: int = 1, min_fg: float = FG_LOW,
    max_fg: float = FG_HIGH, batch_size: int = 32, dist=None, amp=None,
) -> dict[str, Any]:
    """Write ``pseudo_labels/<name>`` of ``store`` from ``checkpoint``'s predictions on ``splits``; returns its provenance.

    ``threshold``: a probability, or ``"match_fg"``: the one at which the pool's foreground fraction
    equals ``parent_target``'s on the same records (a first prediction pass builds a histogram of p).
    Rows outside the pool (test, failed, other splits) stay 0 and are absent from the sidecar.
    Under DDP every rank calls this; rank r writes the whole shards k with k % world_size == r.
    """
    dist = dist or DistInfo()
    if mode not in ("hard", "soft"):
        raise ConfigError(f"mode must be hard or soft, got {mode!r}")
    store, checkpoint = Path(store), Path(checkpoint)
    _, info = store_mod.open_store(store)
    pool = pool_rows(store, splits)
    _check_new_name(store, name)
    model, ck = load_model(checkpoint, dist.device)  # before anything is written: a bad checkpoint leaves no array behind
    path = f"{store_mod.PSEUDO_GROUP}/{name}"
    encoding = BINARY if mode == "hard" else PROBABILITY
    if dist.is_main:
        group = zarr.open_group(str(store), mode="a", use_consolidated=False)
        arr = store_mod.pseudo_label_array(group, name, create=True)
        arr.attrs[store_mod.ATTRS_KEY] = {"encoding": encoding, "round": round, "mode": mode}
    barrier(dist)
    group = zarr.open_group(str(store), mode="a", use_consolidated=False)
    reader = ArrayReader(store, store_mod.IMAGE)
    rows_all = pool["row"].to_numpy(np.int64)
    mine = [(a, b, rows) for k in range(dist.rank, info.n_shards, dist.world_size)
            for a, b in [info.shard_bounds(k)] for rows in [rows_all[(rows_all >= a) & (rows_all < b)]]
            if len(rows)]  # a shard with nothing of the pool (e.g. test only) is not written: its fill value 0 stays
    rule = {"mode": mode, "threshold": threshold, "encoding": encoding, "min_fg": min_fg, "max_fg": max_fg}
    if threshold == "match_fg":
        parent = ArrayReader(store, parent_target)
        hist, fg_sum = np.zeros(4096, np.int64), 0.0
        for _, _, rows in mine:
            p = probabilities(model, reader.read(rows), device=dist.device, amp=amp, batch_size=batch_size)
            hist += np.histogram(p, bins=4096, range=(0.0, 1.0))[0]
            fg_sum += float(to_mask(parent.read(rows), target_encoding(store, parent_target)).mean(axis=(1, 2)).sum())
        parts = all_gather_objects((hist, fg_sum), dist)
        hist, parent_fg = sum(h for h, _ in parts), sum(f for _, f in parts) / len(rows_all)
        threshold = match_threshold(hist, parent_fg)
        rule.update(threshold=threshold, threshold_rule="match_fg", parent_fg_fraction=parent_fg)
    stats = []
    for a, b, rows in mine:
        p = probabilities(model, reader.read(rows), device=dist.device, amp=amp, batch_size=batch_size)
        values = encode(p, mode, threshold)
        block = np.zeros((b - a, info.size, info.size), np.uint8)
        block[rows - a] = values
        store_mod.write_rows(group, a, {path: block})  # the whole shard, by this rank only
        fg = to_mask(values, encoding).mean(axis=(1, 2))
        conf = np.abs(2 * (values / 255.0 if mode == "soft" else shift(p, threshold)) - 1).mean(axis=(1, 2))
        stats += [(int(r), float(f), float(c)) for r, f, c in zip(rows, fg, conf)]
    del model
    stats = sorted(s for part in all_gather_objects(stats, dist) for s in part)
    prov = None
    if dist.is_main:
        by_row = pool.set_index("row")
        fg = np.array([s[1] for s in stats])
        degenerate = (fg < min_fg) | (fg > max_fg)
        table = {
            "sample_id": [str(by_row.at[r, "sample_id"]) for r, _, _ in stats],
            "row": [r for r, _, _ in stats],
            "split": [str(by_row.at[r, "split"]) for r, _, _ in stats],
            "fg_fraction": fg.tolist(),
            "mean_confidence": [c for _, _, c in stats],
            "degenerate": degenerate.tolist(),
        }
        manifest_mod.write_table(pa.table(table), store / f"{path}.parquet")
        prov = {
            "name": name, "array": path, "sidecar": f"{path}.parquet", "round": round,
            "rule": rule,
            "source_checkpoint": str(checkpoint.resolve()), "source_sha256": manifest_mod.file_digest(checkpoint),
            "source_step": ck.get("step"), "source_model": ck["model_args"], "parent_target": parent_target,
            "splits": list(splits), "n_records": len(stats), "n_degenerate": int(degenerate.sum()),
            "fg_fraction_mean": float(fg.mean()) if len(fg) else None,
            "mean_confidence": float(np.mean(table["mean_confidence"])) if stats else None,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "medsass_version": medsass.__version__, "torch_version": str(torch.__version__),
        }
        meta = dict(group.attrs[store_mod.ATTRS_KEY])
        meta[store_mod.PSEUDO_GROUP] = {**(meta.get(store_mod.PSEUDO_GROUP) or {}), name: prov}
        group.attrs[store_mod.ATTRS_KEY] = meta
        store_mod.consolidate(store)
    barrier(dist)
    return prov if prov is not None else provenance(store, name)


# -- measurement (expert masks: read here only, never fed back) ---------------------------------------


def labeled_pool_rows(store: str | Path, splits: Sequence[str], target: str | None = None) -> dict[str, np.ndarray]:
    """split -> labeled rows of the pool (restricted to the rows ``target``'s sidecar covers, if it has one)."""
    df = pool_rows(store, splits)
    df = df[df["has_label"]]
    side = pseudo_label_sidecar(store, target) if target else None
    if side is not None:
        df = df[df["row"].isin(side["row"])]
    return {sp: df.loc[df["split"] == sp, "row"].to_numpy(np.int64) for sp in splits}


# -- the rounds ----------------------------------------------------------------------------------------


def label_name(prefix: str, round: int) -> str:
    return f"{prefix}_r{round}"


def run_selftrain(config, *, rounds: int | None = None, name: str | None = None, label_only: bool = False) -> dict[str, Any]:
    """Round 0 (the pretrain run), then ``rounds`` x (re-label, pretrain, zero-shot evaluate).

    Returns (and writes to ``<out_dir>/selftrain/<name>.json``) one entry per round: its target,
    checkpoint, pseudo-label IoU against the expert labels on the labeled pool records (measurement
    only) beside its parent's, degenerate counts, and the zero-shot metrics on ``evaluate.splits``.

    ``label_only``: one re-labelling from ``selftrain.source`` (required), no pretraining: e.g. the pool labelled
    by a fine-tuned model, for a joint fine-tune to fit (``pretrain.target: pseudo_labels/<name>_r1``,
    ``finetune.pseudo_weight > 0``; the scale study's ``selftrain`` recipe).
    """
    st = config.selftrain
    rounds_asked = rounds
    rounds, prefix = rounds or st.rounds, name or st.name
    configio.load(type(st), {**configio.to_dict(st), "rounds": rounds, "name": prefix})  # validate the CLI values
    if label_only:
        if st.source is None:
            raise ConfigError("--label-only writes the pool's labels from selftrain.source and trains nothing: set "
                              "selftrain.source to the checkpoint whose predictions become the labels (e.g. "
                              "RUN/finetune/best.pt, with selftrain.threshold=0.5 for a fine-tuned model)")
        if rounds_asked not in (None, 1):
            raise ConfigError(f"--label-only writes one round of labels; drop --rounds {rounds_asked} (or --label-only)")
        rounds = 1
    root = Path(config.out_dir)
    stores = {n: Path(config.stores[n]) for n in config.stage_stores("pretrain")}
    splits = list(config.pretrain.splits)
    if st.source is None:
        run_stages(config, ["pretrain"])  # skipped when done
        source = root / "pretrain" / "final.pt"
    else:
        source = ckpt_mod.resolve(st.source, "pretrain")
    dist = setup(config.runtime.device)
    amp = amp_dtype(config.runtime.amp, dist.device)
    parent = config.pretrain.target
    history = [{"round": 0, "target": parent, "checkpoint": str(source), "stores": _quality(stores, parent, splits),
                "zero_shot": zero_shot_metrics(config, source, root / "selftrain" / label_name(prefix, 0)) if st.evaluate else None}]
    for r in range(1, rounds + 1):
        label = label_name(prefix, r)
        rules = {}
        for store_name, path in stores.items():
            prov = provenance(path, label)
            if not _same_labels(prov, source, parent, st):  # refuses a name taken by anything else
                prov = relabel(path, source, label, splits=splits, mode=st.mode, threshold=st.threshold, parent_target=parent,
                               round=r, min_fg=st.min_fg, max_fg=st.max_fg, batch_size=config.evaluate.batch_size, dist=dist, amp=amp)
            rules[store_name] = prov["rule"]
        target = f"{store_mod.PSEUDO_GROUP}/{label}"
        if label_only:
            history.append({"round": r, "target": target, "parent": parent, "checkpoint": None, "rule": rules,
                            "stores": _quality(stores, target, splits, parent=parent), "zero_shot": None})
            break
        data = configio.to_dict(config)
        data["out_dir"] = str(root / "selftrain" / label)
        data["pretrain"]["target"] = target
        round_cfg = configio.load(TrainConfig, data)
        run_stages(round_cfg, ["pretrain"])
        source = root / "selftrain" / label / "pretrain" / "final.pt"
        history.append({
            "round": r, "target": target, "parent": parent, "checkpoint": str(source), "rule": rules,
            "loss_soft_labels": config.loss.soft_labels, "stores": _quality(stores, target, splits, parent=parent),
            "zero_shot": zero_shot_metrics(round_cfg, source, root / "selftrain" / label) if st.evaluate else None,
        })
        parent = target
    out = {"name": prefix, "rounds": history}
    if dist.is_main:
        manifest_mod.write_json(out, root / "selftrain" / f"{prefix}.json")
    return out


def _same_labels(prov: dict[str, Any] | None, source: Path, parent: str, st) -> bool:
    """Whether existing provenance says these labels were made from ``source`` with this rule (a resumed run)."""
    if prov is None or prov["source_sha256"] != manifest_mod.file_digest(source) or prov["parent_target"] != parent:
        return False
    rule = prov["rule"]
    matched = rule.get("threshold_rule") == "match_fg"
    same_threshold = matched if st.threshold == "match_fg" else not matched and rule["threshold"] == st.threshold
    return rule["mode"] == st.mode and same_threshold and (rule["min_fg"], rule["max_fg"]) == (st.min_fg, st.max_fg)


def _quality(stores: dict[str, Path], target: str, splits: Sequence[str], parent: str | None = None) -> dict[str, Any]:
    """store -> {split: IoU of ``target`` (and of ``parent`` on the same rows), n_records, n_degenerate}: measurement only."""
    out = {}
    for name, path in stores.items():
        rows = labeled_pool_rows(path, splits, target)
        res = {sp: mask_quality(path, target, r) for sp, r in rows.items()}
        if parent is not None:
            for sp, r in rows.items():
                q = mask_quality(path, parent, r)
                res[sp].update(parent_iou_per_image_mean=q["iou_per_image_mean"], parent_iou=q["iou"])
        side = pseudo_label_sidecar(path, target)
        if side is not None:
            res["n_records"], res["n_degenerate"] = len(side), int(side["degenerate"].sum())
        out[name] = res
    return out


def zero_shot_metrics(config, checkpoint: Path, out_dir: Path) -> dict[str, Any] | None:
    """Evaluate ``checkpoint`` against the expert labels of ``evaluate.splits`` into ``out_dir/evaluate``."""
    data = configio.to_dict(config)
    data["out_dir"] = str(out_dir)
    data["evaluate"].update(checkpoint=str(checkpoint), target="label")
    try:
        return run_stages(configio.load(TrainConfig, data), ["evaluate"])["evaluate"].metrics
    except StoreError as exc:  # e.g. no labeled test records: nothing to score
        return {"skipped": str(exc)}
