"""add-labels: masks into an existing store in place; same bytes as build-masks --labels; only the affected label
shards change; rejections reported, never fatal; resumable after an exception or kill -9 at any step."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner
from medsass.pipeline import add_labels as al
from medsass.pipeline.build import build
from medsass.pipeline.cli import main
from medsass.pipeline.config import BuildConfig, InputSource, LabelSource
from PIL import Image

from medsass import manifest
from medsass.errors import ConfigError, StoreError
from medsass.testing import make_synthetic_store

LABEL_COLS = list(al.LABEL_COLUMNS)


# ----------------------------------------------------------------------------- helpers


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` -> its bytes (the stored shards, compressed, as on disk)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def save_mask(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def random_mask(seed: int, shape=(32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) > 0.6


@pytest.fixture
def syn(tmp_path):
    """A finished 40-record store (shards of 8, no labels) and masks for rows 3, 4 (shard 0) and 20 (shard 2)."""
    path = make_synthetic_store(tmp_path / "s.zarr", n=40, size=32, shard_records=8, labeled_fraction=0.0)
    masks = {r: random_mask(r) for r in (3, 4, 20)}
    for r, m in masks.items():
        save_mask(tmp_path / "masks" / f"{r:05d}.png", m)
    return path, tmp_path / "masks", masks


def run_cli(*args):
    return CliRunner().invoke(main, ["add-labels", *map(str, args)], catch_exceptions=False)


# ----------------------------------------------------------------------------- in place, only affected shards


def test_masks_go_into_the_label_array_in_place_and_nothing_else_changes(syn):
    path, masks_dir, masks = syn
    before = {name: files_of(path / name) for name in ("image", "pseudo_mask", "label")}
    result = run_cli(path, "--labels", masks_dir)
    assert result.exit_code == 0, result.output
    assert "3 label(s) written (3 new, 0 corrected) in 2 shard(s)" in result.output

    g = zarr.open_group(str(path), mode="r")
    lab = g["label"][:]
    for r, m in masks.items():
        assert np.array_equal(lab[r], m.astype(np.uint8))
    assert not np.delete(lab, list(masks), axis=0).any()
    for name in ("image", "pseudo_mask"):  # the bytes on disk, not just the decoded values
        assert files_of(path / name) == before[name], name
    after = files_of(path / "label")
    changed = sorted(k for k in before["label"] if before["label"][k] != after[k])
    assert changed == ["c/0/0/0", "c/2/0/0"]  # one file per shard: only the two shards holding the new masks

    df = manifest.read_manifest(path)
    got = df[df.has_label]
    assert sorted(got.row) == [3, 4, 20]
    assert (got.label_status == "ok").all() and (got.label_revision == 1).all() and (got.label_reason == "").all()
    assert list(got.label_source) == [str(masks_dir / f"{r:05d}.png") for r in (3, 4, 20)]
    assert np.allclose(got.label_fg_fraction, [masks[r].mean() for r in (3, 4, 20)])
    assert (df[~df.has_label].label_revision == 0).all()
    assert manifest.read_summary(path)["n_labeled"] == 3

    report = json.loads((path / "_medsass" / "add_labels" / "report.json").read_text())
    assert report["counts"]["written"] == 3 and report["counts"]["records_without_mask"] == 37
    assert [w["sample_id"] for w in report["written"]] == [f"synthetic/{r:05d}.png" for r in (3, 4, 20)]
    assert not (path / "_medsass" / "add_labels" / "run").exists()  # finished: nothing pending


def test_a_correction_bumps_the_revision_and_a_repeat_changes_nothing(syn):
    path, masks_dir, masks = syn
    al.add_labels(path, labels_dir=str(masks_dir))
    corrected = ~masks[4]
    save_mask(masks_dir / "00004.png", corrected)
    res = al.add_labels(path, labels_dir=str(masks_dir))
    assert res.report["counts"] == {**res.report["counts"], "written": 1, "new": 0, "corrected": 1, "unchanged": 2,
                                    "shards_rewritten": 1}
    assert np.array_equal(zarr.open_group(str(path), mode="r")["label"][4], corrected.astype(np.uint8))
    df = manifest.read_manifest(path).set_index("row")
    assert df.loc[4, "label_revision"] == 2 and df.loc[3, "label_revision"] == df.loc[20, "label_revision"] == 1

    digest, label_files = manifest.manifest_digest(path), files_of(path / "label")
    again = al.add_labels(path, labels_dir=str(masks_dir))
    assert again.report["counts"]["written"] == 0 and again.report["counts"]["unchanged"] == 3
    assert manifest.manifest_digest(path) == digest and files_of(path / "label") == label_files
    history = (path / "_medsass" / "add_labels" / "history.jsonl").read_text().splitlines()
    assert len(history) == 3


def test_rejected_masks_are_reported_with_reasons_and_exit_code_3(syn, tmp_path):
    path, masks_dir, masks = syn
    save_mask(masks_dir / "00005.png", np.ones((10, 12), bool))  # wrong size
    save_mask(masks_dir / "sub" / "99999.png", np.ones((32, 32), bool))  # no such record
    save_mask(masks_dir / "00007.png", np.ones((32, 32), bool))  # two files for one record
    save_mask(masks_dir / "00007.tif", np.ones((32, 32), bool))
    (masks_dir / "00009.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken")  # a PNG that does not decode
    (masks_dir / "README.txt").write_text("masks drawn by Dr X")  # not an image: ignored
    label_before = files_of(path / "label")

    result = run_cli(path, "--labels", masks_dir)
    assert result.exit_code == 3, result.output
    report = json.loads((path / "_medsass" / "add_labels" / "report.json").read_text())
    codes = {Path(r["mask"]).name if r["mask"] else r["sample_id"]: r["code"] for r in report["rejected"]}
    assert codes == {"00005.png": "shape_mismatch", "99999.png": "no_record", "synthetic/00007.png": "ambiguous",
                     "00009.png": "unreadable"}
    assert "mask is 10x12, image is 32x32" in result.output and "[no_record]" in result.output
    assert [Path(i["file"]).name for i in report["ignored"]] == ["README.txt"]
    df = manifest.read_manifest(path)
    assert sorted(df[df.has_label].row) == [3, 4, 20]  # the good ones are stored; nothing for the rejected ones
    assert (df[~df.has_label].label_status == "missing").all()  # untouched manifest rows
    after = files_of(path / "label")
    assert sorted(k for k in after if after[k] != label_before[k]) == ["c/0/0/0", "c/2/0/0"]


def test_pairs_csv_may_name_records_by_sample_id_or_source_rel(syn, tmp_path):
    path, masks_dir, masks = syn
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,mask\nsynthetic/00003.png,masks/00003.png\n00020.png,masks/00020.png\nnope.png,masks/00004.png\n")
    res = al.add_labels(path, pairs=str(csv))
    assert [w["row"] for w in res.report["written"]] == [3, 20]
    assert [(Path(r["mask"]).name, r["code"]) for r in res.report["rejected"]] == [("00004.png", "no_record")]
    assert res.exit_code == 3


def test_usage_errors(syn, tmp_path):
    path, masks_dir, _ = syn
    with pytest.raises(ConfigError, match="exactly one"):
        al.add_labels(path)
    with pytest.raises(ConfigError, match="exactly one"):
        al.add_labels(path, labels_dir=str(masks_dir), pairs=str(tmp_path / "p.csv"))
    result = run_cli(path, "--labels", tmp_path / "nowhere")
    assert result.exit_code == 2
    unfinished = tmp_path / "u.zarr"
    shutil.copytree(path, unfinished)
    (unfinished / "manifest.json").unlink()
    result = run_cli(unfinished, "--labels", masks_dir)
    assert result.exit_code == 2 and "not a finished medsass store" in result.output


def test_manifest_without_the_revision_column_still_reads(tmp_path):
    path = make_synthetic_store(tmp_path / "old.zarr", n=16, size=32, shard_records=8, labeled_fraction=0.5, seed=1)
    table = pq.read_table(path / "manifest.parquet").drop_columns(["label_revision"])
    pq.write_table(table, path / "manifest.parquet")  # as written before the column existed
    df = manifest.read_manifest(path)
    assert (df.label_revision == df.has_label.astype(int)).all()  # a stored label was its first version
    labeled = int(df[df.has_label].row.iloc[0])
    save_mask(tmp_path / "m" / f"{labeled:05d}.png", random_mask(7))
    al.add_labels(path, labels_dir=str(tmp_path / "m"))
    df = manifest.read_manifest(path).set_index("row")
    assert df.loc[labeled, "label_revision"] == 2


# ----------------------------------------------------------------------------- resume


def test_an_exception_after_the_first_shard_then_a_rerun_equals_an_uninterrupted_run(syn, tmp_path, monkeypatch):
    path, masks_dir, masks = syn
    fresh = tmp_path / "fresh.zarr"
    shutil.copytree(path, fresh)
    al.add_labels(fresh, labels_dir=str(masks_dir))

    real, calls = al.write_shard, []

    def first_only(*args, **kwargs):
        if calls:
            raise RuntimeError("simulated crash")
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(al, "write_shard", first_only)
    with pytest.raises(RuntimeError, match="simulated crash"):
        al.add_labels(path, labels_dir=str(masks_dir))
    run = path / "_medsass" / "add_labels" / "run"
    assert calls == [0] and sorted(p.name for p in (run / "done").iterdir()) == ["shard-000000.json"]
    assert not manifest.read_manifest(path).has_label.any()  # the manifest changes only at the end

    save_mask(tmp_path / "other" / "00001.png", random_mask(1))
    with pytest.raises(StoreError, match="unfinished add-labels"):  # other masks must wait for this run
        al.add_labels(path, labels_dir=str(tmp_path / "other"))

    monkeypatch.setattr(al, "write_shard", real)
    written = []
    monkeypatch.setattr(al, "write_shard", lambda *a, **k: (written.append(a[3]), real(*a, **k)))
    res = al.add_labels(path, labels_dir=str(masks_dir))
    assert written == [2]  # the finished shard is skipped
    assert res.report["counts"]["written"] == 3 and res.report["counts"]["new"] == 3
    assert_same_store(path, fresh)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from medsass import manifest, store
    from medsass.pipeline import add_labels as al

    point, path, masks = sys.argv[1:4]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "mid_shard":  # the second shard's file is half-written when the process dies
        real = store.write_rows

        def half(group, start, arrays):
            if start > 0:
                shard = Path(path) / "label" / "c" / str(start // 8) / "0" / "0"
                shard.write_bytes(shard.read_bytes()[:7])
                die()
            real(group, start, arrays)
        store.write_rows = half
    elif point == "after_commit":  # the new manifest is in place, the run is not cleaned up
        real = manifest.write_json

        def report(obj, p):
            if Path(p).name == "report.json":
                die()
            real(obj, p)
        manifest.write_json = report
    al.add_labels(path, labels_dir=masks)
""")


