"""build-masks end to end: real folders, plain-zarr readback, re-runs, parameter changes, bad inputs, retries."""
import json
import os
import struct
import zlib

import numpy as np
import pydicom
import pytest
import zarr
from click.testing import CliRunner
from medsass.pipeline.build import build
from medsass.pipeline.cli import main
from medsass.pipeline.config import BuildConfig, InputSource, LabelSource, load_dataset_file
from PIL import Image

from medsass import manifest
from medsass.errors import StoreError
from medsass.testing import write_blob_pngs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cfg_for(src, out, scheduler, labels=None, **kw):
    cfg = BuildConfig(sources=[InputSource(path=str(src), labels=labels or LabelSource())], out=str(out))
    cfg.runtime.scheduler = scheduler
    cfg.runtime.progress = False
    cfg.geometry.size = kw.pop("size", 64)
    for k, v in kw.items():
        section, key = k.split("__")
        setattr(getattr(cfg, section), key, v)
    return cfg


def test_ph2_with_labels_reads_back_with_plain_zarr(tmp_path, data_dir, dask_scheduler):
    cfg = load_dataset_file(os.path.join(REPO, "data_manifests", "ph2_dermoscopy.yaml"),
                            [f"out={tmp_path / 'ph2.zarr'}", "geometry.size=96", "runtime.progress=false",
                             f"runtime.scheduler={dask_scheduler}"])
    res = build(cfg)
    assert res.exit_code == 0 and res.counts == {"ok": 40, "failed": 0, "skipped": 0}
    g = zarr.open_group(str(tmp_path / "ph2.zarr"), mode="r")
    img, pm, lab = g["image"][:], g["pseudo_mask"][:], g["label"][:]
    assert img.shape == pm.shape == lab.shape == (40, 96, 96) and img.dtype == np.uint8
    assert set(np.unique(pm)) == {0, 1} and set(np.unique(lab)) == {0, 1}
    assert g.attrs["medsass"]["schema_version"] == 1 and g["image"].shards[0] >= 1
    df = manifest.read_manifest(tmp_path / "ph2.zarr")
    assert sorted(df.row) == list(range(40)) and df.has_label.all()
    assert df.sample_id.is_unique and df.source_sha256.str.len().eq(64).all()
    assert (df.polarity == "dark").mean() >= 0.9  # lesions are darker than skin
    # every label pairs IMDxxx.png with IMDxxx_lesion.png
    assert all(os.path.basename(l).startswith(os.path.basename(s)[:6]) for s, l in zip(df.source, df.label_source))
    # grouped split with the requested shares of labeled records
    assert df.split.value_counts().to_dict() == {"train": 28, "test": 8, "val": 4}
    # the pseudo-mask is a real (if imperfect) approximation of the lesion
    inter = (pm & lab).sum((1, 2))
    union = (pm | lab).sum((1, 2))
    assert np.mean(inter / np.maximum(union, 1)) > 0.3
    rep = json.loads(CliRunner().invoke(main, ["inspect", str(tmp_path / "ph2.zarr"), "--json"]).output)
    assert rep["n_records"] == 40 and rep["n_ok"] == 40 and rep["n_failed"] == 0 and rep["failures"] == []

    # same command again: nothing to do, same result
    again = build(cfg)
    assert again.shards_done == 0 and again.counts == res.counts
    # other parameters on the same store: refused, then rebuilt with --overwrite
    cfg.geometry.size = 64
    with pytest.raises(StoreError, match="geometry.size: 96 -> 64"):
        build(cfg)
    build(cfg, overwrite=True)
    assert zarr.open_group(str(tmp_path / "ph2.zarr"), mode="r")["image"].shape == (40, 64, 64)


