"""``medsass-prep``: thin click commands over the library (heavy imports happen inside commands)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from medsass.errors import MedsassError

from .methods import BUILD_POLARITIES, METHODS, unknown_method

EPILOG = """Exit codes: 0 all inputs stored or skipped on purpose; 3 some inputs failed (see the manifest /
`medsass-prep inspect`); 2 bad usage or configuration; 1 unexpected error."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medsass")
def main() -> None:
    """Prep stage of medsass: raw DICOM/TIFF/PNG/JPEG/NIfTI -> sharded Zarr store with Otsu pseudo-masks + manifest."""


def _split_spec(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise click.BadParameter(f"{part!r}: use e.g. val=0.1,test=0.2")
        k, v = part.split("=", 1)
        if k not in ("val", "test"):
            raise click.BadParameter(f"{k!r}: only val and test fractions are set (train is the rest)")
        try:
            out[k] = float(v)
        except ValueError:
            raise click.BadParameter(f"{part!r}: {v!r} is not a number") from None
    return out


class MethodChoice(click.Choice):
    """``--method``: a name from the one registry (methods.METHODS); a wrong name gets prep's own message."""

    def __init__(self) -> None:
        super().__init__(METHODS)

    def convert(self, value, param, ctx):
        if value not in self.choices:
            self.fail(unknown_method(value), param, ctx)
        return value


@main.command("build-masks", epilog=EPILOG)
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("--out", "-o", type=click.Path(), help="Output store (a folder, e.g. data.zarr).")
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False), help="Dataset file (data_manifests/NAME.yaml) instead of flags.")
@click.option("--labels", type=click.Path(), help="Folder of real masks for fine-tuning/evaluation.")
@click.option("--label-pattern", help="Mask file name template, e.g. '{stem}_segmentation.png' (default: same stem, any extension); "
              "nnunet: imagesTr/case_0000.nii.gz pairs with labelsTr/case.nii.gz.")
@click.option("--stem-regex", help="Regex with named groups matched on the image stem, usable in --label-pattern.")
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False), help="CSV with columns image,mask (instead of --labels).")
@click.option("--size", type=int, help="Stored images are SIZE x SIZE [256].")
@click.option("--resize", type=click.Choice(["stretch", "pad"]), help="stretch, or pad to keep the aspect ratio [stretch].")
@click.option("--tile/--no-tile", default=None, help="Cut native-resolution SIZE x SIZE tiles instead of resizing.")
@click.option("--tile-overlap", type=int, help="Overlap of neighbouring tiles in pixels [0].")
@click.option("--method", type=MethodChoice(), help="Pseudo-mask threshold [fov_otsu_hull: Otsu inside the field of view, "
              "objects filled to their convex hull]; otsu is the paper's plain per-image Otsu (docs/pseudo_masks.md).")
@click.option("--polarity", type=click.Choice(BUILD_POLARITIES), help="Which side is foreground [store: one side for the "
              "whole store, the majority of the per-image auto decisions, minority images flagged; a mixed vote (several "
              "modalities) keeps per-image sides]; auto: per image; bright|dark: forced (docs/pseudo_masks.md).")
@click.option("--intensity", type=click.Choice(["percentile", "minmax"]), help="How non-8-bit images map to uint8 [percentile].")
@click.option("--window", help="NIfTI volumes: intensity window before Otsu and uint8, one per volume: lung, soft-tissue, bone, "
              "C/W in HU (e.g. 40/400) for CT; percentile (the volume's 0.5-99.5th) for MR [none: as --intensity, per slice].")
@click.option("--slice-axis", type=click.Choice(["axial", "coronal", "sagittal"]), help="NIfTI volumes: one record per slice "
              "across this axis, after reorientation to RAS+ [axial].")
@click.option("--split", "split_spec", help="Fractions, e.g. val=0.1,test=0.2 (train is the rest).")
@click.option("--seed", type=int, help="Split seed [0].")
@click.option("--group-by", help="Split groups: file, dir or regex:<pattern> (DICOM PatientID, hashed, wins) [file].")
@click.option("--groups", "groups_csv", type=click.Path(exists=True, dir_okay=False), help="CSV mapping file name -> group (e.g. patient).")
@click.option("--split-unlabeled/--no-split-unlabeled", default=None, help="When some inputs have labels, also split the groups without any (default: they all go to train; "
              "a store built without labels is always split).")
