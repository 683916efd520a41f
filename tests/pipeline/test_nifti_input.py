"""NIfTI volumes in build-masks: sniffing, slicing geometry, windows, labels, QC, manifest columns, privacy.

Known answers come from tiny synthetic volumes with chosen affines; real files are nibabel's own test volumes
(shipped in its wheel) and pydicom's real CT slice converted to NIfTI here."""
from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
from medsass.testing import ct_small_nifti
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner
from medsass.pipeline import labels as labels_mod
from medsass.pipeline.cli import main
from medsass.pipeline.config import BuildConfig, InputSource, LabelSource, command_line_config
from medsass.pipeline.discover import sniff, unreadable_content
from medsass.pipeline.readers import add_reader_facts, probe, read
from medsass.pipeline.readers.nifti import NO_BODY, Volume, volume_of
from medsass.pipeline.window import apply_window, parse_window

from medsass import manifest
from medsass.errors import ConfigError, InputError, SkipInput

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
LPS = np.diag([-0.8, -0.7, 2.5, 1.0])  # voxel axes i, j, k run to the patient's left, posterior, superior (as DICOM)
SECRET = b"Doe^Jane MRN-0042 1970-01-01"


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = LPS, *, slope: float | None = None,
                inter: float | None = None, nifti2: bool = False, descrip: bytes = SECRET) -> Path:
    klass = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = klass(data, affine)
    img.header["descrip"] = descrip
    if not nifti2:
        img.header["db_name"] = descrip[:18]
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def ct_volume(shape=(48, 40, 10), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """HU volume: air (-1000 + noise) around an elliptical body (soft tissue 40 HU, a -800 HU lung inside) in slices
    2..7; slices 0, 1, 8, 9 hold only air. Returns (int16 HU, bool body mask)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    body2d = ((x - nx / 2) / (nx * 0.35)) ** 2 + ((y - ny / 2) / (ny * 0.3)) ** 2 <= 1
    lung2d = ((x - nx * 0.4) / (nx * 0.1)) ** 2 + ((y - ny / 2) / (ny * 0.12)) ** 2 <= 1
    hu = np.full(shape, -1000.0) + rng.normal(0, 15, shape)
    body = np.zeros(shape, bool)
    for k in range(2, 8):
        body[:, :, k] = body2d
        hu[:, :, k][body2d] = 40 + rng.normal(0, 10, int(body2d.sum()))
        hu[:, :, k][lung2d] = -800
    return np.round(hu).astype(np.int16), body


# --- windows ---------------------------------------------------------------------------------------
def test_window_presets_numbers_and_errors():
    assert parse_window("lung").bounds() == (-1350.0, 150.0)
    assert parse_window("Soft-Tissue").bounds() == (-160.0, 240.0) and parse_window("bone").bounds() == (-500.0, 1300.0)
    w = parse_window(" -600 / 1500 ")
    assert (w.center, w.width, w.spec) == (-600.0, 1500.0, "-600/1500")
    assert parse_window(None) is None and parse_window("") is None
    p = parse_window("percentile")
    assert not p.fixed and p.bounds(np.arange(1001.0)) == pytest.approx((5.0, 995.0))
    for bad in ("lungs", "40", "40/0", "40/-5", "a/b"):
        with pytest.raises(ValueError, match="window"):
            parse_window(bad)
    out = apply_window(np.array([-2000, -1350, -600, 150, 3000]), -1350, 150)
    assert out.tolist() == [0, 0, 128, 255, 255] and out.dtype == np.uint8  # -600 is mid-window: 127.5 rounds up
    assert not apply_window(np.ones((2, 2)), 5, 5).any()


# --- sniffing --------------------------------------------------------------------------------------
def test_sniff_nifti_by_content_and_double_suffix(tmp_path):
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    plain = write_nifti(tmp_path / "a.nii", data)
    gz = write_nifti(tmp_path / "b.nii.gz", data)
    two = write_nifti(tmp_path / "c.nii", data, nifti2=True)
    renamed = tmp_path / "no_extension"
    renamed.write_bytes(gz.read_bytes())
    assert [sniff(p) for p in (plain, gz, two, renamed)] == ["nifti"] * 4
    other_gz = tmp_path / "notes.txt.gz"
    other_gz.write_bytes(gzip.compress(b"hello" * 100))
    assert sniff(other_gz) is None
    # a file named .nii.gz whose content is not NIfTI fails (a corrupt download), another .gz is skipped
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"<html>not found</html>")
    assert sniff(broken) is None
    err = unreadable_content(broken, "broken.nii.gz")
    assert type(err) is InputError and "extension .nii.gz but the content is not a NIfTI volume" in err.reason
    assert isinstance(unreadable_content(other_gz, "notes.txt.gz"), SkipInput)
    assert sniff(NIB_DATA / "nifti1.hdr") is None  # a header/image pair: not read


# --- geometry ----------------------------------------------------------------------------------------
def test_lps_volume_slices_look_like_its_dicom_slices():
    """An LPS volume's axial frame k is data[:, :, k].T: rows along j (posterior), columns along i (left), as DICOM."""
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    vol = Volume(shape=data.shape, affine=LPS, ornt=nib.io_orientation(LPS), slice_axis="axial")
    canon = vol.canonical(data)
    assert vol.n_slices == 4 and vol.slice_shape == (5, 6)
    for k in range(4):
        assert np.array_equal(vol.display(canon, k), data[:, :, k].T)
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.5))
    sag = Volume(shape=data.shape, affine=LPS, ornt=nib.io_orientation(LPS), slice_axis="sagittal")
    assert sag.n_slices == 6 and sag.slice_shape == (4, 5) and sag.spacing == pytest.approx((2.5, 0.7, 0.8))
    # sagittal frame 0 is the patient's leftmost slice (i = 5); rows run superior -> inferior, columns anterior -> posterior
    assert np.array_equal(sag.display(sag.canonical(data), 0), data[5, :, ::-1].T)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_every_orientation_matches_nibabel_canonical_and_round_trips(perm):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, (5, 6, 7)).astype(np.int16)
    for flips in itertools.product((1, -1), repeat=3):
        aff = np.eye(4)
        aff[:3, :3] = 0
        for src_axis, (dst, sign) in enumerate(zip(perm, flips)):
            aff[dst, src_axis] = sign * (1.0 + src_axis)
        canon = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(data, aff)).dataobj)
        for name, axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
            vol = Volume(shape=data.shape, affine=aff, ornt=nib.io_orientation(aff), slice_axis=name)
            slices = [vol.display(vol.canonical(data), k) for k in range(vol.n_slices)]
            expect = [np.take(canon, k, axis=axis)[::-1, ::-1].T for k in range(canon.shape[axis])]
            assert all(np.array_equal(a, b) for a, b in zip(slices, expect, strict=True))
            assert np.array_equal(vol.to_source(slices, dtype=np.int16), data)