def _png_with_huge_header(path):
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _build_with_bad_inputs(src, out, dask_scheduler):
    """build-masks at 32 px over ``src``, which holds bad inputs (exit code 3); its manifest, and per file name
    (status, reason code, reason)."""
    res = CliRunner().invoke(main, ["build-masks", str(src), "--out", str(out), "--size", "32", "--scheduler", dask_scheduler,
                                    "--no-progress"])
    assert res.exit_code == 3, res.output
    df = manifest.read_manifest(out)
    return df, {os.path.basename(s): (st, code, reason) for s, st, code, reason in zip(df.source, df.status, df.reason_code, df.reason)}


def test_bad_inputs_are_recorded_and_do_not_stop_the_run(tmp_path, dask_scheduler):
    src = tmp_path / "in"
    write_blob_pngs(src, 5, size=48)
    (src / "empty.png").write_bytes(b"")
    (src / "random.png").write_bytes(os.urandom(2000))
    good = (src / "img0000.png").read_bytes()
    (src / "truncated.png").write_bytes(good[: len(good) // 2])
    (src / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(src / "tiny.png")
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(src / "constant.png")
    _png_with_huge_header(src / "bomb.png")
    import tifffile

    nan = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    nan[3, 4] = np.nan
    tifffile.imwrite(src / "nan.tif", nan)
    out = tmp_path / "s.zarr"
    df, by = _build_with_bad_inputs(src, out, dask_scheduler)
    assert by["empty.png"][:2] == ("failed", "empty_file")
    assert by["random.png"][:2] == ("failed", "not_an_image") and by["notes.txt"][0] == "skipped"
    assert by["truncated.png"][0] == "failed" and by["truncated.png"][2]
    assert by["tiny.png"][:2] == ("failed", "too_small")
    assert by["bomb.png"][:2] == ("failed", "too_large")
    assert by["nan.tif"][:2] == ("failed", "nonfinite")
    assert by["constant.png"][0] == "ok"
    const = df[df.source.str.endswith("constant.png")].iloc[0]
    assert const.degenerate and "constant" in const.qc_flags
    assert sum(st == "ok" for st, _, _ in by.values()) == 6
    summary = json.loads((out / "manifest.json").read_text())
    assert summary["failures_by_code"]["too_large"] == 1 and summary["counts"]["failed"] == 6
    rep = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).output)
    assert {f["source"].rsplit("/", 1)[1] for f in rep["failures"]} == {"empty.png", "random.png", "truncated.png", "tiny.png",
                                                                         "bomb.png", "nan.tif"}

    # --strict stops at the first failure
    res = CliRunner().invoke(main, ["build-masks", str(src), "--out", str(tmp_path / "strict.zarr"), "--size", "32",
                                    "--scheduler", dask_scheduler, "--no-progress", "--strict"])
    assert res.exit_code != 0 and "strict" in res.output

    # fix the truncated file in place, retry only what failed
    (src / "truncated.png").write_bytes(good)
    res = CliRunner().invoke(main, ["build-masks", str(src), "--out", str(out), "--size", "32", "--scheduler", dask_scheduler,
                                    "--no-progress", "--retry-failed"])
    df2 = manifest.read_manifest(out)
    row = df2[df2.source.str.endswith("truncated.png")].iloc[0]
    assert row.status == "ok"
    g = zarr.open_group(str(out), mode="r")
    ok0 = df2[df2.source.str.endswith("img0000.png")].iloc[0]
    assert (g["image"][row.row] == g["image"][ok0.row]).all()  # same pixels as the file it was copied from
    assert (df2.status == "failed").sum() == 5 and res.exit_code == 3


def test_files_named_as_images_that_are_not_fail_and_exit_3(tmp_path, dask_scheduler):
    """A corrupt download keeps its image extension: failed with the reason, not skipped; other names are skipped."""
    src = tmp_path / "in"
    write_blob_pngs(src, 2, size=48)
    (src / "noise.tif").write_bytes(bytes.fromhex("3f8a") + os.urandom(500))
    (src / "img.jpg").write_text("not a photo")
    (src / "scan.dcm").write_bytes(b"<html>session expired</html>")
    (src / "notes.txt").write_text("not an image")
    (src / "README").write_bytes(os.urandom(100))
    (src / "photo.png").write_bytes((src / "img0000.png").read_bytes())
    Image.open(src / "img0001.png").save(src / "misnamed.jpg", format="PNG")  # readable: content decides the format
    out = tmp_path / "s.zarr"
    df, by = _build_with_bad_inputs(src, out, dask_scheduler)
    assert by["noise.tif"][:2] == ("failed", "not_an_image")
    assert by["noise.tif"][2].startswith("extension .tif but the content is not a TIFF (first bytes 3f 8a ")
    assert by["img.jpg"][0] == by["scan.dcm"][0] == "failed" and "not a DICOM file" in by["scan.dcm"][2]
    assert by["notes.txt"][0] == by["README"][0] == "skipped"
    assert by["misnamed.jpg"][0] == by["photo.png"][0] == "ok" and (df.status == "ok").sum() == 4


def test_dicom_folder_all_decoded_and_no_phi(tmp_path, data_dir, dask_scheduler):
    out = tmp_path / "dicom.zarr"
    cfg = cfg_for(data_dir / "dicom", out, dask_scheduler)
    res = build(cfg)
    df = manifest.read_manifest(out)
    ok = df[df.status == "ok"]
    dcm = [p for p in (data_dir / "dicom").iterdir() if p.suffix == ".dcm"]
    assert ok.source.nunique() == len(dcm) == 13, df[df.status != "ok"][["source", "reason"]].to_string()
    assert len(ok) == 12 + 10  # one 10-frame file
    assert set(df[df.status == "skipped"].source.map(os.path.basename)) <= {"SOURCE.md", "sha256sums.txt",
                                                                            "LICENSE_pydicom-data.txt", "README_pydicom_test_files.txt"}
    assert res.counts["failed"] == 0
    mono1 = ok[ok.photometric == "MONOCHROME1"]
    assert len(mono1) == 2
    phi = set()
    for p in dcm:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        for tag in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "InstitutionName", "StudyInstanceUID"):
            v = str(ds.get(tag, "") or "")
            if len(v) >= 4:
                phi.add(v)
    assert phi, "expected some identifying header values in the test files"
    blobs = b""
    for root, _, files in os.walk(out):
        for f in files:
            if f != "salt":
                blobs += open(os.path.join(root, f), "rb").read() if not f.startswith("c") or f.endswith("json") else b""
    blobs += manifest.read_table(out / "manifest.parquet").to_pandas().to_csv().encode()
    for v in phi:
        assert v.encode() not in blobs, f"identifying header value {v!r} leaked into the store"


