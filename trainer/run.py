"""Stage orchestration: ``run_stages(config)`` runs pretrain → finetune → evaluate into one folder.

::

    <out_dir>/config.yaml                        resolved config
    <out_dir>/pretrain/{last,best,final}.pt      + metrics.jsonl, done
    <out_dir>/finetune/{last,best,final}.pt      + metrics.jsonl, done
    <out_dir>/evaluate/{metrics.json, per_image.csv, overlays/}, done

Everything that can be wrong (config, encoder, stores, rows, checkpoints, a changed store) is
checked by :func:`plan_run` before any training starts. A finished stage (``done`` marker) is
skipped on re-run; an interrupted one resumes from its ``last.pt``. ``run_arms`` runs several
fine-tune arms (scratch / encoder_only / end_to_end) on one shared pretrain run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from medsass.trainer import checkpoint as ckpt_mod
from medsass.trainer import loop
from medsass.trainer.config import STAGES, TrainConfig, stage_section
from medsass.trainer.data import check_sample_ids, read_sample_ids, select_rows
from medsass.trainer.distributed import barrier, setup
from medsass.trainer.evaluate import eval_rows, run_evaluate
from medsass.trainer.model import build_model, check_compatible, model_args
from medsass.trainer.targets import is_soft_target

from medsass import configio
from medsass.errors import ConfigError, StoreError
from medsass.manifest import read_json, read_manifest, write_json
from medsass.store import open_store

DONE = "done"
STAGE_FILES = ("last.pt", "last.prev.pt", "best.pt", "final.pt", "metrics.jsonl", DONE, "metrics.json", "per_image.csv")


@dataclass
class StagePlan:
    stage: str
    dir: Path
    skip: bool = False  # finished with the same config
    resume: dict[str, Any] | None = None  # last.pt to continue from
    rows: dict[str, Any] = field(default_factory=dict)  # train: store -> rows; evaluate: split -> store -> rows
    val_rows: dict[str, Any] = field(default_factory=dict)  # store -> rows for best.pt
    pseudo_rows: dict[str, Any] = field(default_factory=dict)  # finetune with pseudo_weight > 0: pool store -> rows
    init: str = "scratch"  # finetune: end_to_end | encoder_only | scratch
    image_size: int = 0  # S of the stage's stores
    source: Path | None = None  # finetune: pretrain checkpoint (None for scratch); evaluate: the checkpoint scored


@dataclass
class StageResult:
    stage: str
    status: str  # done | skipped
    dir: Path
    metrics: dict[str, Any] | None = None


def run_stages(
    config: TrainConfig, stages: Sequence[str] | None = None, *, restart: bool = False, allow_changed_store: bool = False
) -> dict[str, StageResult]:
    """Run ``stages`` (default ``config.stages``) in order; return one StageResult per stage.

    Library entry point for the CLI, study runners and SLURM jobs (torchrun: one call per process).
    """
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    stages = list(stages or config.stages)
    dist = setup(config.runtime.device)
    plans = plan_run(config, stages, restart=restart, allow_changed_store=allow_changed_store)
    out = Path(config.out_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        configio.dump_yaml(config, out / "config.yaml")
    results = {}
    for plan in plans:
        if plan.skip:
            results[plan.stage] = StageResult(plan.stage, "skipped", plan.dir, _stage_metrics(plan.dir))
            continue
        if restart and dist.is_main:
            _clear(plan.dir)
        barrier(dist)
        if plan.stage == "evaluate":
            metrics = run_evaluate(config, plan, dist)
        else:
            metrics = loop.run_training(config, plan, dist)
        barrier(dist)
        results[plan.stage] = StageResult(plan.stage, "done", plan.dir, metrics)
    return results


def run_arms(
    config: TrainConfig, arms: Sequence[str] = ("scratch", "encoder_only", "end_to_end"), *,
    restart: bool = False, allow_changed_store: bool = False,
) -> dict[str, dict[str, Any] | None]:
    """One pretrain run in ``<out_dir>/pretrain``, then finetune + evaluate per arm in ``<out_dir>/arms/<arm>``.

    Returns arm -> evaluate metrics; also written to ``<out_dir>/arms/summary.json``.
    """
    root = Path(config.out_dir)
    if any(a != "scratch" for a in arms):
        run_stages(config, ["pretrain"], restart=restart, allow_changed_store=allow_changed_store)
    results = {}
    for arm in arms:
        data = configio.to_dict(config)
        data["out_dir"] = str(root / "arms" / arm)
        data["finetune"]["init"] = arm
        data["finetune"]["pretrained"] = None if arm == "scratch" else str(root / "pretrain" / "final.pt")
        arm_cfg = configio.load(TrainConfig, data)
        res = run_stages(arm_cfg, ["finetune", "evaluate"], restart=restart, allow_changed_store=allow_changed_store)
        results[arm] = res["evaluate"].metrics
    if _is_main():
        write_json(results, root / "arms" / "summary.json")
    return results


# -- validation, before anything runs ----------------------------------------------------------


def plan_run(config: TrainConfig, stages: Sequence[str], *, restart: bool = False, allow_changed_store: bool = False) -> list[StagePlan]:
    """Check everything a run needs and say, per stage, whether it runs, resumes or is skipped."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]  # always in pipeline order
    build_model(config.model)  # unknown encoder / unbuildable U-Net: error now
    used = {n for s in stages for n in config.stage_stores(s)} | (set(config.pseudo_pool()) if "finetune" in stages else set())
    for name in sorted(used):
        _check_store(name, config.stores[name])
    digests = ckpt_mod.store_digests({n: config.stores[n] for n in used})
    out = Path(config.out_dir)
    plans = []
    for stage in stages:
        plan = StagePlan(stage, out / stage)
        if stage == "evaluate":
            ev = config.evaluate
            names = config.stage_stores("evaluate")
            plan.rows = {sp: {n: eval_rows(config.stores[n], sp, ev.target) for n in names} for sp in ev.splits}
            plan.source = _eval_checkpoint(config, stages, digests, allow_changed_store, plans)
        else:
            _plan_training(config, plan, stages)
        if not restart:
            _check_existing(config, plan, digests, allow_changed_store)
        plans.append(plan)
    by_stage = {p.stage: p for p in plans}
    if config.evaluate.checkpoint == "best" and "finetune" in by_stage and not by_stage["finetune"].val_rows:
        raise ConfigError("evaluate.checkpoint=best needs val records with labels for finetune's best.pt; "
                          "there are none: use evaluate.checkpoint=finetune")
    return plans


