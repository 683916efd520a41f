"""Before the phases of build-masks: the output folder, checked and prepared, and the run every phase works on.

A new folder becomes a store (``_medsass/params.json`` first); an existing store is resumed only when it was
built with the same parameters. Foreign data is never deleted; a store of other parameters is replaced only with
``--overwrite``.
"""
from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from medsass import configio, manifest, store
from medsass.errors import StoreError

from .config import BuildConfig


@dataclass(frozen=True)
class BuildJob:
    """One build-masks run, as every phase sees it: the config, the store folder and the salt of its groups."""

    cfg: BuildConfig
    out: Path
    salt: str
    params: dict = field(repr=False)  # cfg.output_params(): everything that changes what is written

    @property
    def work(self) -> Path:
        """``<store>/_medsass``: the plan, the shards' manifest parts, the run log."""
        return store.work_dir(self.out)


def open_output(cfg: BuildConfig, *, overwrite: bool = False, retry_failed: bool = False) -> BuildJob:
    """Check and prepare ``cfg.out`` (see the module's doc), then its salt: random and kept in the store unless
    ``runtime.salt`` gives one."""
    out = Path(cfg.out)
    _prepare(out, cfg, overwrite)
    if retry_failed:
        _refuse_retry_after_add_labels(out)
    return BuildJob(cfg=cfg, out=out, salt=_salt(cfg, store.work_dir(out)), params=cfg.output_params())


def _prepare(out: Path, cfg: BuildConfig, overwrite: bool) -> None:
    work = store.work_dir(out)
    params_file = work / "params.json"
    if out.exists() and any(out.iterdir()):
        if not params_file.exists():
            raise StoreError(
                f"{out} exists and is not a medsass store; choose a new --out (medsass never deletes foreign data)"
            )
        old = manifest.read_json(params_file)
        if old.get("params_digest") != cfg.params_digest():
            if not overwrite:
                old_params = old.get("params", {})
                diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in configio.diff(old_params, cfg.output_params()).items())
                # e.g. a store made before a default changed (method: 2026-11; polarity auto -> store: 2026-12-05)
                old_t = old_params.get("threshold", {})
                flags = [f"--{k} {old_t[k]}" for k in ("method", "polarity")
                         if old_t.get(k) and old_t[k] != getattr(cfg.threshold, k)]
                hint = f"; to resume it as it was built, add {' '.join(flags)}" if flags else ""
                raise StoreError(
                    f"{out} was built with other parameters ({diff}); pass --overwrite to rebuild it, "
                    f"or choose a new --out{hint}"
                )
            shutil.rmtree(out)
        elif overwrite:
            shutil.rmtree(out)
    work.mkdir(parents=True, exist_ok=True)
    if not params_file.exists():
        manifest.write_json({"params": cfg.output_params(), "params_digest": cfg.params_digest()}, params_file)


def _refuse_retry_after_add_labels(out: Path) -> None:
    added = store.work_dir(out) / "add_labels"
    if (added / "history.jsonl").exists() or (added / "run" / "plan.json").exists():
        raise StoreError(
            f"labels were added to {out} by add-labels ({added}); --retry-failed rebuilds whole shards "
            "with the build's own --labels and would drop them. Retry into a new store (build-masks --out NEW), "
            "then run add-labels on it"
        )


def _salt(cfg: BuildConfig, work: Path) -> str:
    if cfg.runtime.salt:
        return cfg.runtime.salt
    path = work / "salt"
    if not path.exists():
        manifest.atomic_write_bytes(path, secrets.token_hex(16).encode(), mode=0o600)  # a secret: owner only
    return path.read_text().strip()
