"""``medsass-train``: thin click commands over :mod:`medsass.trainer.run`.

Nothing heavy is imported at module level (torch and smp load inside the commands), so
``medsass-train --help`` answers at once. Errors a user can fix print one line and exit 2.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

STAGE_NAMES = ("pretrain", "finetune", "evaluate")

_config_arg = click.argument("config", metavar="CONFIG")
_set_opt = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override a config value, e.g. --set pretrain.steps=200 (repeatable).")
_restart_opt = click.option("--restart", is_flag=True, help="Redo the stages from scratch (discard their checkpoints and done markers).")
_changed_opt = click.option("--allow-changed-store", is_flag=True,
                            help="Resume even though a store's manifest changed since the checkpoint was written.")


class UsageError(click.ClickException):
    exit_code = 2


def _fail(exc: BaseException) -> UsageError:
    return UsageError(str(exc).strip() or type(exc).__name__)


def _load(config: str, overrides: Sequence[str]):
    from medsass.trainer.config import load_config

    return load_config(config, overrides)


def _run(config: str, overrides: Sequence[str], stages: Sequence[str] | None, restart: bool, allow_changed_store: bool) -> None:
    from medsass.errors import MedsassError

    try:
        from medsass.trainer.distributed import teardown
        from medsass.trainer.run import run_stages

        cfg = _load(config, overrides)
        try:
            results = run_stages(cfg, stages, restart=restart, allow_changed_store=allow_changed_store)
        finally:
            teardown()
    except (MedsassError, FloatingPointError) as exc:
        raise _fail(exc) from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return
    for name, res in results.items():
        click.echo(f"{name}: {res.status} ({res.dir})", err=True)
    if "evaluate" in results and results["evaluate"].metrics:
        for split, m in results["evaluate"].metrics.items():
            floor = m.get("otsu_floor", {}).get("iou")
            click.echo(f"{split}: iou={m['iou']:.4f} dice={m['dice']:.4f} n={m['n']}" + (f" otsu_floor_iou={floor:.4f}" if floor is not None else ""))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medsass")
def main() -> None:
    """Pretrain a U-Net on Otsu pseudo-masks, fine-tune it on few labels, evaluate IoU.

    CONFIG is a YAML file (or the name of an example in trainer/configs/, e.g. cpu_small).
    Stages write into the config's out_dir: pretrain/, finetune/, evaluate/.
    """


@main.command("run")
@_config_arg
@_set_opt
@click.option("--stages", default=None, metavar="LIST", help="Comma-separated stages to run (default: the config's `stages`).")
@_restart_opt
@_changed_opt
def run_cmd(config: str, overrides: tuple[str, ...], stages: str | None, restart: bool, allow_changed_store: bool) -> None:
    """Run the stages CONFIG lists (pretrain, finetune, evaluate), in order."""
    names = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    bad = [s for s in names or [] if s not in STAGE_NAMES]
    if bad:
        raise UsageError(f"unknown stage(s) {bad} in --stages; stages are {', '.join(STAGE_NAMES)}")
    _run(config, overrides, names, restart, allow_changed_store)


def _stage_command(stage: str, doc: str) -> None:
    @main.command(stage, help=doc)
    @_config_arg
    @_set_opt
    @_restart_opt
    @_changed_opt
    def cmd(config: str, overrides: tuple[str, ...], restart: bool, allow_changed_store: bool) -> None:
        _run(config, overrides, [stage], restart, allow_changed_store)


_stage_command("pretrain", "Pretrain the whole U-Net on the stores' pseudo-masks.")
_stage_command("finetune", "Fine-tune on real labels (a label_fraction / label_count subset).")
_stage_command("evaluate", "Score a checkpoint: IoU/Dice, the Otsu floor, per-image CSV, overlays.")


@main.command("arms")
@_config_arg
@_set_opt
@click.option("--arms", "arms", default="scratch,encoder_only,end_to_end", show_default=True, help="Fine-tune inits to compare.")
@_restart_opt
@_changed_opt
def arms_cmd(config: str, overrides: tuple[str, ...], arms: str, restart: bool, allow_changed_store: bool) -> None:
    """One pretrain run, then finetune + evaluate per arm into OUT/arms/<arm>/."""
    from medsass.errors import MedsassError

    try:
        from medsass.trainer.run import run_arms

        results = run_arms(_load(config, overrides), [a.strip() for a in arms.split(",") if a.strip()],
                           restart=restart, allow_changed_store=allow_changed_store)
    except (MedsassError, FloatingPointError) as exc:
        raise _fail(exc) from None
    for arm, metrics in results.items():
        click.echo(f"{arm}: " + ", ".join(f"{split} iou={m['iou']:.4f}" for split, m in (metrics or {}).items()))


@main.command("demo")
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--workers", default=2, show_default=True, help="Dask workers for the prep step.")
def demo_cmd(out: str, workers: int) -> None:
    """Whole method on the bundled CC0 sample (CPU, minutes): prep -> pretrain -> finetune -> evaluate."""
    from medsass.errors import MedsassError

    try:
        from medsass.trainer.demo import run_demo

        metrics = run_demo(out, workers=workers)
    except (MedsassError, FloatingPointError) as exc:
        raise _fail(exc) from None
    for split, m in metrics.items():
        floor = m.get("otsu_floor", {})
        click.echo(f"{split}: IoU {m['iou']:.3f} (per image {m['iou_per_image_mean']:.3f}), Dice {m['dice']:.3f}, n={m['n']}; "
                   f"Otsu pseudo-mask floor IoU {floor.get('iou', float('nan')):.3f}")
    click.echo(f"store: {out}/sample.zarr   run: {out}/run   (metrics.json, per_image.csv, overlays/ under {out}/run/evaluate)")


@main.command("show-config")
@_config_arg
@_set_opt
def show_config(config: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved config (base files merged, overrides applied, defaults filled)."""
    from medsass import configio
    from medsass.errors import MedsassError

    try:
        click.echo(configio.dump_yaml(_load(config, overrides)), nl=False)
    except MedsassError as exc:
        raise _fail(exc) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
