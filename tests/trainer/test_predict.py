"""``medsass-train predict``: prep's preprocessing repeated from the checkpoint, masks at the original size."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from medsass.trainer import checkpoint as ck
from medsass.trainer.cli import main
from medsass.trainer.predict import (
    PrepParams,
    frame_canvases,
    predict_files,
    prep_from_checkpoint,
)
from PIL import Image
from torch import nn

from medsass import store as store_mod
from medsass.errors import ConfigError, StoreError
from medsass.testing import make_synthetic_store

torch.set_num_threads(1)
TINY = "tu-mobilenetv3_small_100"
DICOM = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom" / "emri_small_jpeg_2k_lossless.dcm"


class Thresholder(nn.Module):
    """A stand-in network whose prediction is known: foreground where the input is above 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) * 200.0


def prep_params(size: int = 32, resize: str = "stretch", tile: bool = False, overlap: int = 0) -> dict:
    return {"geometry": {"size": size, "resize": resize, "tile": tile, "tile_overlap": overlap, "max_pixels": 2**28},
            "threshold": {"method": "otsu", "polarity": "auto", "intensity": "percentile"}}


def with_prep_params(path: Path, **kw) -> Path:
    """Give a synthetic store the prep parameters `medsass-prep build-masks` records."""
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    group.attrs["medsass"] = {**group.attrs["medsass"], "params": prep_params(**kw)}
    store_mod.consolidate(path)
    return path