def _check_store(name: str, path: str) -> None:
    try:
        _, info = open_store(path)
        read_manifest(path)
    except Exception as exc:  # noqa: BLE001 - StoreError, or whatever zarr / parquet raise on a damaged store
        raise StoreError(f"store {name!r}: {exc}") from None
    if info.size % 32:
        raise ConfigError(f"store {name!r} ({path}) has {info.size} px images; the U-Net needs a multiple of 32 (rebuild with --size)")


def _plan_training(config: TrainConfig, plan: StagePlan, stages: Sequence[str]) -> None:
    stage, weights = plan.stage, config.stage_stores(plan.stage)
    if not weights:
        raise ConfigError(f"{stage}.stores gives every store weight 0; nothing to train on")
    sizes = {n: open_store(config.stores[n])[1].size for n in weights}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"{stage}.stores mixes image sizes {sizes}; rebuild the stores at one --size")
    plan.image_size = next(iter(sizes.values()))
    ids = None
    if stage == "finetune" and config.finetune.labeled_ids:  # exactly these records
        ids = read_sample_ids(config.finetune.labeled_ids)
        check_sample_ids({n: config.stores[n] for n in weights}, ids, splits=config.finetune.splits,
                         source=config.finetune.labeled_ids)
    for name in weights:
        path = config.stores[name]
        if stage == "pretrain":
            pc = config.pretrain
            plan.rows[name] = select_rows(path, splits=pc.splits, target=pc.target, exclude_degenerate=pc.exclude_degenerate, seed=config.seed)
            val_kw = {"target": pc.target, "exclude_degenerate": pc.exclude_degenerate}
        else:
            fc = config.finetune
            seed = config.seed if fc.subset_seed is None else fc.subset_seed
            plan.rows[name] = select_rows(path, splits=fc.splits, target="label", exclude_degenerate=False, require_label=True,
                                          label_fraction=fc.label_fraction, label_count=fc.label_count, sample_ids=ids,
                                          seed=seed)
            val_kw = {"target": "label", "exclude_degenerate": False, "require_label": True}
        if "val" not in getattr(config, stage).splits:
            with contextlib.suppress(StoreError):  # no val records in this store: best.pt uses the others (or none)
                plan.val_rows[name] = select_rows(path, splits=["val"], seed=config.seed, **val_kw)
    if stage == "pretrain":
        return
    _plan_pseudo_pool(config, plan)
    fc = config.finetune
    plan.init = fc.init
    if fc.init == "scratch":
        return
    made_here = "pretrain" in stages and fc.pretrained is None
    if made_here:
        plan.source = Path(config.out_dir) / "pretrain" / "final.pt"
        if plan.init == "auto":
            plan.init = config.pretrain.mode
    else:
        try:
            plan.source = ckpt_mod.resolve(fc.pretrained or config.out_dir, "pretrain")
        except ConfigError as exc:
            raise ConfigError(
                f"finetune.init={fc.init} needs a pretrain checkpoint: {exc}. Run the pretrain stage first, "
                "set finetune.pretrained=PATH (a .pt file or another run's folder), or finetune.init=scratch"
            ) from None
        ck = ckpt_mod.load(plan.source)
        check_compatible(ck["model_args"], model_args(config.model), what=f"pretrained checkpoint {plan.source}",
                         parts="encoder" if plan.init == "encoder_only" else "all")
        plan.init = ck.get("mode", "end_to_end") if plan.init == "auto" else plan.init
    mode = config.pretrain.mode if made_here else ck.get("mode", "end_to_end")
    if plan.init == "end_to_end" and mode == "encoder_only":
        raise ConfigError(
            f"finetune.init=end_to_end but the pretrain run ({plan.source}) used pretrain.mode=encoder_only: "
            "only its encoder is meant to be carried. Set finetune.init=encoder_only (or auto)"
        )