def test_real_ct_slice_converted_to_nifti_reads_back_as_the_dicom(tmp_path):
    """pydicom's real CT slice as dcm2niix writes it (uint16 + scl_inter -1024, LPS -> RAS affine): frame 0 is the
    DICOM's own display in HU, and the window maps it as a viewer does."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    path = ct_small_nifti(tmp_path / "ct_small.nii.gz")
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    frames = read(path, "nifti", max_pixels=2**28)
    assert len(frames) == 1 and frames[0].pixels.dtype == np.float32
    assert np.array_equal(frames[0].pixels, hu.astype(np.float32))
    assert frames[0].meta["orig_dtype"] == "uint16"
    win = read(path, "nifti", max_pixels=2**28, window="soft-tissue")[0]
    assert np.array_equal(win.pixels, apply_window(hu, -160, 240))
    assert win.meta["columns"]["intensity_low"] == -160 and win.meta["columns"]["intensity_high"] == 240


# --- real volumes from nibabel's test data -------------------------------------------------------------
@pytest.mark.parametrize("name", ["anatomical.nii", "reoriented_anat_moved.nii", "standard.nii.gz"])
def test_real_volumes_read_as_canonical_slices(name):
    path = NIB_DATA / name
    img = nib.load(str(path))
    canon = np.asanyarray(nib.as_closest_canonical(img).dataobj)
    pr = probe(path, "nifti")
    frames = read(path, "nifti", max_pixels=2**28)
    assert pr.n_frames == len(frames) == canon.shape[2] and pr.shape == frames[0].pixels.shape == canon.shape[1::-1]
    for k, fr in enumerate(frames):
        assert fr.pixels.dtype.isnative and np.array_equal(fr.pixels, canon[:, :, k][::-1, ::-1].T)
        assert fr.meta["columns"]["volume_affine"] == pytest.approx(img.affine.ravel().tolist())
    back = volume_of(path).to_source([f.pixels for f in frames], dtype=frames[0].pixels.dtype)
    assert np.array_equal(back, np.asanyarray(img.dataobj))


def test_real_4d_cifti_and_nan_volumes_are_refused_with_reasons():
    with pytest.raises(InputError, match="4-D NIfTI of shape 128x96x24x2 .2 volumes.*four_to_three") as exc:
        probe(NIB_DATA / "example4d.nii.gz", "nifti")
    assert exc.value.code == "volume_4d"
    with pytest.raises(InputError, match="volume_4d|4-D"):
        probe(NIB_DATA / "example_nifti2.nii.gz", "nifti")  # NIfTI-2, 4-D
    with pytest.raises(SkipInput, match="CIFTI-2") as skip:
        probe(NIB_DATA / "row_major.dconn.nii", "nifti")
    assert skip.value.code == "non_image"
    with pytest.raises(InputError, match="slice 0 has 74 NaN") as nan:
        read(NIB_DATA / "resampled_anat_moved.nii", "nifti", max_pixels=2**28)
    assert nan.value.code == "nonfinite"


def test_trailing_singleton_axes_2d_files_and_nifti2_are_read(tmp_path):
    data = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3, 1)
    assert probe(write_nifti(tmp_path / "t.nii", data), "nifti").n_frames == 3
    flat = write_nifti(tmp_path / "flat.nii", np.arange(20, dtype=np.uint8).reshape(4, 5))
    fr = read(flat, "nifti", max_pixels=2**28)
    assert len(fr) == 1 and np.array_equal(fr[0].pixels, np.arange(20, dtype=np.uint8).reshape(4, 5).T)
    two = write_nifti(tmp_path / "two.nii.gz", data[..., 0], nifti2=True)
    assert len(read(two, "nifti", max_pixels=2**28)) == 3
    with pytest.raises(InputError, match="max_pixels"):
        read(two, "nifti", max_pixels=50)


def test_percentile_window_is_one_mapping_per_volume(tmp_path):
    data = np.zeros((10, 10, 2), np.float32)
    data[:, :, 0] = np.linspace(0, 100, 100).reshape(10, 10)
    data[:, :, 1] = np.linspace(0, 1000, 100).reshape(10, 10)
    frames = read(write_nifti(tmp_path / "mr.nii", data, np.eye(4)), "nifti", max_pixels=2**28, window="percentile")
    low, high = np.percentile(data, (0.5, 99.5))
    assert frames[0].meta["columns"]["intensity_low"] == pytest.approx(low)
    for fr, k in zip(frames, (0, 1)):
        assert np.array_equal(fr.pixels, apply_window(data[::-1, ::-1, k].T, low, high))  # RAS: rows A -> P, columns R -> L


def test_no_body_slices_are_flagged_and_degenerate(tmp_path):
    hu, body = ct_volume()
    frames = read(write_nifti(tmp_path / "ct.nii.gz", hu), "nifti", max_pixels=2**28, window="lung")
    flagged = [fr.index for fr in frames if NO_BODY in fr.meta["qc_flags"]]
    assert flagged == [0, 1, 8, 9]
    row = add_reader_facts(manifest.empty_row(qc_flags="fg_low"), frames[0])
    assert row["qc_flags"] == "fg_low,no_body" and row["degenerate"] and row["slice_axis"] == "axial"
    assert not add_reader_facts(manifest.empty_row(), frames[4])["degenerate"]


# --- labels ----------------------------------------------------------------------------------------
def test_nnunet_and_template_pairing_of_nii_gz(tmp_path):
    for name in ("imagesTr/liver_001_0000.nii.gz", "imagesTr/liver_001_0001.nii.gz", "labelsTr/liver_001.nii.gz",
                 "labelsTr/liver_002.nii.gz", "masks/scan_seg.nii.gz", "masks/scan.nii"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    nn = labels_mod.LabelIndex(LabelSource(dir=str(tmp_path / "labelsTr"), pattern="nnunet"))
    for channel in ("0000", "0001"):
        p = nn.pair(str(tmp_path / f"imagesTr/liver_001_{channel}.nii.gz"), f"liver_001_{channel}.nii.gz")
        assert p.status == "ok" and p.path.endswith("labelsTr/liver_001.nii.gz")
    miss = nn.pair(str(tmp_path / "x.nii.gz"), "liver_003.nii.gz")
    assert miss.status == "missing" and "case_0000.nii.gz -> case.nii.gz" in miss.reason
    tpl = labels_mod.LabelIndex(LabelSource(dir=str(tmp_path / "masks"), pattern="{stem}_seg.{ext}"))
    assert tpl.pair("/in/scan.nii.gz", "scan.nii.gz").path.endswith("masks/scan_seg.nii.gz")
    same = labels_mod.LabelIndex(LabelSource(dir=str(tmp_path / "masks")))  # default '{stem}.*'
    assert same.pair("/in/scan.nii.gz", "scan.nii.gz").path.endswith("masks/scan.nii")
    assert labels_mod.split_name("a.b.png") == ("a.b", ".png") and labels_mod.split_name("x.NII.GZ") == ("x", ".NII.GZ")
    with pytest.raises(ConfigError, match="nnunet"):
        labels_mod.LabelIndex(LabelSource(dir=str(tmp_path / "labelsTr"), pattern="nnunet", stem_regex="(?P<x>.+)"))


# --- config ----------------------------------------------------------------------------------------
def test_config_window_and_slice_axis_are_validated_and_recorded_only_when_set(tmp_path):
    base = BuildConfig(sources=[InputSource(path=str(tmp_path))], out=str(tmp_path / "o.zarr"))
    params = base.output_params()
    assert "slice_axis" not in params["geometry"] and "window" not in params["threshold"]
    cfg = command_line_config(inputs=[str(tmp_path)], flags={"out": "o.zarr", "threshold.window": "Lung",
                                                             "geometry.slice_axis": "coronal"})
    assert cfg.threshold.window == "lung" and cfg.output_params()["geometry"]["slice_axis"] == "coronal"
    assert cfg.params_digest() != base.params_digest()
    with pytest.raises(ConfigError, match="window 'brain'.*lung, soft-tissue, bone"):
        command_line_config(inputs=[str(tmp_path)], flags={"out": "o.zarr", "threshold.window": "brain"})
    with pytest.raises(ConfigError, match="slice_axis"):
        command_line_config(inputs=[str(tmp_path)], flags={"out": "o.zarr", "geometry.slice_axis": "oblique"})
    labelled = command_line_config(inputs=[str(tmp_path)], labels={"dir": str(tmp_path)},
                                   flags={"out": "o.zarr", "geometry.slice_axis": "sagittal"})  # label volumes are cut alike
    assert labelled.geometry.slice_axis == "sagittal"


# --- build-masks end to end ----------------------------------------------------------------------------
def test_build_masks_on_nifti_volumes_with_nnunet_labels(tmp_path, dask_scheduler):
    hu, body = ct_volume()
    root = tmp_path / "task"
    write_nifti(root / "imagesTr" / "ct_0000.nii.gz", hu, slope=None)
    write_nifti(root / "labelsTr" / "ct.nii.gz", (body * 2).astype(np.uint8))  # any nonzero label is foreground
    ct_small_nifti(root / "imagesTr" / "small_0000.nii.gz")
    (root / "imagesTr" / "fmri_0000.nii.gz").write_bytes((NIB_DATA / "example4d.nii.gz").read_bytes())
    (root / "imagesTr" / "broken_0000.nii.gz").write_bytes(b"\x1f\x8b\x08" + bytes(40))
    out = tmp_path / "ct.zarr"
    res = CliRunner().invoke(main, ["build-masks", str(root / "imagesTr"), "--labels", str(root / "labelsTr"),
                                    "--label-pattern", "nnunet", "--window", "soft-tissue", "--out", str(out),
                                    "--size", "32", "--scheduler", dask_scheduler, "--no-progress", "--split", "val=0,test=0"])
    assert res.exit_code == 3, res.output  # the 4-D and the broken file failed
    df = manifest.read_manifest(out)
    assert list(df.columns) == list(manifest.COLUMNS) + list(manifest.VOLUME_COLUMNS)
    bad = df[df.status == "failed"].set_index("source_rel")
    assert bad.loc["fmri_0000.nii.gz", "reason_code"] == "volume_4d"
    assert bad.loc["broken_0000.nii.gz", "reason_code"] == "not_an_image"
    ct = df[df.source_rel == "ct_0000.nii.gz"].sort_values("frame")
    assert ct.frame.tolist() == list(range(10)) and (ct.n_frames == 10).all() and (ct.format == "nifti").all()
    assert ct.sample_id.tolist() == [f"ct_0000.nii.gz#f{k}" for k in range(10)]
    assert (ct.orig_height == 40).all() and (ct.orig_width == 48).all() and (ct.orig_dtype == "int16").all()
    first = ct.iloc[0]
    assert first.slice_axis == "axial" and list(first.volume_shape) == [48, 40, 10]
    assert np.allclose(np.array(first.volume_affine).reshape(4, 4), LPS) and np.allclose(first.spacing, [0.7, 0.8, 2.5])
    assert (ct.intensity_low == -160).all() and (ct.intensity_high == 240).all()
    assert ct.qc_flags.str.contains(NO_BODY).tolist() == [True, True] + [False] * 6 + [True, True]
    assert ct.degenerate.tolist()[:2] == [True, True] and not ct.degenerate.iloc[2:8].any()
    assert ct.has_label.all() and ct.label_source.str.endswith("labelsTr/ct.nii.gz").all()
    g = zarr.open_group(str(out), mode="r")
    for _, r in ct.iterrows():  # the stored label is the known body of that slice, as displayed (LPS: data.T)
        truth = body[:, :, r.frame].T
        assert r.label_fg_fraction == pytest.approx(truth.mean())
        if 2 <= r.frame < 8:  # soft-tissue window: body bright, lung and air black; Otsu finds the body
            pm = g["pseudo_mask"][r.row].astype(bool)
            lab = g["label"][r.row].astype(bool)
            assert (pm & lab).sum() / (pm | lab).sum() > 0.7
    small = df[df.source_rel == "small_0000.nii.gz"].iloc[0]
    assert small.status == "ok" and small.label_status == "missing" and small.orig_height == 128
    params = g.attrs["medsass"]["params"]
    assert params["threshold"]["window"] == "soft-tissue" and "slice_axis" not in params["geometry"]
    assert_no_header_text(out)


def assert_no_header_text(folder: Path) -> None:
    """Privacy: no file under ``folder`` holds the headers' descrip/db_name text (Parquet read decompressed)."""
    for f in folder.rglob("*"):
        if not f.is_file():
            continue
        data = str(pq.read_table(f).to_pylist()).encode() if f.suffix == ".parquet" else f.read_bytes()
        assert SECRET[:18] not in data, f