def test_tiles_and_multipage_tiff(tmp_path, data_dir, dask_scheduler):
    out = tmp_path / "t.zarr"
    cfg = cfg_for(data_dir / "tiff", out, dask_scheduler, size=32)
    build(cfg)
    df = manifest.read_manifest(out)
    stack = df[df.source.str.endswith("stardist_img3d_synthetic.tif") & (df.status == "ok")]
    assert len(stack) == 31 and sorted(stack.frame) == list(range(31))
    out2 = tmp_path / "tiles.zarr"
    cfg = cfg_for(data_dir / "nuclei_sample" / "N2DH-GOWT1" / "images", out2, dask_scheduler, size=256, geometry__tile=True,
                  labels=LabelSource(dir=str(data_dir / "nuclei_sample" / "N2DH-GOWT1" / "masks"),
                                     pattern="man_seg{id}.tif", stem_regex=r"t(?P<id>\d+)"))
    build(cfg)
    df = manifest.read_manifest(out2)
    assert len(df) == 3 * 16 and df.has_label.all()  # 1024x1024 -> 4x4 tiles of 256
    g = zarr.open_group(str(out2), mode="r")
    from medsass.pipeline.readers import read

    src = df.iloc[5]
    full = read(__import__("pathlib").Path(src.source), "tiff")[0].pixels
    tile = full[src.crop_y : src.crop_y + 256, src.crop_x : src.crop_x + 256]
    assert (g["image"][src.row] == tile).all()  # 8-bit tiles are stored unchanged
    assert (df.polarity == "bright").all()  # nuclei are the bright class