def _plan_pseudo_pool(config: TrainConfig, plan: StagePlan) -> None:
    """A joint fine-tune's pool rows: the pretraining's records (its splits, target, QC filter), labels unused."""
    pc, pool = config.pretrain, config.pseudo_pool()
    if not pool:
        if config.finetune.pseudo_weight > 0:
            raise ConfigError("finetune.pseudo_weight > 0 fits pool images to their pseudo-masks, but pretrain.stores gives "
                              "every store weight 0: give the pool stores a weight, or set finetune.pseudo_weight=0")
        return
    sizes = {n: open_store(config.stores[n])[1].size for n in pool}
    if set(sizes.values()) != {plan.image_size}:
        raise ConfigError(f"finetune.pseudo_weight: the pool stores' image sizes {sizes} differ from the fine-tune's "
                          f"({plan.image_size} px); rebuild them at one --size")
    if is_soft_target([config.stores[n] for n in pool], pc.target):
        raise ConfigError(f"finetune.pseudo_weight: pretrain.target {pc.target} holds soft (probability) labels; a joint "
                          "fine-tune fits binary pseudo-masks: use pretrain.target=pseudo_mask or a hard selftrain round")
    for name in pool:
        plan.pseudo_rows[name] = select_rows(config.stores[name], splits=pc.splits, target=pc.target,
                                             exclude_degenerate=pc.exclude_degenerate, seed=config.seed)