@click.option("--workers", type=int, help="Local Dask workers [one per core].")
@click.option("--scheduler", help="Address of an existing Dask scheduler (e.g. tcp://host:8786).")
@click.option("--shard-records", type=int, help="Maximum records per shard [256].")
@click.option("--max-pixels", type=int, help="Refuse files with more pixels than this (decompression bombs) [268435456].")
@click.option("--salt", envvar="MEDSASS_SALT", help="Salt for hashing DICOM PatientID [random, kept in the store]; env MEDSASS_SALT. "
              "On the command line it shows in `ps` to every user of the machine: prefer --salt-file or the variable.")
@click.option("--salt-file", type=click.Path(exists=True, dir_okay=False), help="Read the salt from this file (keep it mode 0600).")
@click.option("--overwrite", is_flag=True, help="Rebuild an existing store from scratch.")
@click.option("--retry-failed", is_flag=True, help="Retry only the inputs that failed before.")
@click.option("--strict", is_flag=True, help="Stop at the first failed input.")
@click.option("--no-progress", is_flag=True, help="No progress bars, and no dashboard for the local Dask cluster (batch jobs).")
@click.option("--dashboard-address", metavar="HOST:PORT", help="Where the local Dask cluster's dashboard listens [127.0.0.1:0: "
              "this machine only, a free port; reach it by SSH tunnel]; env MEDSASS_DASHBOARD_ADDRESS.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any dataset-file key, e.g. geometry.size=128.")
def build_masks(inputs, out, dataset, labels, label_pattern, stem_regex, pairs, size, resize, tile, tile_overlap, method,
                polarity, intensity, window, slice_axis, split_spec, seed, group_by, groups_csv, split_unlabeled, workers, scheduler,
                shard_records, max_pixels, salt, salt_file, overwrite, retry_failed, strict, no_progress, dashboard_address,
                overrides):
    """Build a store from INPUT files/folders (recursive; formats detected by content)."""
    salt = _salt_option(salt, salt_file)
    label_opts = {"dir": labels, "pattern": label_pattern, "stem_regex": stem_regex, "pairs": pairs}
    flag_map = {
        "out": out, "geometry.size": size, "geometry.resize": resize, "geometry.tile": tile,
        "geometry.tile_overlap": tile_overlap, "geometry.max_pixels": max_pixels, "threshold.method": method,
        "threshold.polarity": polarity, "threshold.intensity": intensity, "threshold.window": window,
        "geometry.slice_axis": slice_axis, "split.seed": seed, "split.group_by": group_by,
        "split.groups_csv": groups_csv, "split.split_unlabeled": split_unlabeled, "runtime.workers": workers,
        "runtime.scheduler": scheduler, "runtime.shard_records": shard_records, "runtime.salt": salt,
        "runtime.strict": strict or None, "runtime.progress": False if no_progress else None,
        "runtime.dashboard_address": dashboard_address,
    }
    if split_spec:
        for k, v in _split_spec(split_spec).items():
            flag_map[f"split.{k}"] = v
    _run(lambda: _build(inputs, dataset, label_opts, flag_map, list(overrides), overwrite, retry_failed))