def write_jpeg_with_exif(path: Path, stored: np.ndarray, orientation: int = 6) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: displayed = stored rotated 90 degrees clockwise
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    return path


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {Path(r["source"]).name: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A pretrain checkpoint (2 steps, tiny encoder) from a synthetic store with prep params; the store is then removed."""
    from medsass.trainer.config import load_config
    from medsass.trainer.run import run_stages

    root = tmp_path_factory.mktemp("pred")
    store = with_prep_params(make_synthetic_store(root / "s.zarr", n=24, size=32), resize="pad")
    cfg = load_config({
        "out_dir": str(root / "run"), "stores": {"syn": str(store)}, "model": {"encoder": TINY}, "stages": ["pretrain"],
        "pretrain": {"steps": 2, "batch_size": 4, "log_every": 1},
        "runtime": {"num_workers": 0, "progress": False, "threads": 1, "tensorboard": False},
    })
    run_stages(cfg)
    import shutil

    shutil.rmtree(store)  # predict must not need the store any more
    return root / "run" / "pretrain" / "final.pt"


def test_checkpoint_records_prep_params_loadable_weights_only(trained):
    state = torch.load(trained, map_location="cpu", weights_only=True)
    prep = state["stores"]["syn"]["prep"]
    assert prep == {"size": 32, **prep_params(resize="pad")}
    assert prep_from_checkpoint(state, where="t") == PrepParams(size=32, mode="pad", intensity="percentile")


def test_predict_real_files_keeps_original_shapes_and_reports_bad_inputs(trained, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53), dtype=np.uint8)).save(src / "gray.png")
    write_jpeg_with_exif(src / "sub" / "photo.jpg", np.random.default_rng(1).integers(0, 255, (20, 44, 3), dtype=np.uint8))
    (src / "broken.png").write_bytes((src / "gray.png").read_bytes()[:60])  # truncated
    (src / "notes.txt").write_text("not an image")
    (src / "noise.tif").write_bytes(bytes.fromhex("3f8a") + bytes(range(200)))  # named as an image: failed, as in prep
    out = tmp_path / "out"
    args = ["predict", str(trained), str(src)] + ([str(DICOM)] if DICOM.exists() else []) + ["--out", str(out), "--batch-size", "3",
                                                                                             "--device", "cpu", "--probabilities"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 3, res.output
    assert "2 failed" in res.output and "broken.png" in res.output and "noise.tif" in res.output
    rows = read_csv(out / "predictions.csv")
    assert rows["broken.png"]["status"] == "failed" and rows["broken.png"]["reason"]
    assert rows["notes.txt"]["status"] == "skipped" and rows["notes.txt"]["reason_code"] == "not_an_image"
    assert rows["noise.tif"]["status"] == "failed" and rows["noise.tif"]["reason"].startswith("extension .tif but the content is not a TIFF")
    mask = np.asarray(Image.open(out / rows["gray.png"]["mask"]))
    assert mask.shape == (37, 53) and set(np.unique(mask)) <= {0, 255}
    assert float(rows["gray.png"]["fg_fraction"]) == pytest.approx((mask > 0).mean())
    photo = np.asarray(Image.open(out / rows["photo.jpg"]["mask"]))
    assert photo.shape == (44, 20)  # as displayed: EXIF orientation 6 swaps height and width
    assert rows["photo.jpg"]["mask"] == "in/sub/photo_mask.png" or rows["photo.jpg"]["mask"].endswith("sub/photo_mask.png")
    assert tifffile.imread(out / rows["photo.jpg"]["probabilities"]).dtype == np.float32
    if DICOM.exists():
        row = rows[DICOM.name]
        with tifffile.TiffFile(out / row["mask"]) as tif:
            assert len(tif.pages) == 10 and all(p.shape == (64, 64) for p in tif.pages)
        assert row["frames"] == "10" and 0.0 <= float(row["mean_probability"]) <= 1.0
        assert tifffile.imread(out / row["probabilities"]).shape == (10, 64, 64)


def quadrant_image(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright (220) top-left block of 2/3 height x 1/2 width on a dark (20) background, and its mask."""
    truth = np.zeros((h, w), bool)
    truth[: 2 * h // 3, : w // 2] = True
    return np.where(truth, 220, 20).astype(np.uint8), truth


def away_from_edges(truth: np.ndarray, margin: int) -> np.ndarray:
    """Pixels farther than ``margin`` from the truth's boundary (resampling blurs the boundary itself)."""
    from scipy.ndimage import binary_dilation, binary_erosion

    return ~(binary_dilation(truth, iterations=margin) & ~binary_erosion(truth, iterations=margin, border_value=1))


@pytest.mark.parametrize("prep, margin", [
    (PrepParams(32, "stretch"), 3), (PrepParams(32, "pad"), 3), (PrepParams(32, "tile"), 0), (PrepParams(32, "tile", 12), 0),
])
def test_masks_map_back_to_the_original_pixels(tmp_path, prep, margin):
    img, truth = quadrant_image(50, 83)
    Image.fromarray(img).save(tmp_path / "q.png")
    rows = predict_files(Thresholder(), prep, [tmp_path / "q.png"], tmp_path / "out", batch_size=2, probabilities=True)
    assert rows[0]["status"] == "ok"
    mask = np.asarray(Image.open(tmp_path / "out" / "q_mask.png")) > 0
    assert mask.shape == truth.shape
    keep = away_from_edges(truth, margin) if margin else np.ones_like(truth)
    np.testing.assert_array_equal(mask[keep], truth[keep])
    prob = tifffile.imread(tmp_path / "out" / "q_prob.tif")
    assert prob.shape == truth.shape and prob.dtype == np.float32 and prob.min() >= 0 and prob.max() <= 1


def test_exif_orientation_is_followed(tmp_path):
    stored = np.full((24, 40), 20, np.uint8)
    stored[:, :20] = 220  # left half of the stored pixels is the top half once displayed (rotated clockwise)
    write_jpeg_with_exif(tmp_path / "r.jpg", stored)
    predict_files(Thresholder(), PrepParams(32, "stretch"), [tmp_path / "r.jpg"], tmp_path / "out")
    mask = np.asarray(Image.open(tmp_path / "out" / "r_mask.png")) > 0
    assert mask.shape == (40, 24)
    assert mask[:17].all() and not mask[23:].any()


def test_canvases_equal_what_prep_stored(tmp_path):
    """16-bit gray and RGB JPEG inputs, pad mode: predict's canvases are the store's images, byte for byte."""
    from dask.distributed import LocalCluster
    from medsass.pipeline.build import build
    from medsass.pipeline.config import BuildConfig, InputSource
    from medsass.pipeline.readers import read

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray((rng.random((45, 70)) * 4000 + 100).astype(np.uint16)).save(src / "a16.png")
    Image.fromarray(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8)).save(src / "rgb.jpg", quality=90)
    cfg = BuildConfig(sources=[InputSource(path=str(src))], out=str(tmp_path / "s.zarr"))
    cfg.geometry.size, cfg.geometry.resize, cfg.runtime.progress = 32, "pad", False
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        cfg.runtime.scheduler = cluster.scheduler_address
        assert build(cfg).counts["ok"] == 2
    prep = prep_from_checkpoint({"stores": ck.store_digests({"s": str(tmp_path / "s.zarr")})}, where="t")
    assert prep == PrepParams(32, "pad")
    from medsass.manifest import read_manifest

    group, _ = store_mod.open_store(tmp_path / "s.zarr")
    for r in read_manifest(tmp_path / "s.zarr").itertuples():
        fr = read(Path(r.source), r.format)[0]
        _, canvases = frame_canvases(fr.pixels, str(fr.meta["orig_dtype"]), prep)
        np.testing.assert_array_equal(next(canvases), np.asarray(group["image"][r.row]))


def test_same_names_in_different_folders_do_not_collide(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(quadrant_image(20, 30)[0]).save(tmp_path / folder / "x.png")
    Image.fromarray(quadrant_image(20, 30)[0]).save(tmp_path / "a" / "x.jpg")
    rows = predict_files(Thresholder(), PrepParams(32, "stretch"), [tmp_path / "a", tmp_path / "b" / "x.png"], tmp_path / "out")
    masks = sorted(r["mask"] for r in rows)
    assert masks == ["a/x.jpg_mask.png", "a/x.png_mask.png", "b/x_mask.png"]
    assert all((tmp_path / "out" / m).exists() for m in masks)


def test_old_checkpoint_reads_the_store_and_errors_clearly_when_it_is_gone(tmp_path):
    path = with_prep_params(make_synthetic_store(tmp_path / "s.zarr", n=4, size=32), resize="stretch", tile=True, overlap=8)
    old = {"stores": {"syn": {"path": str(path), "manifest_digest": "x"}}}  # written before prep params were recorded
    assert prep_from_checkpoint(old, where="old.pt") == PrepParams(32, "tile", 8)
    import shutil

    shutil.rmtree(path)
    with pytest.raises(StoreError, match="is gone"):
        prep_from_checkpoint(old, where="old.pt")


def test_stores_prepared_differently_need_store_option():
    ckpt = {"stores": {"a": {"prep": {"size": 32, **prep_params(resize="pad")}},
                       "b": {"prep": {"size": 32, **prep_params(resize="stretch")}}}}
    with pytest.raises(ConfigError, match="--store"):
        prep_from_checkpoint(ckpt, where="t")
    assert prep_from_checkpoint(ckpt, where="t", store="b").mode == "stretch"
    with pytest.raises(StoreError, match="prep geometry"):
        prep_from_checkpoint({"stores": {"syn": {"prep": {"size": 32}}}}, where="t")


class LeftHalfOfCanvas(nn.Module):
    """Probability ~1 on the left half of every canvas and ~0 on the right, whatever the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full_like(x, -30.0)
        logits[..., : x.shape[-1] // 2] = 30.0
        return logits


def test_overlapping_tiles_are_averaged(tmp_path):
    Image.fromarray(np.zeros((20, 56), np.uint8)).save(tmp_path / "w.png")  # tiles of 32 with overlap 8: x in [0,32) and [24,56)
    predict_files(LeftHalfOfCanvas(), PrepParams(32, "tile", 8), [tmp_path / "w.png"], tmp_path / "out", probabilities=True)
    prob = tifffile.imread(tmp_path / "out" / "w_prob.tif")
    expected = np.zeros(56)
    expected[:16], expected[24:32], expected[32:40] = 1.0, 0.5, 1.0  # columns 24..31: one tile says 0, the other 1
    np.testing.assert_allclose(prob, np.broadcast_to(expected, (20, 56)), atol=1e-6)


def test_an_input_that_now_fails_loses_its_old_mask(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(quadrant_image(20, 30)[0]).save(src / "x.png")
    predict_files(Thresholder(), PrepParams(32, "stretch"), [src], tmp_path / "out")
    assert (tmp_path / "out" / "x_mask.png").exists()
    (src / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # still sniffed as PNG, no longer decodable
    rows = predict_files(Thresholder(), PrepParams(32, "stretch"), [src], tmp_path / "out")
    assert rows[0]["status"] == "failed" and not (tmp_path / "out" / "x_mask.png").exists()