def eval_choice(config: TrainConfig, plans: Sequence[StagePlan]) -> str:
    """``evaluate.checkpoint`` with ``auto`` resolved: finetune's best.pt where the fine-tune validates on labeled val
    records (this run's finetune plan, or a best.pt a finished one left), else its final.pt."""
    choice = config.evaluate.checkpoint
    if choice != "auto":
        return choice
    ft = next((p for p in plans if p.stage == "finetune"), None)
    if ft is not None:
        return "best" if ft.val_rows else "finetune"
    return "best" if (Path(config.out_dir) / "finetune" / "best.pt").is_file() else "finetune"


def _eval_checkpoint(config: TrainConfig, stages: Sequence[str], digests: dict[str, dict[str, str]], allow_changed: bool,
                     plans: Sequence[StagePlan] = ()) -> Path:
    """The checkpoint evaluate scores (checked now unless a stage of this run makes it)."""
    choice = eval_choice(config, plans)
    named = {"pretrain": ("pretrain", "final.pt"), "finetune": ("finetune", "final.pt"), "best": ("finetune", "best.pt")}
    if choice in named:
        stage, fname = named[choice]
        path = Path(config.out_dir) / stage / fname
        if stage in stages:
            return path
        if not path.is_file():
            raise ConfigError(f"evaluate.checkpoint={choice} needs {path}, which does not exist; run the {stage} stage first"
                              + (" (best.pt needs val records)" if choice == "best" else ""))
    else:
        path = ckpt_mod.resolve(choice, "finetune")
    ck = ckpt_mod.load(path)
    check_compatible(ck["model_args"], model_args(config.model), what=f"checkpoint {path}")
    ckpt_mod.check_stores(ck, digests, where=str(path), allow_changed=allow_changed)  # its splits may have moved
    return path


def _check_existing(config: TrainConfig, plan: StagePlan, digests: dict[str, dict[str, str]], allow_changed: bool) -> None:
    """Skip a finished stage, resume an interrupted one, refuse one made with another config."""
    section = stage_section(config, plan.stage)
    done = plan.dir / DONE
    hint = "use --restart to redo it, or another out_dir"
    if done.exists():
        marker = read_json(done)
        changed = list(configio.diff(marker.get("section"), section))
        if plan.stage == "evaluate":
            plan.skip = not changed and ckpt_mod.same_file(marker.get("checkpoint"), plan.source)
            return  # evaluate is cheap: a changed config or checkpoint just runs it again
        if changed:
            raise ConfigError(f"{plan.stage} in {plan.dir} finished with a different config ({', '.join(changed)}); {hint}")
        if plan.stage == "finetune" and not ckpt_mod.same_file(marker.get("source_id"), plan.source):
            raise ConfigError(f"the pretrain checkpoint {plan.source} changed since finetune in {plan.dir} finished from it; {hint}")
        plan.skip = True
        return
    if plan.stage == "evaluate":
        return
    found = ckpt_mod.load_resume(plan.dir)  # last.pt, or last.prev.pt when last.pt is torn
    if found is None:
        return
    ck, last = found
    changed = list(configio.diff(ck.get("section"), section))
    if changed:
        raise ConfigError(f"{last} was written with a different config ({', '.join(changed)}); {hint}")
    ckpt_mod.check_stores(ck, digests, where=str(last), allow_changed=allow_changed)
    rt = config.runtime
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (ck.get("num_workers"), ck.get("world_size")) != (rt.num_workers, world):
        raise ConfigError(
            f"{last} was written with runtime.num_workers={ck.get('num_workers')} and {ck.get('world_size')} process(es); "
            f"an exact resume needs the same (now {rt.num_workers} and {world}); {hint}"
        )
    plan.resume = ck


def _stage_metrics(folder: Path) -> dict[str, Any] | None:
    for name in ("metrics.json", DONE):
        if (folder / name).exists():
            data = read_json(folder / name)
            return data if name == "metrics.json" else data.get("metrics")
    return None


def _clear(folder: Path) -> None:
    for name in STAGE_FILES:
        (folder / name).unlink(missing_ok=True)
    for sub in ("overlays", "tb"):
        shutil.rmtree(folder / sub, ignore_errors=True)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
