"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors and plain data (so the safe loader reads it)::

    kind            last | best | final
    stage           pretrain | finetune
    model           U-Net state dict (clean keys: no DDP / compile prefixes)
    model_args      what rebuilds the model (medsass.trainer.model.model_args)
    mode            pretrain: end_to_end | encoder_only (what finetune may carry); finetune: its init
    optimizer, scheduler, scaler    (last.pt only)
    rng             torch / cuda / numpy / python RNG states as tensors and lists
    step            optimiser steps done
    batches         micro-batches consumed by each rank (the stream resumes after them)
    best            best val IoU so far (or None)
    config          the resolved run config (plain data)
    stores          store name -> {"path", "manifest_digest", "prep"}; prep = the store's prep parameters
                    {"size", "geometry": {size, resize, tile, tile_overlap, max_pixels},
                    "threshold": {method, polarity, intensity}} that ``medsass-train predict`` repeats
    encoder_weights the model.encoder_weights this stage started from: {"name"} or {"file", "sha256"}; None when
                    it started from random weights or from a checkpoint (medsass.trainer.weights.identity)
    medsass_version, torch_version
"""
from __future__ import annotations

import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import medsass
from medsass.atomic import atomic_open
from medsass.errors import ConfigError, MedsassWarning, StoreError, check_free_space, disk_full
from medsass.manifest import file_digest, manifest_digest, read_json
from medsass.store import open_store

FORMAT = 1  # the layout above; raise it when a reader of the old layout would misread the new one
READS_FORMATS = (1,)  # formats load() accepts
LAST, PREV = "last.pt", "last.prev.pt"  # the resume point and the one it replaced


class UnreadableCheckpoint(ConfigError):
    """torch cannot read the file at all (torn, truncated, not a checkpoint)."""


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` so a reader (or a resume after ``kill -9``) sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    what = f"checkpoint {path.name}"
    check_free_space(path.parent, _tensor_bytes(payload) + 2**20, what)
    try:
        with atomic_open(path) as fh:
            torch.save({"format": FORMAT, "medsass_version": medsass.__version__, "torch_version": str(torch.__version__), **payload}, fh)
    except BaseException as exc:
        full = disk_full(exc, path, what)
        if full is not None:
            raise full from exc
        raise


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested payload (what dominates a checkpoint file's size)."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU with the safe (weights-only) unpickler."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise UnreadableCheckpoint(_unreadable_message(path, exc)) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ConfigError(f"{path} is not a medsass checkpoint (no model / model_args entries)")
    check_format(ckpt, path)
    return ckpt


def _unreadable_message(path: Path, exc: Exception) -> str:
    """What happened, which file, and what to do about a checkpoint torch cannot read."""
    if isinstance(exc, pickle.UnpicklingError):  # the weights-only loader's long advice is about trusting foreign files
        detail = "it holds Python objects the safe weights-only loader refuses"
    else:
        lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    if path.name in (LAST, PREV):
        todo = (f"Delete it and re-run the same command: the stage resumes from {PREV} when that is readable, "
                "else from its start (or redo the stage at once with --restart)")
    else:
        todo = ("Restore it from a copy, or write it again by re-running the stage that made it with --restart "
                "(medsass-train run CONFIG --stages STAGE --restart)")
    return (f"checkpoint {path} is not a readable medsass checkpoint ({detail}): the file is damaged (a write cut short "
            f"by a full disk or a killed copy) or is not a checkpoint. {todo}")


def check_format(ckpt: dict[str, Any], path: str | Path) -> None:
    """ConfigError unless this medsass reads the checkpoint's ``format``, saying which medsass to use instead."""
    fmt = ckpt.get("format")
    if fmt in READS_FORMATS and type(fmt) is int:
        return
    reads = ", ".join(map(str, READS_FORMATS))
    wrote = f"medsass {ckpt.get('medsass_version', '(version not recorded)')}"
    if type(fmt) is int and fmt > max(READS_FORMATS):
        raise ConfigError(
            f"checkpoint {path} has format {fmt!r}, newer than this medsass {medsass.__version__} reads (it reads format "
            f"{reads}); {wrote} wrote it: upgrade medsass to use it (pip install -U medsass)"
        )
    raise ConfigError(
        f"checkpoint {path} has format {fmt!r}, older than this medsass {medsass.__version__} reads (it reads format {reads}); "
        f"{wrote} wrote it: use the medsass version that wrote it, or redo the stage with --restart to write a current one"
    )


def save_last(folder: str | Path, payload: dict[str, Any]) -> None:
    """Write ``folder/last.pt``; the last.pt it replaces becomes last.prev.pt.

    ``save`` is atomic, so a kill never tears last.pt; a bad disk or an interrupted copy of the run still can, and
    then the previous resume point costs one checkpoint interval instead of the whole stage (:func:`load_resume`).
    """
    last = Path(folder) / LAST
    if last.exists() and zipfile.is_zipfile(last):  # torch's zip container: a torn last.pt must not replace a good PREV
        os.replace(last, last.parent / PREV)
    save(last, payload)


