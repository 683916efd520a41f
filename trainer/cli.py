"""``medsass-train``: thin click commands over :mod:`medsass.trainer.run`.

Nothing heavy is imported at module level (torch and smp load inside the commands), so
``medsass-train --help`` answers at once. Errors a user can fix print one line and exit 2.
"""
from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from contextlib import contextmanager

import click

from medsass.errors import MedsassError

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


def _leave_on_error(exc: BaseException) -> BaseException:
    """Under torchrun (world size > 1): report ``exc`` as the command would (a usage error's message and exit code,
    else the traceback and 1) and leave without interpreter finalization, which can abort a process that ran
    collectives (:func:`medsass.trainer.distributed.leave`), so torchrun sees the command's exit code and not a
    SIGABRT. Alone: return ``exc`` for the caller to raise."""
    from medsass.trainer.distributed import in_torchrun, leave

    if not in_torchrun():
        return exc
    if isinstance(exc, click.ClickException):
        exc.show()
        leave(exc.exit_code)
    traceback.print_exception(exc)
    leave(1)
    return exc  # not reached


@contextmanager
def _training_command():
    """Around a training command's work: a config or data error becomes a one-line usage error (exit 2); a pre-empt's
    SystemExit (exit code 75 asks the batch job for a requeue) keeps its code; under torchrun every one of these, and
    any other exception, leaves without interpreter finalization (:func:`_leave_on_error`)."""
    from medsass.trainer.distributed import leave

    try:
        yield
    except (MedsassError, FloatingPointError) as exc:
        raise _leave_on_error(_fail(exc)) from None
    except SystemExit as exc:
        leave(exc.code if isinstance(exc.code, int) else 1)
        raise
    except Exception as exc:
        _leave_on_error(exc)
        raise


def _load(config: str, overrides: Sequence[str]):
    from medsass.trainer.config import load_config

    return load_config(config, overrides)


def _run(config: str, overrides: Sequence[str], stages: Sequence[str] | None, restart: bool, allow_changed_store: bool) -> None:
    with _training_command():
        from medsass.trainer.distributed import leave, teardown
        from medsass.trainer.run import run_stages

        cfg = _load(config, overrides)
        try:
            results = run_stages(cfg, stages, restart=restart, allow_changed_store=allow_changed_store)
        finally:
            teardown()
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        _report_run(results)
    leave(0)  # under torchrun: exit without interpreter finalization (distributed.leave says why)


def _report_run(results) -> None:
    for name, res in results.items():
        click.echo(f"{name}: {res.status} ({res.dir})", err=True)
    if "evaluate" in results and results["evaluate"].metrics:
        for split, m in results["evaluate"].metrics.items():
            floor = m.get("otsu_floor", {}).get("iou")
            click.echo(f"{split}: iou={m['iou']:.4f} dice={m['dice']:.4f} n={m['n']}" + (f" otsu_floor_iou={floor:.4f}" if floor is not None else ""))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medsass")
def main() -> None:
    """Pretrain a U-Net on threshold pseudo-masks, fine-tune it on few labels, evaluate IoU.

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
_stage_command("evaluate", "Score a checkpoint: IoU/Dice, the pseudo-mask floor, per-image CSV, overlays.")


@main.command("arms")
@_config_arg
@_set_opt
@click.option("--arms", "arms", default="scratch,encoder_only,end_to_end", show_default=True, help="Fine-tune inits to compare.")
@_restart_opt
@_changed_opt
def arms_cmd(config: str, overrides: tuple[str, ...], arms: str, restart: bool, allow_changed_store: bool) -> None:
    """One pretrain run, then finetune + evaluate per arm into OUT/arms/<arm>/."""
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
@_set_opt
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo_cmd(out: str, workers: int, overrides: tuple[str, ...], no_progress: bool) -> None:
    """Whole method on the bundled CC0 sample (CPU, minutes): prep -> pretrain -> finetune -> evaluate.

    --set changes the demo's training config (trainer/demo.py), e.g. --set pretrain.steps=20 for a quicker run."""
    try:
        from medsass.trainer.demo import run_demo

        metrics = run_demo(out, workers=workers, progress=not no_progress, overrides=overrides)
    except (MedsassError, FloatingPointError) as exc:
        raise _fail(exc) from None
    for split, m in metrics.items():
        floor = m.get("otsu_floor", {})
        click.echo(f"{split}: IoU {m['iou']:.3f} (per image {m['iou_per_image_mean']:.3f}), Dice {m['dice']:.3f}, n={m['n']}; "
                   f"pseudo-mask floor IoU {floor.get('iou', float('nan')):.3f}")
    click.echo(f"store: {out}/sample.zarr   run: {out}/run   (metrics.json, per_image.csv, overlays/ under {out}/run/evaluate)")