def _salt_option(salt: str | None, salt_file: str | None) -> str | None:
    """The salt from --salt-file, else --salt / $MEDSASS_SALT. --salt-file beats the variable, not the flag."""
    if salt_file is None:
        return salt
    source = click.get_current_context().get_parameter_source("salt")
    if salt is not None and source == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("give --salt or --salt-file, not both")
    try:
        text = Path(salt_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {salt_file} as UTF-8 text ({exc})", param_hint="--salt-file") from None
    if not text:
        raise click.BadParameter(f"{salt_file} is empty; write the salt into it", param_hint="--salt-file")
    return text


def _build(inputs, dataset, label_opts, flag_map, sets, overwrite, retry_failed) -> int:
    from .config import IncompleteCommand, command_line_config

    try:
        cfg = command_line_config(inputs=inputs, dataset=dataset, labels=label_opts, flags=flag_map, overrides=sets)
    except IncompleteCommand as exc:
        raise click.UsageError(str(exc)) from None
    if not cfg.runtime.scheduler:  # the local workers' fork server imports its modules while this process does
        from .parallel import start_worker_server

        start_worker_server()
    from .build import build
    from .inspect_store import format_report, inspect_store

    result = build(cfg, overwrite=overwrite, retry_failed=retry_failed)
    click.echo(format_report(inspect_store(result.store), max_list=10))
    if result.counts.get("failed"):
        click.echo(f"{result.counts['failed']} input record(s) failed; exit code {result.exit_code}. "
                   "Fix or remove them and re-run with --retry-failed.", err=True)
    return result.exit_code


@main.command("inspect")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_cmd(store, as_json):
    """Counts by status and split, QC flags, foreground fractions and failures of STORE."""

    def go() -> int:
        from .inspect_store import format_report, inspect_store

        rep = inspect_store(store)
        click.echo(json.dumps(rep, indent=2) if as_json else format_report(rep))
        return 0

    _run(go)


@main.command("report")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="HTML file to write, e.g. report.html.")
@click.option("--n-samples", default=24, show_default=True, help="Thumbnails of randomly chosen records.")
@click.option("--seed", default=0, show_default=True, help="Seed of the thumbnail sample.")
def report_cmd(store, out, n_samples, seed):
    """One self-contained HTML page of STORE: counts, failures, QC, thumbnails with outlines, Otsu-vs-label IoU."""

    def go() -> int:
        from .report import write_store_report

        click.echo(str(write_store_report(store, out, n_samples=n_samples, seed=seed)))
        return 0

    _run(go)


@main.command("add-labels", epilog="""Exit codes: 0 every mask found was stored (or was already); 3 some masks were
rejected (listed, and in STORE/_medsass/add_labels/report.json); 2 bad usage, or an unfinished add-labels of other
masks is pending; 1 unexpected error. Interrupted? Run the same command again: it resumes.""")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--labels", type=click.Path(exists=True, file_okay=False), help="Folder of new or corrected masks (searched recursively).")
@click.option("--label-pattern", help="Mask file name template, e.g. '{stem}_mask.png' (default: same stem, any extension).")
@click.option("--stem-regex", help="Regex with named groups matched on the image stem, usable in --label-pattern.")
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False),
              help="CSV with columns image,mask (instead of --labels); image is a path relative to the CSV, a sample_id or a source_rel.")
def add_labels_cmd(store, labels, label_pattern, stem_regex, pairs):
    """Write new or corrected real masks into the label array of STORE, in place.

    Masks pair with records as in build-masks; only the shards holding them are rewritten, the manifest is updated
    at the end in one atomic step (has_label, label_source, label_status, label_revision)."""

    def go() -> int:
        from .add_labels import add_labels, format_summary

        result = add_labels(store, labels_dir=labels, pattern=label_pattern, stem_regex=stem_regex, pairs=pairs)
        click.echo(format_summary(result))
        return result.exit_code

    _run(go)


@main.command("share", epilog="Exit codes: 0 written; 2 bad usage, a store that is not finished, or OUT taken; 1 unexpected error.")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())
@click.option("--salt", envvar="MEDSASS_SALT", help="The store's salt, only if it was built with one (it then keeps none); "
              "env MEDSASS_SALT. Prefer --salt-file: the command line shows in `ps`.")
@click.option("--salt-file", type=click.Path(exists=True, dir_okay=False), help="Read that salt from this file.")
@click.option("--overwrite", is_flag=True, help="Replace OUT when it holds an earlier shared copy.")
def share_cmd(store, out, salt, salt_file, overwrite):
    """Write a copy of STORE to OUT that carries no path, file name, DICOM identifier or salt.

    Sample ids become opaque (the same on every re-share); the mapping back stays in STORE/_medsass/share/ (mode
    0600). Pixels are copied as they are: text burned into the images is NOT removed. See data_manifests/SCHEMA.md."""
    salt = _salt_option(salt, salt_file)

    def go() -> int:
        from .share import format_summary, share_store

        click.echo(format_summary(share_store(store, out, salt=salt, overwrite=overwrite)))
        return 0

    _run(go)


def _run(fn) -> None:
    try:
        code = fn()
    except MedsassError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)
    sys.exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