@pytest.mark.parametrize("point", ["mid_shard", "after_commit"])
def test_kill_minus_9_then_rerun_equals_an_uninterrupted_run(syn, tmp_path, point):
    path, masks_dir, masks = syn
    fresh = tmp_path / "fresh.zarr"
    shutil.copytree(path, fresh)
    al.add_labels(fresh, labels_dir=str(masks_dir))
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, point, str(path), str(masks_dir)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run = path / "_medsass" / "add_labels" / "run"
    assert (run / "plan.json").exists()
    if point == "mid_shard":
        assert (run / "wal" / "shard-000002.npz").exists()
        with pytest.raises(Exception):  # noqa: B017 - whatever zarr raises on a truncated shard
            zarr.open_group(str(path), mode="r")["label"][16:24]
    else:
        assert manifest.read_manifest(path).has_label.sum() == 3

    res = al.add_labels(path, labels_dir=str(masks_dir))
    assert res.report["counts"]["written"] == 3 and res.exit_code == 0
    assert_same_store(path, fresh)  # revisions counted once, the torn shard rewritten from its saved block


def assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ("image", "pseudo_mask", "label"):
        assert np.array_equal(ga[name][:], gb[name][:]), name
    assert manifest.read_manifest(a).equals(manifest.read_manifest(b))  # pandas: NaN equals NaN, unlike Arrow
    assert (a / "manifest.parquet").read_bytes() == (b / "manifest.parquet").read_bytes()
    assert manifest.read_summary(a) == manifest.read_summary(b)