@main.command("study")
@click.argument("study_file", metavar="STUDY")
@_set_opt
@click.option("--datasets", default="", metavar="LIST", help="Comma-separated dataset names (default: all of the study's).")
@click.option("--seeds", default="", metavar="LIST", help="Comma-separated seeds (default: the study's).")
@click.option("--arms", default="", metavar="LIST", help="Only these fine-tune arms (and the pretraining they need).")
@click.option("--budgets", default="", metavar="LIST", help="Only these label budgets of the study (e.g. 1,5,100%).")
@click.option("--targets", default="", metavar="LIST", help="Only these pseudo-mask targets (e.g. fov_otsu_hull,otsu,fov_otsu_hull+sites).")
@click.option("--strategies", default="", metavar="LIST",
              help="Only fine-tune runs whose labels were picked this way (random = the main comparison; diverse, ...).")
@click.option("--recipes", default="", metavar="LIST",
              help="Only fine-tune runs of these recipes of the study (none = the arms as the grid runs them).")
@click.option("--max-runs", type=click.IntRange(min=1), default=None, help="Stop after this many runs of the grid (in run order).")
@click.option("--dry-run", is_flag=True, help="List the runs (done / todo) and train nothing.")
@click.option("--report-only", is_flag=True, help="Write the tables and plots from the ledger; train nothing.")
@click.option("--adopt-reruns", is_flag=True,
              help="A pretraining rerun (its checkpoint was gone) that does not reproduce its ledger line becomes a new "
                   "start for the runs still to do, under new keys, instead of failing them; the ledger's runs keep theirs.")
@click.option("--compact-ledger", is_flag=True,
              help="Rewrite the ledger with its repeated lists (split ids, floor counts, labeled ids) stored once: "
                   "the scale study's went from 5.50 MB to 1.27 MB; every run line is kept. Trains nothing.")