def test_store_without_volumes_has_exactly_the_old_columns_and_params(tmp_path, dask_scheduler):
    from medsass.testing import write_blob_pngs

    write_blob_pngs(tmp_path / "png", 3, size=32)
    out = tmp_path / "png.zarr"
    res = CliRunner().invoke(main, ["build-masks", str(tmp_path / "png"), "--out", str(out), "--size", "32",
                                    "--scheduler", dask_scheduler, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert pq.read_schema(manifest.manifest_path(out)).names == list(manifest.COLUMNS)
    params = zarr.open_group(str(out), mode="r").attrs["medsass"]["params"]
    assert set(params["geometry"]) == {"size", "resize", "tile", "tile_overlap", "max_pixels"}
    assert set(params["threshold"]) == {"method", "polarity", "intensity"}


def test_sagittal_build_of_a_real_mr_volume(tmp_path, dask_scheduler):
    out = tmp_path / "mr.zarr"
    res = CliRunner().invoke(main, ["build-masks", str(NIB_DATA / "anatomical.nii"), "--out", str(out), "--size", "32",
                                    "--slice-axis", "sagittal", "--window", "percentile", "--scheduler", dask_scheduler,
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    df = manifest.read_manifest(out)
    assert len(df) == 33 and (df.slice_axis == "sagittal").all() and (df.orig_height == 25).all() and (df.orig_width == 41).all()
    assert not df.qc_flags.str.contains(NO_BODY).any()  # a brain cropped to its box: tissue in every slice
    assert (df.intensity_low < df.intensity_high).all() and df.intensity_low.nunique() == 1  # one window per volume


def test_add_labels_pairs_nifti_label_volumes_into_a_volume_store(tmp_path, dask_scheduler):
    from medsass.pipeline.add_labels import add_labels

    hu, body = ct_volume()
    write_nifti(tmp_path / "imagesTr" / "ct_0000.nii.gz", hu)
    write_nifti(tmp_path / "labelsTr" / "ct.nii.gz", body.astype(np.uint8))
    out = tmp_path / "s.zarr"
    res = CliRunner().invoke(main, ["build-masks", str(tmp_path / "imagesTr"), "--out", str(out), "--size", "48",
                                    "--window", "lung", "--scheduler", dask_scheduler, "--no-progress"])
    assert res.exit_code == 0, res.output
    result = add_labels(out, labels_dir=str(tmp_path / "labelsTr"), pattern="nnunet")
    assert result.exit_code == 0 and result.report["counts"]["written"] == 10
    df = manifest.read_manifest(out).sort_values("frame")
    assert df.has_label.all() and list(df.columns)[-4:] == list(manifest.VOLUME_COLUMNS)  # the volume columns survive
    assert df.label_fg_fraction.tolist() == pytest.approx([body[:, :, k].mean() for k in range(10)])
