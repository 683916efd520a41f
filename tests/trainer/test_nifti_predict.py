"""``medsass-train predict`` on NIfTI volumes: a label volume on the input's own voxel grid (shape, voxel order,
affine), and the whole path build-masks -> tiny training -> predict on real and synthetic volumes."""
from __future__ import annotations

import csv
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
from medsass.testing import ct_small_nifti
import pytest
import torch
from click.testing import CliRunner
from medsass.pipeline.cli import main as prep_cli
from medsass.pipeline.window import apply_window
from medsass.trainer.cli import main as train_cli
from medsass.trainer.predict import PrepParams, predict_files, prep_from_checkpoint
from torch import nn

from medsass.errors import StoreError

torch.set_num_threads(1)
NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
SECRET = b"Roe^Richard 0815"


class Thresholder(nn.Module):
    """A stand-in network whose prediction is known: foreground where the input is above 0.5 (uint8 >= 128)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) * 200.0


def oblique_affine() -> np.ndarray:
    """Voxel axes i, j, k -> S (flipped), R, A (flipped): nothing like RAS, anisotropic, with an offset."""
    aff = np.zeros((4, 4))
    aff[2, 0], aff[0, 1], aff[1, 2] = -2.5, 0.8, -0.7
    aff[:, 3] = [-12.0, 30.5, 7.25, 1.0]
    return aff


def write_ct(path: Path, shape=(12, 20, 24), seed=0) -> tuple[Path, np.ndarray]:
    """Random blobs of soft tissue (40 HU) in air (-1000 HU), stored as uint16 + scl_inter -1024 (as converters do),
    with scanner-space qform and sform, mm units and a descrip that names a patient."""
    rng = np.random.default_rng(seed)
    from scipy.ndimage import gaussian_filter

    blobs = gaussian_filter(rng.normal(size=shape), 1.5) > 0.05
    hu = np.where(blobs, 40, -1000) + rng.integers(-5, 6, shape)
    img = nib.Nifti1Image((hu + 1024).astype(np.uint16), oblique_affine())
    img.header.set_slope_inter(1.0, -1024.0)
    img.set_qform(oblique_affine(), code=1)
    img.set_sform(oblique_affine(), code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = SECRET
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path, hu.astype(np.float64)


def read_rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "predictions.csv").open(newline="") as fh:
        return {Path(r["source"]).name: r for r in csv.DictReader(fh)}


@pytest.mark.parametrize("slice_axis", ["axial", "coronal", "sagittal"])
def test_label_volume_is_the_thresholded_source_voxel_for_voxel(tmp_path, slice_axis):
    src, hu = write_ct(tmp_path / "in" / "ct_0000.nii.gz")
    out = tmp_path / "out"
    prep = PrepParams(32, "tile", window="lung", slice_axis=slice_axis)  # native-resolution tiles: no resampling
    rows = predict_files(Thresholder(), prep, [src], out, probabilities=True)
    assert rows[0]["status"] == "ok" and rows[0]["mask"] == "ct_0000_mask.nii.gz"
    assert int(rows[0]["frames"]) == {"axial": 12, "coronal": 24, "sagittal": 20}[slice_axis]  # i: S, j: R, k: A
    source, label = nib.load(str(src)), nib.load(str(out / rows[0]["mask"]))
    expected = apply_window(hu, -1350, 150) >= 128  # the model's foreground, in the source's voxel order
    assert label.shape == source.shape and np.array_equal(label.affine, source.affine)
    data = np.asanyarray(label.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) == {0, 1} and np.array_equal(data.astype(bool), expected)
    h = label.header
    assert (int(h["qform_code"]), int(h["sform_code"])) == (1, 1)
    assert np.allclose(label.get_qform(), source.get_qform()) and np.allclose(label.get_sform(), source.get_sform())
    assert h.get_xyzt_units() == ("mm", "sec") and h.get_intent()[0] == "label"
    assert SECRET not in gzip.decompress((out / rows[0]["mask"]).read_bytes())
    prob = nib.load(str(out / rows[0]["probabilities"]))
    assert prob.get_data_dtype() == np.float32 and prob.shape == source.shape
    assert np.array_equal(np.asanyarray(prob.dataobj) >= 0.5, expected)


def test_real_volumes_and_names(tmp_path):
    """nibabel's real LAS big-endian MR volume and a RAS uint8 one: a mask volume each, shape and affine as the input's;
    '.nii' and '.nii.gz' both lose their extension in the output name; a 4-D input is reported, not written."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("anatomical.nii", "standard.nii.gz", "example4d.nii.gz"):
        (src / name).write_bytes((NIB_DATA / name).read_bytes())
    out = tmp_path / "out"
    rows = {Path(r["source"]).name: r for r in predict_files(Thresholder(), PrepParams(32, "stretch"), [src], out)}
    assert rows["example4d.nii.gz"]["status"] == "failed" and rows["example4d.nii.gz"]["reason_code"] == "volume_4d"
    assert not (out / "example4d_mask.nii.gz").exists()
    for name, mask in (("anatomical.nii", "anatomical_mask.nii.gz"), ("standard.nii.gz", "standard_mask.nii.gz")):
        assert rows[name]["mask"] == mask
        a, b = nib.load(str(src / name)), nib.load(str(out / mask))
        assert a.shape == b.shape and np.allclose(a.affine, b.affine)
        assert set(np.unique(np.asanyarray(b.dataobj))) <= {0, 1}


