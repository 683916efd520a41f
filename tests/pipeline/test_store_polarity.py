"""--polarity store: the store's side by majority vote of the per-image auto rule, decided once in the plan phase and
recorded; minority images flagged polarity_minority; the implausible-coverage flag fg_implausible."""
import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from medsass.pipeline import methods
from medsass.pipeline.build import build
from medsass.pipeline.cli import main
from medsass.pipeline.config import BuildConfig, InputSource
from medsass.pipeline.plan import PlanEntry
from medsass.pipeline.readers import read
from medsass.pipeline.store_polarity import SAMPLE_MAX, VOTE_FILE, decide, sample_entries, vote_batch, vote_slices
from medsass.pipeline.threshold import auto_polarity, pseudo_mask
from PIL import Image

from medsass import manifest, store
from medsass.errors import MedsassWarning, StoreError

SIDE = 64


def disk_image(bright_object: bool, area: float) -> np.ndarray:
    """A centred disk covering ``area`` of a SIDE x SIDE image: bright on dark, or dark on bright."""
    yy, xx = np.mgrid[:SIDE, :SIDE]
    r = np.sqrt(area * SIDE * SIDE / np.pi)
    disk = (yy - SIDE / 2 + 0.5) ** 2 + (xx - SIDE / 2 + 0.5) ** 2 <= r * r
    obj, bg = (200, 40) if bright_object else (40, 200)
    return np.where(disk, obj, bg).astype(np.uint8)


def seven_dark_three_bright(folder):
    """7 dark-object images (lesion-like) and 3 bright-object ones: two whose forced-dark mask is plausible (disk 25%,
    dark side 75%) and one whose forced-dark mask covers 96% of the image (disk 4%)."""
    folder.mkdir()
    for i in range(7):
        Image.fromarray(disk_image(False, 0.15 + 0.02 * i)).save(folder / f"dark_{i}.png")
    for i, area in enumerate((0.25, 0.25, 0.04)):
        Image.fromarray(disk_image(True, area)).save(folder / f"bright_{i}.png")
    return folder


def cfg_for(src, out, scheduler, polarity="store", method="otsu", salt="s1"):
    cfg = BuildConfig(sources=[InputSource(path=str(src))], out=str(out))
    cfg.runtime.scheduler, cfg.runtime.progress, cfg.runtime.salt = scheduler, False, salt
    cfg.geometry.size = 32
    cfg.threshold.polarity, cfg.threshold.method = polarity, method
    return cfg


def test_the_synthetic_images_have_the_known_auto_sides():
    for method in ("otsu", "fov_otsu_hull"):
        assert auto_polarity(disk_image(False, 0.2), method=method) == "dark"
        assert auto_polarity(disk_image(True, 0.25), method=method) == "bright"
        assert auto_polarity(disk_image(True, 0.04), method=method) == "bright"
        for img in (disk_image(False, 0.2), disk_image(True, 0.04)):  # the side pseudo_mask's auto takes
            assert auto_polarity(img, method=method) == pseudo_mask(img, method=method, polarity="auto").polarity
    assert auto_polarity(np.full((8, 8), 7, np.uint8)) == "bright"  # constant: pseudo_mask's side
    with pytest.raises(ValueError, match="unknown method"):
        auto_polarity(disk_image(True, 0.2), method="otsuu")


def test_majority_vote_seven_dark_three_bright(tmp_path, dask_scheduler):
    src = seven_dark_three_bright(tmp_path / "in")
    out = tmp_path / "s.zarr"
    assert build(cfg_for(src, out, dask_scheduler)).exit_code == 0
    df = manifest.read_manifest(out).set_index("source_rel")
    assert (df.polarity == "dark").all()  # every image thresholded with the store's side
    minority = {r for r, f in df.qc_flags.items() if methods.POLARITY_MINORITY in f.split(",")}
    assert minority == {"bright_0.png", "bright_1.png", "bright_2.png"}
    # the two plausible minority masks stay in pretraining; the 96% one is implausible and excluded
    assert df.loc["bright_0.png", "qc_flags"] == "polarity_minority" and not df.loc["bright_0.png", "degenerate"]
    assert df.loc["bright_2.png", "fg_fraction"] == pytest.approx(0.96, abs=0.01)
    assert df.loc["bright_2.png", "qc_flags"] == "fg_implausible,polarity_minority" and df.loc["bright_2.png", "degenerate"]
    assert not df.loc[[f"dark_{i}.png" for i in range(7)], "degenerate"].any()
    assert (df.loc[[f"dark_{i}.png" for i in range(7)], "qc_flags"] == "").all()
    # recorded: the vote file, the summary and the store's attributes
    saved = manifest.read_json(store.work_dir(out) / VOTE_FILE)
    summary = manifest.read_json(manifest.summary_path(out))["polarity_vote"]
    attrs = store.open_store(out)[1].attrs["polarity_vote"]
    for rec in (saved, summary, attrs):
        assert rec["polarity"] == "dark" and rec["votes"] == {"bright": 3, "dark": 7}
        assert rec["n_sampled"] == 10 and rec["n_inputs"] == 10 and rec["unreadable"] == 0 and not rec["mixed"]
    assert "sample" not in attrs and "sample" not in summary and len(saved["sample"]) == 10  # file names stay in _medsass