def test_existing_foreign_output_is_never_touched(tmp_path, dask_scheduler):
    src = tmp_path / "in"
    write_blob_pngs(src, 2, size=32)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "keep.txt").write_text("data")
    with pytest.raises(StoreError, match="not a medsass store"):
        build(cfg_for(src, out, dask_scheduler), overwrite=True)
    assert (out / "keep.txt").read_text() == "data"


def test_unknown_method_is_a_usage_error_before_any_work(tmp_path):
    src = tmp_path / "src"
    write_blob_pngs(src, 2, size=32)
    out = tmp_path / "never.zarr"
    res = CliRunner().invoke(main, ["build-masks", str(src), "--out", str(out), "--method", "otsuu"])
    assert res.exit_code == 2, res.output
    assert "'otsuu' is not a method" in res.output and "fov_otsu_hull" in res.output
    assert not out.exists()


def test_missing_input_leaves_no_store_behind(tmp_path):
    out = tmp_path / "never.zarr"
    res = CliRunner().invoke(main, ["build-masks", str(tmp_path / "typo"), "--out", str(out)])
    assert res.exit_code == 2 and "does not exist" in res.output and "typo" in res.output
    assert not out.exists()


def test_store_built_with_another_method_names_the_flag_that_resumes_it(tmp_path):
    src, out = tmp_path / "src", tmp_path / "s.zarr"
    write_blob_pngs(src, 3, size=32)
    args = ["build-masks", str(src), "--out", str(out), "--size", "32", "--workers", "1", "--no-progress"]
    assert CliRunner().invoke(main, [*args, "--method", "otsu"]).exit_code == 0
    res = CliRunner().invoke(main, args)  # the default method is not otsu
    assert res.exit_code == 2 and "threshold.method: 'otsu' -> 'fov_otsu_hull'" in res.output
    assert "add --method otsu" in res.output
    assert CliRunner().invoke(main, [*args, "--method", "otsu"]).exit_code == 0  # the hint works: resumes


def test_salt_from_a_file_or_the_environment_not_only_the_command_line(tmp_path, dask_scheduler, monkeypatch):
    """--salt shows in `ps` to every user of the machine: --salt-file and MEDSASS_SALT give the same store without that."""
    from medsass.pipeline.splits import salted_hash

    write_blob_pngs(tmp_path / "in", 2, size=48)
    (tmp_path / "salt.txt").write_text("s3cret\n")
    common = [str(tmp_path / "in"), "--size", "32", "--scheduler", dask_scheduler, "--no-progress"]
    monkeypatch.delenv("MEDSASS_SALT", raising=False)
    res = CliRunner().invoke(main, ["build-masks", *common, "--out", str(tmp_path / "file.zarr"), "--salt-file", str(tmp_path / "salt.txt")])
    assert res.exit_code == 0, res.output
    monkeypatch.setenv("MEDSASS_SALT", "s3cret")
    res = CliRunner().invoke(main, ["build-masks", *common, "--out", str(tmp_path / "env.zarr")])
    assert res.exit_code == 0, res.output
    for name in ("file.zarr", "env.zarr"):
        df = manifest.read_manifest(tmp_path / name)
        assert set(df.group) == {salted_hash("s3cret", f"file:img000{i}.png") for i in range(2)}, name
        assert not (tmp_path / name / "_medsass" / "salt").exists()  # a given salt is never written into the store

    both = CliRunner().invoke(main, ["build-masks", *common, "--out", str(tmp_path / "x.zarr"), "--salt", "a",
                                     "--salt-file", str(tmp_path / "salt.txt")])
    assert both.exit_code == 2 and "--salt-file" in both.output
    (tmp_path / "empty.txt").write_text("\n")
    empty = CliRunner().invoke(main, ["build-masks", *common, "--out", str(tmp_path / "y.zarr"), "--salt-file", str(tmp_path / "empty.txt")])
    assert empty.exit_code == 2 and "empty.txt" in empty.output and "empty" in empty.output