def test_checkpoint_window_and_slice_axis_reach_predict():
    prep = {"size": 32, "geometry": {"size": 32, "resize": "pad", "tile": False, "tile_overlap": 0, "max_pixels": 99,
                                     "slice_axis": "coronal"},
            "threshold": {"method": "otsu", "polarity": "auto", "intensity": "percentile", "window": "-600/1500"}}
    got = prep_from_checkpoint({"stores": {"s": {"path": "gone", "prep": prep}}}, where="t")
    assert got == PrepParams(32, "pad", 0, "percentile", 99, window="-600/1500", slice_axis="coronal")
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in prep.items()}
    del old["geometry"]["slice_axis"], old["threshold"]["window"]  # a store without volumes records neither
    assert prep_from_checkpoint({"stores": {"s": {"path": "gone", "prep": old}}}, where="t") == PrepParams(32, "pad", 0, "percentile", 99)
    withheld = {**prep, "threshold": {**prep["threshold"], "window": None}}  # what a shared copy leaves of '-600/1500'
    with pytest.raises(StoreError, match="windowed but not the window"):
        prep_from_checkpoint({"stores": {"s": {"path": "gone", "prep": withheld}}}, where="t")


def test_build_masks_tiny_training_predict_gives_aligned_label_volumes(tmp_path):
    """The issue's path on CT volumes: build-masks (nnU-Net layout, soft-tissue window) -> pretrain + fine-tune (a few
    steps, tiny encoder) -> predict on the volumes and a real MR volume: every output has its input's shape and affine,
    and the checkpoint carries the window to predict."""
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    for i in range(3):
        _, hu = write_ct(images / f"ct{i}_0000.nii.gz", seed=i)
        lab = nib.Nifti1Image((hu > -500).astype(np.uint8), oblique_affine())
        labels.mkdir(exist_ok=True)
        nib.save(lab, str(labels / f"ct{i}.nii.gz"))
    ct_small_nifti(images / "small_0000.nii.gz")  # real CT pixels (HU), no label
    store = tmp_path / "ct.zarr"
    res = CliRunner().invoke(prep_cli, ["build-masks", str(images), "--labels", str(labels), "--label-pattern", "nnunet",
                                        "--window", "soft-tissue", "--out", str(store), "--size", "32", "--workers", "1",
                                        "--no-progress", "--split", "val=0,test=0"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    res = CliRunner().invoke(train_cli, [
        "run", "cpu_small", "--stages", "pretrain,finetune", "--set", f"stores.main={store}", "--set", f"out_dir={run}",
        "--set", "model.encoder=tu-mobilenetv3_small_100", "--set", "runtime.num_workers=0", "--set", "runtime.threads=1",
        "--set", "runtime.progress=false", "--set", "pretrain.steps=3", "--set", "pretrain.batch_size=4",
        "--set", "pretrain.eval_every=3", "--set", "pretrain.checkpoint_every=3", "--set", "finetune.steps=2",
        "--set", "finetune.batch_size=4", "--set", "finetune.eval_every=2", "--set", "finetune.checkpoint_every=2",
        "--set", "finetune.label_fraction=1.0"])
    assert res.exit_code == 0, res.output
    state = torch.load(run / "finetune" / "final.pt", map_location="cpu", weights_only=True)
    assert prep_from_checkpoint(state, where="t").window == "soft-tissue"
    out = tmp_path / "preds"
    mr = tmp_path / "mr" / "anatomical.nii"
    mr.parent.mkdir()
    mr.write_bytes((NIB_DATA / "anatomical.nii").read_bytes())
    res = CliRunner().invoke(train_cli, ["predict", str(run), str(images), str(mr), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = read_rows(out)
    assert sorted(rows) == ["anatomical.nii", "ct0_0000.nii.gz", "ct1_0000.nii.gz", "ct2_0000.nii.gz", "small_0000.nii.gz"]
    for name, row in rows.items():
        source = nib.load(str(mr if name == "anatomical.nii" else images / name))
        label = nib.load(str(out / row["mask"]))
        assert row["status"] == "ok" and row["mask"].endswith("_mask.nii.gz")
        assert label.shape == source.shape and np.allclose(label.affine, source.affine), name
        assert label.get_data_dtype() == np.uint8 and set(np.unique(np.asanyarray(label.dataobj))) <= {0, 1}