# ----------------------------------------------------------------------------- same bytes as build-masks --labels


def _rect_pngs(folder: Path, masks: Path, shapes) -> None:
    """Gray PNGs of the given shapes with a bright ellipse, and their masks (0/255) of the same names."""
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate(shapes):
        yy, xx = np.mgrid[0:h, 0:w]
        cy, cx, ry, rx = h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7), h * 0.25, w * 0.2
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        img = np.clip(50 + 150 * inside + rng.normal(0, 10, (h, w)), 0, 255).astype(np.uint8)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"r{i:02d}.png")
        save_mask(masks / f"r{i:02d}.png", inside ^ (rng.random((h, w)) > 0.97))


def _build(src, out, scheduler, labels=None, retry_failed=False, **geometry):
    cfg = BuildConfig(sources=[InputSource(path=str(src), labels=LabelSource(dir=str(labels)) if labels else LabelSource())],
                      out=str(out))
    cfg.runtime.scheduler, cfg.runtime.progress, cfg.runtime.salt, cfg.runtime.shard_records = scheduler, False, "s", 32
    cfg.split.split_unlabeled = True  # the same splits with and without labels
    for k, v in {"size": 64, **geometry}.items():
        setattr(cfg.geometry, k, v)
    return build(cfg, retry_failed=retry_failed)