def load_resume(folder: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint an interrupted stage resumes from and its path, or None: ``last.pt``, else ``last.prev.pt``.

    last.pt missing beside a last.prev.pt means a kill between rotating and writing: last.prev.pt is the newest.
    An unreadable last.pt falls back to a readable last.prev.pt with a warning; without one its error stands.
    """
    last, prev = Path(folder) / LAST, Path(folder) / PREV
    if not last.exists():
        return (load(prev), prev) if prev.exists() else None
    try:
        return load(last), last
    except UnreadableCheckpoint as exc:
        if not prev.exists():
            raise
        try:
            ckpt = load(prev)
        except ConfigError:
            raise exc from None
    warnings.warn(f"{last} cannot be read (damaged); resuming from {prev} (step {ckpt.get('step')}) instead: "
                  "the steps after it are trained again", MedsassWarning, stacklevel=2)
    return ckpt, prev


def resolve(path: str | Path, stage: str = "pretrain") -> Path:
    """A checkpoint file, or a run folder (``<run>/<stage>/final.pt``) or stage folder (``final.pt``)."""
    path = Path(path)
    for cand in (path, path / "final.pt", path / stage / "final.pt"):
        if cand.is_file():
            return cand
    raise ConfigError(f"no checkpoint at {path} (looked for the file, {path}/final.pt and {path}/{stage}/final.pt)")


def resolve_model(path: str | Path) -> Path:
    """The model ``predict`` and ``export`` use: a checkpoint file; or, of a run folder (or its ``finetune/``
    folder), the fine-tuned checkpoint its evaluate stage scored (``best.pt`` or ``final.pt``, recorded by content
    in ``evaluate/done``), so the metrics describe the model deployed; without that record ``best.pt`` where the
    fine-tune kept one (what ``evaluate.checkpoint: auto`` scores), else ``final.pt``."""
    path = Path(path)
    stage = path / "finetune" if (path / "finetune").is_dir() else path if path.name == "finetune" else None
    if path.is_file() or stage is None:
        return resolve(path, "finetune")
    found = [stage / n for n in ("best.pt", "final.pt") if (stage / n).is_file()]
    if not found:
        raise ConfigError(f"no fine-tuned checkpoint in {stage} (looked for best.pt and final.pt); run the finetune "
                          "stage first, or give a .pt file")
    marker = stage.parent / "evaluate" / "done"
    if marker.is_file():
        try:
            scored = read_json(marker).get("checkpoint")
        except (ValueError, AttributeError) as exc:  # torn or hand-edited: never guess which model was scored
            raise ConfigError(f"{marker} cannot be read ({exc}); re-run the evaluate stage, or give the .pt file "
                              "to use") from None
        for cand in found:
            if same_file(scored, cand):
                return cand
    return found[0]


def file_id(path: str | Path | None) -> dict[str, Any] | None:
    """What a done marker records of the checkpoint its stage started from: the file's size and sha256.

    Content, not place: a run copied or moved to another folder or filesystem (``cp -a runs/a runs/b``) still matches.
    """
    if path is None or not Path(path).exists():
        return None
    return {"bytes": Path(path).stat().st_size, "sha256": file_digest(path)}


def same_file(recorded: Any, path: str | Path | None) -> bool:
    """Whether ``path`` is the checkpoint a done marker recorded with :func:`file_id`.

    Markers written before content hashes hold ``[resolved path, size, mtime_ns]``. They match on size and mtime,
    whatever the path: ``cp -a``, ``mv`` and ``rsync -a`` keep both, while a checkpoint written again gets a new
    mtime. (Size alone says nothing: every checkpoint of one architecture has about the same size.) A plain ``cp``
    of such an old run resets mtimes and is refused, as before; --restart of the finishing stage rewrites the marker.
    """
    if recorded is None or path is None or not Path(path).exists():
        return recorded is None and (path is None or not Path(path).exists())
    st = Path(path).stat()
    if isinstance(recorded, list) and len(recorded) == 3:  # the older (path, size, mtime) form
        return [recorded[1], recorded[2]] == [st.st_size, st.st_mtime_ns]
    if not isinstance(recorded, dict) or recorded.get("bytes") != st.st_size:  # cheap first: no hashing
        return False
    return recorded.get("sha256") == file_digest(path)


def store_digests(stores: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per store: path, manifest digest and prep parameters (what a checkpoint records about its data)."""
    return {name: {"path": str(p), "manifest_digest": manifest_digest(p), "prep": prep_params(p)} for name, p in stores.items()}


def prep_params(store: str | Path) -> dict[str, Any]:
    """The store's image size and its prep ``geometry`` / ``threshold`` parameters, as plain data.

    Read from ``attrs['medsass']['params']`` (written by ``medsass-prep build-masks``); a store without
    them (e.g. a synthetic test store) records only its size."""
    _, info = open_store(store)
    params = info.attrs.get("params") or {}
    out: dict[str, Any] = {"size": info.size}
    for key in ("geometry", "threshold"):
        if isinstance(params.get(key), dict):
            out[key] = dict(params[key])
    return out


def check_stores(ckpt: dict[str, Any], current: dict[str, dict[str, str]], *, where: str, allow_changed: bool) -> None:
    """Raise when a store this checkpoint was trained on (same name and path) has a changed manifest."""
    changed = [
        name
        for name, now in current.items()
        if name in ckpt.get("stores", {})
        and ckpt["stores"][name]["path"] == now["path"]
        and ckpt["stores"][name]["manifest_digest"] != now["manifest_digest"]
    ]
    if changed and not allow_changed:
        raise StoreError(
            f"store(s) {', '.join(n + ' (' + current[n]['path'] + ')' for n in changed)} changed since {where} was written "
            "(manifest digest differs): splits or records may differ. Use a new out_dir, --restart, "
            "or --allow-changed-store if the change is harmless"
        )


def capture_rng() -> dict[str, Any]:
    """All RNG states, as tensors and plain lists (readable by the weights-only loader)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "state": [int(x) for x in state], "gauss": gauss},
    }


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
