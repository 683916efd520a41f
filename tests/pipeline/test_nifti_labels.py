"""Label volumes (NIfTI) cut across the store's slice axis, in build-masks and add-labels, and refused when they do
not lie on their image's voxel grid.

Known answers: the expected label of frame k is slice k of nibabel's own RAS+ reorientation of the label volume,
shown as a viewer shows it (``[::-1, ::-1].T``; pipeline/readers/nifti.py), placed by the record's stored geometry.
Label volumes are seeded random masks, so every slice along every axis differs: a volume cut across the wrong axis
gives other slices even when the volume is a cube (same shapes, no error)."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from medsass.pipeline import geometry
from medsass.pipeline.add_labels import add_labels
from medsass.pipeline.cli import main
from medsass.pipeline.process import place_label, read_mask
from medsass.pipeline.readers.nifti import GRID_TOLERANCE, SLICE_AXES, Volume, grid_mismatch

from medsass import manifest

LPS = np.diag([-0.8, -0.7, 2.5, 1.0])  # voxel axes i, j, k to the patient's left, posterior, superior
# voxel axes i -> superior, j -> left, k -> anterior: no axis where RAS+ has it
PERMUTED = np.array([[0.0, -1.1, 0, 30], [0, 0, 1.2, -20], [1.3, 0, 0, 5], [0, 0, 0, 1]])
SIZE = 32


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def volume_pair(root: Path, case: str, shape: tuple[int, int, int], affine: np.ndarray, seed: int,
                label_affine: np.ndarray | None = None) -> np.ndarray:
    """imagesTr/<case>_0000.nii.gz (int16 noise around a bright block) and labelsTr/<case>.nii.gz (a random mask with
    values 0/1/3, any nonzero is foreground); returns the label's data."""
    rng = np.random.default_rng(seed)
    image = rng.normal(-900, 30, shape)
    image[1:-1, 1:-1, 1:-1] += 940
    label = (rng.random(shape) < 0.35).astype(np.uint8) * rng.choice([1, 3], shape).astype(np.uint8)
    write_nifti(root / "imagesTr" / f"{case}_0000.nii.gz", np.round(image).astype(np.int16), affine)
    write_nifti(root / "labelsTr" / f"{case}.nii.gz", label, affine if label_affine is None else label_affine)
    return label


def expected_slices(label: np.ndarray, affine: np.ndarray, axis: str) -> list[np.ndarray]:
    """nibabel's RAS+ reorientation of the label, cut across ``axis`` and displayed; nonzero is foreground."""
    canon = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(label, affine)).dataobj) != 0
    a = SLICE_AXES[axis]
    return [np.take(canon, k, axis=a)[::-1, ::-1].T for k in range(canon.shape[a])]


def placement(r) -> geometry.Placement:
    return geometry.Placement(r.crop_y, r.crop_x, r.crop_height, r.crop_width, r.content_y, r.content_x,
                              r.content_height, r.content_width, r.resize_mode)


def assert_stored_labels(out: Path, df, case: str, slices: list[np.ndarray]) -> None:
    rows = df[df.source_rel == f"{case}_0000.nii.gz"].sort_values("frame")
    assert rows.frame.tolist() == list(range(len(slices))), case
    g = zarr.open_group(str(out), mode="r")
    for r in rows.itertuples():
        truth = slices[r.frame]
        assert r.has_label and r.label_status == "ok", (case, r.frame, r.label_reason)
        assert (r.orig_height, r.orig_width) == truth.shape
        assert r.label_fg_fraction == pytest.approx(truth.mean()), (case, r.frame)
        assert np.array_equal(g["label"][r.row], place_label(truth, placement(r), SIZE)[0]), (case, r.frame)