def study_cmd(study_file: str, overrides: tuple[str, ...], datasets: str, seeds: str, arms: str, budgets: str, targets: str,
              strategies: str, recipes: str, max_runs: int | None,
              dry_run: bool, report_only: bool, adopt_reruns: bool, compact_ledger: bool) -> None:
    """Run a label-efficiency study (STUDY: a study YAML); resumable. For your own data start from a copy of
    benchmarks/studies/my_data.yaml (scratch against the default recipe); the scale study is scale_cpu.yaml.

    Every finished run is one line of RESULTS_DIR/results.jsonl; re-running skips those and resumes the
    interrupted one. Writes results.csv, table.md and one plot per dataset to the study's results_dir.
    """

    def split(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    try:
        from medsass.trainer.study.runner import compact_ledger as compact, run_study

        if compact_ledger:
            compact(study_file, overrides, log=lambda m: click.echo(m, err=True))
            return
        outcome = run_study(study_file, overrides, datasets=split(datasets), seeds=[int(s) for s in split(seeds)] or None,
                            arms=split(arms), budgets=split(budgets), targets=split(targets),
                            strategies=split(strategies), recipes=split(recipes), max_runs=max_runs, dry_run=dry_run,
                            report_only=report_only, adopt=adopt_reruns,
                            log=lambda m: click.echo(m, err=True))
    except (MedsassError, ValueError) as exc:
        raise _fail(exc) from None
    if outcome.failed:
        click.echo(f"{len(outcome.failed)} run(s) failed; see the log above", err=True)
        sys.exit(3)


@main.command("show-config")
@_config_arg
@_set_opt
def show_config(config: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved config (base files merged, overrides applied, defaults filled)."""
    from medsass import configio

    try:
        click.echo(configio.dump_yaml(_load(config, overrides)), nl=False)
    except MedsassError as exc:
        raise _fail(exc) from None



@main.command("predict")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output folder (masks mirror the inputs' relative paths).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--batch-size", default=16, show_default=True, help="Canvases per forward pass.")
@click.option("--threshold", default=0.5, show_default=True, help="On sigmoid probabilities.")
@click.option("--probabilities", is_flag=True, help="Also write float32 probability maps (<name>_prob.tif; .nii.gz for NIfTI inputs).")
@click.option("--store", default=None, metavar="NAME", help="Whose prep parameters to repeat, when the checkpoint's stores differ.")
@click.option("--format", "output_format", default="png", show_default=True, type=click.Choice(["png", "dicom-seg"]),
              help="png: PNG (multi-page TIFF for multi-frame inputs). dicom-seg: a DICOM SEG per series of DICOM inputs "
                   "(<first input>_seg.dcm; other inputs stay PNG/TIFF, noted in the CSV).")
@click.option("--segment-label", default="foreground", show_default=True, help="dicom-seg: the segment's label.")
@click.option("--segment-type", default="SCT:85756007:Tissue", show_default=True, metavar="SCHEME:VALUE:MEANING",
              help="dicom-seg: the segment's coded property type, e.g. SCT:10200004:Liver.")
@click.option("--segment-category", default="SCT:85756007:Tissue", show_default=True, metavar="SCHEME:VALUE:MEANING",
              help="dicom-seg: the segment's coded property category, e.g. SCT:123037004:Anatomical Structure.")
def predict_cmd(checkpoint: str, inputs: tuple[str, ...], out: str, device: str, batch_size: int, threshold: float,
                probabilities: bool, store: str | None, output_format: str, segment_label: str, segment_type: str,
                segment_category: str) -> None:
    """Masks for raw files/folders INPUTS with CHECKPOINT (a .pt file, or a run folder: the fine-tuned checkpoint
    its evaluate scored, best.pt or final.pt).

    Inputs are prepared exactly as the training store was (read from the checkpoint); masks come back
    at each input's original size: <name>_mask.png, or a multi-page <name>_mask.tif for multi-frame
    inputs, or a <name>_mask.nii.gz label volume on a NIfTI input's voxel grid, plus OUT/predictions.csv.
    Exit 3 when some inputs failed (listed on stderr and in the CSV).
    """
    try:
        from medsass.trainer import dicom_seg
        from medsass.trainer.predict import CSV_NAME, predict

        segment = dicom_seg.SegmentSpec(segment_label, dicom_seg.parse_code(segment_category, option="--segment-category"),
                                        dicom_seg.parse_code(segment_type, option="--segment-type"))
        rows = predict(checkpoint, inputs, out, device=device, batch_size=batch_size, threshold=threshold,
                       probabilities=probabilities, store=store, output_format=output_format, segment=segment)
    except MedsassError as exc:
        raise _fail(exc) from None
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    click.echo(f"{len(rows)} input(s): {counts['ok']} predicted, {counts['failed']} failed, {counts['skipped']} skipped; "
               f"see {os.path.join(out, CSV_NAME)}", err=True)
    if output_format == "dicom-seg":
        click.echo(dicom_seg.summary(rows), err=True)
    bad = [r for r in rows if r["status"] != "ok"]
    for r in bad[:20]:
        click.echo(f"  {r['status'].upper()} {r['source']}: {r['reason']} [{r['reason_code']}]", err=True)
    if len(bad) > 20:
        click.echo(f"  ... and {len(bad) - 20} more (see the CSV)", err=True)
    if counts["failed"]:
        sys.exit(3)


@main.command("export")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("--format", "fmt", default="onnx", show_default=True, type=click.Choice(["onnx", "torchscript"]),
              help="onnx: model.onnx (opset 18, dynamic batch axis); torchscript: model.torchscript.pt (torch.jit.load).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--threshold", default=0.5, show_default=True, help="On sigmoid probabilities (recorded in the JSON).")
@click.option("--store", default=None, metavar="NAME", help="Whose prep parameters to record, when the checkpoint's stores differ.")
def export_cmd(checkpoint: str, fmt: str, out: str, threshold: float, store: str | None) -> None:
    """Export CHECKPOINT as ONNX or TorchScript, with the preprocessing predict applies.

    CHECKPOINT is a .pt file, or a run folder (the fine-tuned checkpoint its evaluate scored: best.pt or final.pt).
    OUT gets the network and preprocessing.json
    (size, resize mode, intensity scaling, threshold; see trainer/export.py)."""
    try:
        from medsass.trainer.export import JSON_NAME, export

        meta = export(checkpoint, out, fmt=fmt, threshold=threshold, store=store)
    except MedsassError as exc:
        raise _fail(exc) from None
    click.echo(f"{os.path.join(out, meta['file'])} + {os.path.join(out, JSON_NAME)} (max logit difference from the "
               f"checkpoint {meta['check']['max_abs_logit_difference']:.1e})")


@main.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="HTML file [RUN_DIR/report.html].")
def report_cmd(run_dir: str, out: str | None) -> None:
    """One self-contained HTML page of a run: loss/val-IoU curves, metrics with the pseudo-mask floor, overlays, config."""
    try:
        from medsass.trainer.report import write_run_report

        path = write_run_report(run_dir, out)
    except MedsassError as exc:
        raise _fail(exc) from None
    click.echo(str(path))


@main.command("suggest")
@click.argument("run_or_checkpoint", type=click.Path(exists=True))
@click.option("--store", required=True, type=click.Path(exists=True, file_okay=False), help="The store whose unlabeled train records are ranked.")
@click.option("--n", "n", required=True, type=click.IntRange(min=1), help="How many images to pick.")
@click.option("--strategy", default="random", show_default=True, type=click.Choice(["random", "diverse", "uncertain", "hybrid"]),
              help="random (the default: in the scale study no strategy beat it under keep_start); diverse: k-center greedy on the encoder's "
                   "embeddings; uncertain: most disagreement between zero-shot prediction and pseudo-mask; hybrid: diverse among "
                   "the max(4N, 50) most uncertain.")
@click.option("--seed", default=0, show_default=True, help="Seeds the random order and the first k-center pick.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output folder: picks.csv, gallery.html, suggest.json.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch CPU threads [the checkpoint config's runtime.threads].")
@click.option("--include-degenerate", is_flag=True, help="Also rank records whose pseudo-mask failed QC (fg_low / fg_high; never constant images).")
@click.option("--pool", default="unlabeled", show_default=True, type=click.Choice(["unlabeled", "labeled"]),
              help="labeled: rank the labeled train records as if unlabeled (to compare strategies on a labeled set, as the study does).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def suggest_cmd(run_or_checkpoint: str, store: str, n: int, strategy: str, seed: int, out: str, batch_size: int, device: str,
                threads: int | None, include_degenerate: bool, pool: str, no_progress: bool) -> None:
    """Which N unlabeled train images of STORE should an expert label? Ranks them with the pretrained model
    RUN_OR_CHECKPOINT (a .pt, or a run folder: its pretrain/final.pt).

    Candidates: records of the train split without a label whose pseudo-mask passed QC. Writes OUT/picks.csv
    (rank, sample_id, source_rel, strategy, score, reason, ...), OUT/gallery.html (image, pseudo-mask and zero-shot
    prediction per pick) and OUT/suggest.json (parameters, checkpoint). The default strategy is random for now.
    """
    try:
        from medsass.trainer.suggest import suggest

        res = suggest(run_or_checkpoint, store, n, out, strategy=strategy, seed=seed, batch_size=batch_size, device=device,
                      threads=threads, include_degenerate=include_degenerate, progress=not no_progress, pool=pool)
    except MedsassError as exc:
        raise _fail(exc) from None
    click.echo(f"{n} pick(s) of {res['candidates']} candidate(s), strategy {strategy}: {os.path.join(out, 'picks.csv')}, "
               f"{os.path.join(out, 'gallery.html')}")


@main.command("selftrain")
@_config_arg
@_set_opt
@click.option("--rounds", type=click.IntRange(min=1), default=None, help="Re-label + pretrain rounds [selftrain.rounds].")
@click.option("--name", default=None, help="Round r writes pseudo_labels/<NAME>_r<r> [selftrain.name].")
@click.option("--label-only", is_flag=True, help="Only write pseudo_labels/<NAME>_r1 from selftrain.source (e.g. a "
              "fine-tuned RUN/finetune/best.pt, with selftrain.threshold=0.5); train nothing. A joint fine-tune then "
              "fits them: pretrain.target=pseudo_labels/<NAME>_r1 finetune.pseudo_weight=1.")
def selftrain_cmd(config: str, overrides: tuple[str, ...], rounds: int | None, name: str | None, label_only: bool) -> None:
    """Self-training: re-label the train (and val) pool with the pretrained model, pretrain again, N rounds."""
    with _training_command():
        from medsass.trainer.distributed import leave, teardown
        from medsass.trainer.selftrain import run_selftrain

        try:
            result = run_selftrain(_load(config, overrides), rounds=rounds, name=name, label_only=label_only)
        finally:
            teardown()
    if os.environ.get("RANK", "0") == "0":
        _report_selftrain(result)
    leave(0)  # under torchrun: exit without interpreter finalization (distributed.leave says why)


def _report_selftrain(result) -> None:
    for rnd in result["rounds"]:
        parts = []
        for store, res in rnd["stores"].items():
            for split, q in res.items():
                if isinstance(q, dict) and q["n"]:
                    parts.append(f"{store}/{split} pseudo-label IoU {q['iou_per_image_mean']:.3f} (n={q['n']})")
        for split, m in (rnd.get("zero_shot") or {}).items():
            if isinstance(m, dict) and "iou" in m:
                parts.append(f"zero-shot {split} IoU {m['iou']:.3f} (per image {m['iou_per_image_mean']:.3f})")
        click.echo(f"round {rnd['round']} {rnd['target']}: " + "; ".join(parts))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