def test_auto_and_fixed_polarities_add_no_store_flags(tmp_path, dask_scheduler):
    src = seven_dark_three_bright(tmp_path / "in")
    out = tmp_path / "a.zarr"
    assert build(cfg_for(src, out, dask_scheduler, polarity="auto")).exit_code == 0
    df = manifest.read_manifest(out).set_index("source_rel")
    assert set(df.polarity) == {"bright", "dark"} and (df.qc_flags == "").all()
    assert "polarity_vote" not in manifest.read_json(manifest.summary_path(out))
    assert not (store.work_dir(out) / VOTE_FILE).exists()
    out = tmp_path / "d.zarr"
    assert build(cfg_for(src, out, dask_scheduler, polarity="dark")).exit_code == 0
    df = manifest.read_manifest(out).set_index("source_rel")
    assert (df.polarity == "dark").all() and (df.qc_flags == "").all()  # 96% stays unflagged: as before


def test_vote_is_deterministic_and_recorded_for_resume(tmp_path, dask_scheduler):
    src = seven_dark_three_bright(tmp_path / "in")
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    build(cfg_for(src, a, dask_scheduler, salt="one"))
    build(cfg_for(src, b, dask_scheduler, salt="two"))  # another salt, same inputs: the same sample and decision
    va, vb = (manifest.read_json(store.work_dir(p) / VOTE_FILE) for p in (a, b))
    assert va == vb
    # resume: the saved decision is read back, not re-voted. Tamper with it to prove it: the re-written shard
    # uses the saved side.
    before = manifest.read_manifest(a)
    vote_file = store.work_dir(a) / VOTE_FILE
    manifest.write_json({**va, "polarity": "bright"}, vote_file)
    parts = sorted((store.work_dir(a) / "parts").glob("shard-*.jsonl"))
    parts[0].unlink()
    build(cfg_for(src, a, dask_scheduler, salt="one"))
    after = manifest.read_manifest(a)
    rewritten = after.shard == 0
    assert rewritten.any() and (after.polarity[rewritten] == "bright").all()
    # and untampered, a resumed store is the one an uninterrupted run made
    manifest.write_json(va, vote_file)
    for p in (store.work_dir(a) / "parts").glob("shard-*.jsonl"):
        p.unlink()
    build(cfg_for(src, a, dask_scheduler, salt="one"))
    again = manifest.read_manifest(a)
    assert again.equals(before)


def entries(names):
    return [PlanEntry(source=f"/x/{n}", root="/x", rel=n, sample_base=n, source_index=0, size_bytes=1, mtime_ns=0,
                      row_start=i) for i, n in enumerate(names)]


def test_sample_is_seeded_capped_and_independent_of_order():
    names = [f"img_{i:04d}.png" for i in range(700)]
    es = entries(names)
    s1 = [e.sample_base for e in sample_entries(es, seed=0)]
    s2 = [e.sample_base for e in sample_entries(list(reversed(es)), seed=0)]
    assert len(s1) == SAMPLE_MAX and s1 == s2
    assert s1 != [e.sample_base for e in sample_entries(es, seed=1)]
    failed = entries(["bad.png"])
    failed[0].row_start = -1  # failed or skipped at planning: no rows, no vote
    assert sample_entries(failed + entries(["a.png"]), seed=0)[0].sample_base == "a.png"
    assert len(sample_entries(failed, seed=0)) == 0


def test_decide_majority_ties_and_mixed():
    assert decide(["dark"] * 7 + ["bright"] * 3) == ("dark", {"bright": 3, "dark": 7}, False)
    assert decide(["bright"] * 3 + ["dark"] * 2 + [None]) == ("bright", {"bright": 3, "dark": 2}, True)
    assert decide(["dark", "bright"]) == ("bright", {"bright": 1, "dark": 1}, True)  # a tie goes to bright, mixed
    assert decide([None, None])[0] == "bright" and not decide([])[2]