def build(root: Path, out: Path, scheduler: str, axis: str, *, labels: bool = True) -> None:
    args = ["build-masks", str(root / "imagesTr"), "--out", str(out), "--size", str(SIZE), "--slice-axis", axis,
            "--window", "soft-tissue", "--scheduler", scheduler, "--no-progress", "--split", "val=0,test=0"]
    if labels:
        args += ["--labels", str(root / "labelsTr"), "--label-pattern", "nnunet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output


# --- the voxel-grid check ----------------------------------------------------------------------------
def vol(shape, affine, axis="axial") -> Volume:
    return Volume(shape=shape, affine=np.asarray(affine, float), ornt=nib.io_orientation(affine), slice_axis=axis)


def test_grid_check_accepts_the_same_grid_in_another_voxel_order_and_refuses_shifts():
    image = vol((6, 5, 4), LPS)
    assert grid_mismatch(vol((6, 5, 4), LPS), image) == ""
    # the same grid stored in another voxel order (axes swapped, the affine's columns with them): reoriented alike
    swapped = LPS[:, [2, 0, 1, 3]]
    assert grid_mismatch(vol((4, 6, 5), swapped), image) == ""
    data = np.random.default_rng(0).integers(0, 9, (6, 5, 4))
    a, b = vol((6, 5, 4), LPS), vol((4, 6, 5), swapped)
    assert np.array_equal(a.canonical(data), b.canonical(np.transpose(data, (2, 0, 1))))
    # float32 header round-off is far inside the tolerance (0.01 of the smallest voxel, 0.7 mm: 0.007 mm)
    near = LPS.copy()
    near[:3, 3] += 1e-4
    assert grid_mismatch(vol((6, 5, 4), near), image) == ""
    shifted = LPS.copy()
    shifted[2, 3] += 2.5  # one slice up: every slice of the label would be its neighbour's
    why = grid_mismatch(vol((6, 5, 4), shifted), image)
    assert why.startswith("label volume's affine differs from the image's: voxels up to 2.5 mm apart")
    assert "tolerance 0.007 mm" in why and "Resample the label" in why
    scaled = LPS @ np.diag([1.0, 1.0, 1.02, 1.0])  # 2% thicker slices: the top slice lies 0.15 mm off
    assert "affine differs" in grid_mismatch(vol((6, 5, 4), scaled), image)
    assert "shape differs from the image's: 6x5x3 vs 6x5x4" in grid_mismatch(vol((6, 5, 3), LPS), image)
    assert GRID_TOLERANCE == 0.01


def test_read_mask_cuts_a_label_volume_across_the_slice_axis_and_checks_its_grid(tmp_path):
    label = (np.random.default_rng(1).random((8, 8, 8)) < 0.4).astype(np.uint8)
    path = write_nifti(tmp_path / "lab.nii.gz", label, PERMUTED)
    image = vol((8, 8, 8), PERMUTED, "sagittal").columns()
    for axis in ("axial", "coronal", "sagittal"):
        masks, status, reason = read_mask(str(path), 8, list(range(8)), 2**28, slice_axis=axis, volume=image)
        assert status == "ok", reason
        expect = expected_slices(label, PERMUTED, axis)
        assert all(np.array_equal(masks[k], expect[k]) for k in range(8)), axis
    moved = PERMUTED.copy()
    moved[:3, 3] += (0.0, 0.5, 0.0)
    masks, status, reason = read_mask(str(path), 8, [0], 2**28, slice_axis="sagittal", volume=vol((8, 8, 8), moved).columns())
    assert (masks, status) == ({}, "shape_mismatch") and "label volume's affine differs from the image's" in reason
    assert reason.startswith(str(path))


# --- build-masks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
def test_non_axial_build_stores_the_label_slices_of_the_same_cut(tmp_path, dask_scheduler, axis):
    root = tmp_path / "task"
    cases = {"box": ((14, 12, 10), LPS), "cube": ((12, 12, 12), PERMUTED)}
    labels = {c: volume_pair(root, c, shape, aff, seed) for seed, (c, (shape, aff)) in enumerate(cases.items())}
    out = tmp_path / f"{axis}.zarr"
    build(root, out, dask_scheduler, axis)
    df = manifest.read_manifest(out)
    assert (df.status == "ok").all() and (df.slice_axis == axis).all()
    for case, (_, aff) in cases.items():
        slices = expected_slices(labels[case], aff, axis)
        assert len({s.shape for s in slices}) == 1
        assert_stored_labels(out, df, case, slices)
    cube = expected_slices(labels["cube"], PERMUTED, axis)  # the axial cut of the cube: same shapes, other slices
    assert not all(np.array_equal(a, b) for a, b in zip(cube, expected_slices(labels["cube"], PERMUTED, "axial")))


def test_a_label_volume_off_the_image_grid_is_reported_not_stored(tmp_path, dask_scheduler):
    root = tmp_path / "task"
    shifted = LPS.copy()
    shifted[:3, 3] += (0.0, 0.0, 2.5)  # the label volume lies one slice higher than its image
    volume_pair(root, "moved", (10, 9, 8), LPS, 0, label_affine=shifted)
    volume_pair(root, "good", (10, 9, 8), LPS, 1)
    out = tmp_path / "s.zarr"
    build(root, out, dask_scheduler, "coronal")
    df = manifest.read_manifest(out)
    moved = df[df.source_rel == "moved_0000.nii.gz"]
    assert len(moved) == 9 and (moved.status == "ok").all() and not moved.has_label.any()
    assert (moved.label_status == "shape_mismatch").all()
    assert moved.label_reason.str.contains("label volume's affine differs from the image's: voxels up to 2.5 mm apart").all()
    assert df[df.source_rel == "good_0000.nii.gz"].has_label.all()
    # add-labels refuses it too, in its plan, with the same reason
    res = add_labels(out, labels_dir=str(root / "labelsTr"), pattern="nnunet")
    bad = [r for r in res.report["rejected"] if r["mask"].endswith("moved.nii.gz")]
    assert res.exit_code == 3 and len(bad) == 1 and bad[0]["code"] == "shape_mismatch"
    assert bad[0]["reason"].startswith("label volume's affine differs from the image's")
    assert not manifest.read_manifest(out).set_index("source_rel").loc["moved_0000.nii.gz"].has_label.any()


# --- add-labels ---------------------------------------------------------------------------------------
def test_add_labels_on_a_sagittal_cube_store(tmp_path, dask_scheduler):
    root = tmp_path / "task"
    label = volume_pair(root, "cube", (12, 12, 12), PERMUTED, 3)
    out = tmp_path / "sag.zarr"
    build(root, out, dask_scheduler, "sagittal", labels=False)
    result = add_labels(out, labels_dir=str(root / "labelsTr"), pattern="nnunet")
    assert result.exit_code == 0 and result.report["counts"]["written"] == 12, result.report
    df = manifest.read_manifest(out)
    assert (df.slice_axis == "sagittal").all()
    slices = expected_slices(label, PERMUTED, "sagittal")
    assert_stored_labels(out, df, "cube", slices)
    # a build with --labels stores the same bytes (label_revision 1 both ways)
    both = tmp_path / "both.zarr"
    build(root, both, dask_scheduler, "sagittal")
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(both), mode="r")
    assert np.array_equal(a["label"][:], b["label"][:])