@pytest.mark.parametrize("geometry", [{"resize": "stretch"}, {"resize": "pad"}, {"tile": True, "tile_overlap": 8}],
                         ids=["stretch", "pad", "tile"])
def test_label_bytes_equal_what_build_masks_stores(tmp_path, dask_scheduler, geometry):
    shapes = [(90, 150), (200, 70), (64, 64), (130, 131), (40, 100), (150, 90), (200, 200)]
    _rect_pngs(tmp_path / "img", tmp_path / "masks", shapes)
    late, ref = tmp_path / "late.zarr", tmp_path / "ref.zarr"
    _build(tmp_path / "img", late, dask_scheduler, **geometry)
    _build(tmp_path / "img", ref, dask_scheduler, labels=tmp_path / "masks", **geometry)
    before = {name: files_of(late / name) for name in ("image", "pseudo_mask")}

    res = al.add_labels(late, labels_dir=str(tmp_path / "masks"))
    n_records = len(manifest.read_manifest(late))
    assert res.exit_code == 0 and res.report["counts"]["new"] == res.report["counts"]["written"] == n_records
    if geometry.get("tile"):
        assert n_records == 48 and res.report["counts"]["shards_rewritten"] == 2  # a tiled file straddles shards
    ga, gb = zarr.open_group(str(late), mode="r"), zarr.open_group(str(ref), mode="r")
    assert ga["label"][:].any() and np.array_equal(ga["label"][:], gb["label"][:])
    for name in ("image", "pseudo_mask"):
        assert files_of(late / name) == before[name]
    ma, mb = manifest.read_manifest(late), manifest.read_manifest(ref)
    assert ma.drop(columns=LABEL_COLS).equals(mb.drop(columns=LABEL_COLS))  # add-labels touched only label columns
    assert ma[LABEL_COLS].equals(mb[LABEL_COLS])  # and set them as build-masks --labels does

    rebuilt = _build(tmp_path / "img", late, dask_scheduler, **geometry)  # build-masks re-run: nothing to do
    assert rebuilt.shards_done == 0 and manifest.read_manifest(late).equals(ma)  # its parts carry the new labels
    with pytest.raises(StoreError, match="would drop them"):  # it rewrites whole shards from the build's own labels
        _build(tmp_path / "img", late, dask_scheduler, retry_failed=True, **geometry)


def test_cxr_shenzhen_add_labels_equals_a_store_built_with_labels(tmp_path, data_dir, dask_scheduler):
    """The user's loop on real X-rays: build without labels, the expert's masks arrive, add-labels."""
    names = sorted(p.name for p in (data_dir / "cxr_shenzhen" / "images").glob("*.png"))[:6]
    images, expert = tmp_path / "images", tmp_path / "expert"
    images.mkdir()
    expert.mkdir()
    for n in names:
        os.symlink(data_dir / "cxr_shenzhen" / "images" / n, images / n)
        shutil.copy(data_dir / "cxr_shenzhen" / "masks" / n, expert / n)
    late, ref = tmp_path / "late.zarr", tmp_path / "ref.zarr"
    common = ["--size", "128", "--no-progress", "--salt", "s", "--split-unlabeled", "--scheduler", dask_scheduler]
    runner = CliRunner()
    assert runner.invoke(main, ["build-masks", str(images), "--out", str(late), *common]).exit_code == 0
    assert runner.invoke(main, ["build-masks", str(images), "--out", str(ref), "--labels", str(expert), *common]).exit_code == 0
    before = {name: files_of(late / name) for name in ("image", "pseudo_mask")}

    result = run_cli(late, "--labels", expert)
    assert result.exit_code == 0, result.output
    assert "6 label(s) written (6 new, 0 corrected)" in result.output
    ga, gb = zarr.open_group(str(late), mode="r"), zarr.open_group(str(ref), mode="r")
    assert np.array_equal(ga["label"][:], gb["label"][:]) and ga["label"][:].mean() > 0.1  # lungs
    for name in ("image", "pseudo_mask"):
        assert files_of(late / name) == before[name]
    ma, mb = manifest.read_manifest(late), manifest.read_manifest(ref)
    assert ma[LABEL_COLS].equals(mb[LABEL_COLS]) and ma.has_label.all()