def test_coverage_flag_threshold():
    t = methods.FG_IMPLAUSIBLE
    assert methods.store_qc_flags(t, "dark", "dark") == []  # at the limit: plausible
    assert methods.store_qc_flags(t + 1e-6, "dark", "dark") == ["fg_implausible"]
    assert methods.store_qc_flags(0.999, "dark", "dark", ["fg_high"]) == []  # fg_high says it already
    assert methods.store_qc_flags(0.5, "bright", "dark") == ["polarity_minority"]
    assert methods.store_qc_flags(0.0, "bright", "dark", ["constant", "fg_low"]) == []  # a constant image has no side
    assert methods.is_degenerate(["polarity_minority"]) is False
    assert methods.is_degenerate(["fg_implausible"]) is True
    assert methods.is_degenerate(["polarity_minority", "fg_low"]) is True
    assert methods.is_degenerate([]) is False
    # every real label measured lies below it except one PH2 lesion filling the image (docs/pseudo_masks.md)
    assert 0.8 < t < 0.99


def test_cli_polarity_choice(tmp_path, dask_scheduler):
    src = seven_dark_three_bright(tmp_path / "in")
    out = tmp_path / "cli.zarr"
    common = ["build-masks", str(src), "--size", "32", "--method", "otsu", "--salt", "x", "--scheduler", dask_scheduler,
              "--no-progress"]
    res = CliRunner().invoke(main, [*common, "--out", str(out), "--polarity", "store"])
    assert res.exit_code == 0, res.output
    params = json.loads((store.work_dir(out) / "params.json").read_text())["params"]
    assert params["threshold"]["polarity"] == "store"
    assert manifest.read_json(manifest.summary_path(out))["polarity_vote"]["polarity"] == "dark"
    bad = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "bad.zarr"), "--polarity", "majority"])
    assert bad.exit_code == 2 and "store" in bad.output and not (tmp_path / "bad.zarr").exists()
    helped = CliRunner().invoke(main, ["build-masks", "--help"])
    assert "[auto|bright|dark|store]" in helped.output.replace("\n", "").replace(" ", "")


def test_a_mixed_vote_warns_keeps_per_image_sides_and_is_recorded(tmp_path, dask_scheduler):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(disk_image(False, 0.2)).save(src / f"dark_{i}.png")
        Image.fromarray(disk_image(True, 0.25)).save(src / f"bright_{i}.png")
    out = tmp_path / "m.zarr"
    with pytest.warns(MedsassWarning, match="mixed.*own side.*--polarity bright"):
        build(cfg_for(src, out, dask_scheduler))
    vote = manifest.read_json(manifest.summary_path(out))["polarity_vote"]
    assert vote["mixed"] and vote["votes"] == {"bright": 3, "dark": 3}
    assert vote["polarity"] == "auto" and vote["majority"] == "bright"  # a tie's majority is bright; not applied
    df = manifest.read_manifest(out).set_index("source_rel")
    # several modalities: each image keeps its own side (as --polarity auto), so no minority and no inverted mask
    assert (df.loc[[f"dark_{i}.png" for i in range(3)], "polarity"] == "dark").all()
    assert (df.loc[[f"bright_{i}.png" for i in range(3)], "polarity"] == "bright").all()
    assert not df.qc_flags.str.contains(methods.POLARITY_MINORITY).any() and not df.degenerate.any()
    auto = tmp_path / "a.zarr"
    build(cfg_for(src, auto, dask_scheduler, polarity="auto"))
    rows = lambda p: manifest.read_manifest(p).sort_values("source_rel").row.to_numpy()  # noqa: E731
    assert (store.open_store(out)[0][store.PSEUDO_MASK][:][rows(out)] == store.open_store(auto)[0][store.PSEUDO_MASK][:][rows(auto)]).all()


def test_the_default_polarity_is_store(tmp_path):
    assert BuildConfig(sources=[InputSource(path=str(tmp_path))], out=str(tmp_path / "o.zarr")).threshold.polarity == "store"


# --- volumes (NIfTI): the slices the store uses, cut and windowed as its records ---------------------------
def ct_volume(path, seed: int, shape=(48, 40, 10), body_slices=range(3, 7)):
    """A CT-like HU volume (LPS affine): air (-1000 + noise) everywhere, an elliptic body (40 HU, a -800 HU lung)
    in ``body_slices`` only, so slice 0 and the vote slices 1, 7 and 9 are air."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    body = ((x - nx / 2) / (nx * 0.35)) ** 2 + ((y - ny / 2) / (ny * 0.3)) ** 2 <= 1
    lung = ((x - nx * 0.4) / (nx * 0.1)) ** 2 + ((y - ny / 2) / (ny * 0.12)) ** 2 <= 1
    hu = np.full(shape, -1000.0) + rng.normal(0, 15, shape)
    for k in body_slices:
        hu[:, :, k][body] = 40 + rng.normal(0, 10, int(body.sum()))
        hu[:, :, k][lung] = -800
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.round(hu).astype(np.int16), np.diag([-0.8, -0.7, 2.5, 1.0])), str(path))
    return path


def test_vote_slices_spread_over_the_volume():
    assert vote_slices(10) == [1, 3, 5, 7, 9]
    assert vote_slices(200) == [20, 60, 100, 140, 180]
    assert vote_slices(3) == [0, 1, 2] and vote_slices(1) == [0] and vote_slices(0) == [0]


@pytest.mark.parametrize("axis", ["axial", "coronal"])
def test_a_ct_volume_votes_with_its_windowed_body_slices_not_its_air_slice_0(tmp_path, dask_scheduler, axis):
    src = tmp_path / "ct"
    paths = [ct_volume(src / f"ct_{i}.nii.gz", i) for i in range(3)]
    for p in paths:  # what the old vote read: slice 0, unwindowed, is air, and the auto rule calls its noise dark
        assert auto_polarity(read(p, "nifti", [0], max_pixels=2**28)[0].pixels, method="fov_otsu_hull") == "dark"
    out = tmp_path / f"{axis}.zarr"
    cfg = cfg_for(src, out, dask_scheduler, method="fov_otsu_hull")
    cfg.threshold.window, cfg.geometry.slice_axis = "lung", axis
    assert build(cfg).exit_code == 0
    vote = manifest.read_json(store.work_dir(out) / VOTE_FILE)
    # axial: the vote slices 1, 3, 5, 7, 9: the air ones (no_body, 1 7 9: dark in the lung window too) are left out
    assert vote["polarity"] == "bright" and vote["votes"] == {"bright": 3, "dark": 0} and vote["unreadable"] == 0
    df = manifest.read_manifest(out)
    assert (df.slice_axis == axis).all() and (df.polarity == "bright").all()
    body = df[~df.qc_flags.str.contains("no_body")]
    assert len(body) > 0 and not body.qc_flags.str.contains("polarity_minority").any()  # the body agrees with its store


def test_vote_batch_reads_volumes_with_the_build_window(tmp_path):
    """Tissue (40 HU) with a -300 HU region around a small 2000 HU implant: unwindowed, Otsu isolates the metal
    (bright); in the soft-tissue window the metal is clipped and the dark region is the object (dark)."""
    n = 40
    x, y = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    r2 = (x - n / 2 + 0.5) ** 2 + (y - n / 2 + 0.5) ** 2
    plane = np.where(r2 <= (0.3 * n) ** 2, -300.0, 40.0)
    plane[r2 <= (0.1 * n) ** 2] = 2000
    data = np.repeat(plane[:, :, None], 6, axis=2) + np.random.default_rng(0).normal(0, 5, (n, n, 6))
    path = tmp_path / "implant.nii.gz"
    nib.save(nib.Nifti1Image(np.round(data).astype(np.int16), np.eye(4)), str(path))
    item = [(str(path), "nifti", 6)]
    assert vote_batch(item, "fov_otsu_hull", 2**28, "axial", None) == ["bright"]
    assert vote_batch(item, "fov_otsu_hull", 2**28, "axial", "soft-tissue") == ["dark"]
    assert vote_batch([(str(path), "nifti", 40)], "otsu", 2**28, "coronal", "soft-tissue") == ["dark"]
    assert vote_batch([(str(path), "nifti", 40)], "otsu", 2**28, "axial", None) == [None]  # 6 axial slices, not 40


def test_a_store_built_before_the_default_changed_says_how_to_resume_it(tmp_path, dask_scheduler):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(disk_image(False, 0.2)).save(src / "dark_0.png")
    out = tmp_path / "old.zarr"
    build(cfg_for(src, out, dask_scheduler, polarity="auto"))  # as built with the default before 2026-12-05
    with pytest.raises(StoreError, match=r"threshold.polarity: 'auto' -> 'store'.*add --polarity auto$"):
        build(cfg_for(src, out, dask_scheduler))
    build(cfg_for(src, out, dask_scheduler, polarity="auto"))  # the hint works: it resumes (nothing to do)
