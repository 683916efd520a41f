"""``medsass-train export``: ONNX / TorchScript plus preprocessing.json, on a model trained by the demo's recipe on the
bundled sample. onnxruntime's logits match torch's; the export folder alone (``apply_exported``) gives predict's masks,
for the sample's own stretch geometry and for pad / tile geometries on larger, non-square and colour images."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import onnxruntime
import pytest
import tifffile
import torch
from click.testing import CliRunner
from medsass.trainer import checkpoint as ck
from medsass.trainer.cli import main
from medsass.trainer.demo import run_demo
from medsass.pipeline.readers import read
from medsass.trainer.export import JSON_NAME, OPSET, apply_exported, export, volume_description, volume_steps
from medsass.trainer.predict import PrepParams, frame_canvases, load_model, predict, prep_from_checkpoint
from PIL import Image

torch.set_num_threads(1)
SAMPLE = Path(__file__).resolve().parents[2] / "sample_data" / "dsb2018_nuclei" / "images"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The demo's fine-tuned checkpoint (its recipe on the bundled sample, with fewer steps)."""
    out = tmp_path_factory.mktemp("export") / "demo"
    run_demo(out, workers=1, progress=False, overrides=["pretrain.steps=30", "finetune.steps=20", "runtime.threads=1",
                                                         "runtime.num_workers=0", "evaluate.overlays=0"])
    return out / "run" / "finetune" / "final.pt"


@pytest.fixture(scope="module")
def onnx_dir(trained, tmp_path_factory) -> Path:
    """``medsass-train export RUN --format onnx`` of the trained run (exported once: ~15 s)."""
    out = tmp_path_factory.mktemp("onnx")
    res = CliRunner().invoke(main, ["export", str(trained.parents[1]), "--format", "onnx", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def with_prep(state: dict, path: Path, geometry: dict | None = None, threshold: dict | None = None) -> Path:
    """A copy of the checkpoint ``state`` whose stores record other prep parameters, saved at ``path``."""
    changed = json.loads(json.dumps(state["stores"], default=str))
    for rec in changed.values():
        rec["prep"]["geometry"].update(geometry or {})
        rec["prep"]["threshold"].update(threshold or {})
    torch.save({**state, "stores": changed}, path)
    return path


def masks_of(folder: Path) -> dict[str, np.ndarray]:
    return {p.name[: -len("_mask.png")]: np.asarray(Image.open(p)) for p in sorted(folder.glob("*_mask.png"))}


def compare(predicted: dict[str, np.ndarray], export_dir: Path, images: list[Path]) -> tuple[float, int]:
    """Worst IoU and total differing pixels between predict's masks and apply_exported's."""
    worst, differ = 1.0, 0
    for img in images:
        (mine,) = apply_exported(export_dir, img)
        theirs = predicted[img.stem]
        assert mine.shape == theirs.shape and mine.dtype == np.uint8
        a, b = mine > 0, theirs > 0
        union = np.logical_or(a, b).sum()
        worst = min(worst, float(np.logical_and(a, b).sum() / union) if union else 1.0)
        differ += int((a != b).sum())
    return worst, differ


def test_onnx_export_matches_torch_and_records_predicts_preprocessing(trained, onnx_dir, tmp_path):
    meta = json.loads((onnx_dir / JSON_NAME).read_text())
    state = ck.load(trained)
    prep = prep_from_checkpoint(state, where="test")
    assert meta["preprocessing"] == dataclasses.asdict(prep) and prep.size == 128 and prep.mode == "stretch"
    assert meta["threshold"] == 0.5 and meta["opset"] == OPSET and meta["file"] == "model.onnx"
    assert meta["input"]["shape"] == ["batch", 1, 128, 128] and meta["checkpoint"]["stage"] == "finetune"
    assert not list(onnx_dir.glob("*.data"))  # one self-contained file
    # onnxruntime vs torch on every sample image, in a batch of 16 and of 1 (the batch axis is dynamic)
    canvases = []
    for f in sorted(SAMPLE.glob("*.tif")):
        pixels = tifffile.imread(f)
        canvases += list(frame_canvases(pixels, str(pixels.dtype), prep)[1])
    x = np.stack(canvases)[:, None].astype(np.float32) / np.float32(255)
    with torch.no_grad():
        want = load_model(state, torch.device("cpu"))(torch.from_numpy(x)).numpy()
    session = onnxruntime.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": x})[0]
    assert got.shape == want.shape == (16, 1, 128, 128)
    assert np.abs(got - want).max() < 1e-4 and np.abs(want).max() > 1  # a trained model's logits, matched
    assert np.abs(session.run(["logits"], {"image": x[:1]})[0] - want[:1]).max() < 1e-4
    res = CliRunner().invoke(main, ["export", str(trained), "--format", "torchscript", "--out", str(tmp_path / "ts"),
                                    "--threshold", "0.4"])
    assert res.exit_code == 0 and json.loads((tmp_path / "ts" / JSON_NAME).read_text())["threshold"] == 0.4, res.output
    bad = CliRunner().invoke(main, ["export", str(trained), "--format", "tflite", "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "tflite" in bad.output


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_folder_alone_reproduces_predicts_masks_on_the_sample(trained, onnx_dir, tmp_path, fmt):
    images = sorted(SAMPLE.glob("*.tif"))
    predict(trained, [SAMPLE], tmp_path / "pred", device="cpu")
    predicted = masks_of(tmp_path / "pred")
    assert len(predicted) == len(images) == 16
    fg = np.mean([m.mean() / 255 for m in predicted.values()])
    assert 0.02 < fg < 0.9, fg  # masks with both classes: the comparison can fail
    folder = onnx_dir if fmt == "onnx" else tmp_path / fmt
    if fmt == "torchscript":
        export(trained, folder, fmt=fmt)
    worst, differ = compare(predicted, folder, images)
    assert worst >= 0.999, (worst, differ)
    if fmt == "torchscript":
        assert differ == 0  # the same torch kernels: pixel-identical


def test_pad_and_tile_geometries_on_larger_non_square_and_colour_images(trained, tmp_path):
    tiles = [tifffile.imread(f) for f in sorted(SAMPLE.glob("*.tif"))[:6]]
    mosaic = np.block([tiles[:3], tiles[3:]])[:211, :317]  # uint16, 211 x 317: percentile scaling, resized / tiled
    tifffile.imwrite(tmp_path / "wide.tif", mosaic)
    gray8 = (np.clip(mosaic[:90, :150].astype(np.float32) / mosaic.max() * 255, 0, 255)).astype(np.uint8)
    Image.fromarray(np.stack([gray8, gray8, np.roll(gray8, 3, axis=1)], -1)).save(tmp_path / "small.png")  # RGB, 90 x 150
    images = [tmp_path / "wide.tif", tmp_path / "small.png"]
    state = ck.load(trained)
    for mode, geometry in (("pad", {"resize": "pad", "tile": False}), ("tile", {"tile": True, "tile_overlap": 40})):
        path = with_prep(state, tmp_path / f"{mode}.pt", geometry)
        predict(path, images, tmp_path / f"pred_{mode}", device="cpu")
        predicted = masks_of(tmp_path / f"pred_{mode}")
        meta = export(path, tmp_path / f"export_{mode}", fmt="torchscript")
        assert meta["preprocessing"]["mode"] == mode
        worst, differ = compare(predicted, tmp_path / f"export_{mode}", images)
        assert worst >= 0.999 and differ == 0, (mode, worst, differ)
        assert all(0 < m.mean() < 255 for m in predicted.values())  # both classes present


def nuclei_volume(path: Path, n: int = 5) -> Path:
    """A CT-like volume (int16 HU, RAS axes, anisotropic voxels) whose coronal slices are sample tiles mapped onto
    -160..240 HU: the soft-tissue window gives the images back; the axial slices look nothing like them."""
    tiles = [tifffile.imread(f).astype(np.float32) for f in sorted(SAMPLE.glob("*.tif"))[:n]]
    hu = np.stack([t / t.max() * 400 - 160 for t in tiles], axis=1)  # (128, n, 128): voxel axis j (A) is coronal
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.round(hu).astype(np.int16), np.diag([0.8, 2.0, 0.8, 1.0])), str(path))
    return path


def test_a_volume_store_exports_its_slice_axis_and_window_and_apply_exported_repeats_them(trained, tmp_path):
    path = with_prep(ck.load(trained), tmp_path / "volume.pt", {"slice_axis": "coronal"}, {"window": "soft-tissue"})
    meta = export(path, tmp_path / "export", fmt="torchscript")
    assert json.loads((tmp_path / "export" / JSON_NAME).read_text()) == json.loads(json.dumps(meta))
    assert (meta["preprocessing"]["slice_axis"], meta["preprocessing"]["window"]) == ("coronal", "soft-tissue")
    assert meta["volume"] == {"slice_axis": "coronal", "canonical_axis": 1, "window": {
        "spec": "soft-tissue", "center": 40.0, "width": 400.0, "low": -160.0, "high": 240.0}}
    cut, window = meta["steps"][:2]
    assert "RAS+" in cut and "cut it coronally, across canonical axis 1 (A)" in cut and "[:, k], then [::-1, ::-1].T" in cut
    assert "from low = -160 to high = 240 onto 0..255" in window and "skips the intensity step" in window
    src = nuclei_volume(tmp_path / "in" / "vol.nii.gz")
    rows = predict(path, [src], tmp_path / "pred", device="cpu")
    assert rows[0]["status"] == "ok" and rows[0]["frames"] == 5
    label = read(tmp_path / "pred" / rows[0]["mask"], "nifti", None, slice_axis="coronal")  # predict's volume, sliced
    mine = apply_exported(tmp_path / "export", src)
    assert len(mine) == len(label) == 5
    for a, b in zip(mine, label):
        assert a.shape == b.pixels.shape == (128, 128) and np.array_equal(a > 0, b.pixels > 0)
    fg = np.mean([m.mean() / 255 for m in mine])
    assert 0.02 < fg < 0.9, fg  # nuclei found: the slices were cut and windowed as in training


def test_volume_steps_without_a_window_and_with_percentiles():
    plain = PrepParams(64, "stretch")
    assert volume_description(plain) == {"slice_axis": "axial", "canonical_axis": 2, "window": None}
    cut, how = volume_steps(plain)
    assert "cut it axially, across canonical axis 2 (S)" in cut and "[:, :, k]" in cut and "anterior -> posterior" in cut
    assert how.startswith("no window: each slice goes through the intensity step")
    mr = PrepParams(64, "stretch", window="percentile", slice_axis="sagittal")
    assert volume_description(mr)["window"] == {"spec": "percentile", "percentiles": [0.5, 99.5]}
    cut, how = volume_steps(mr)
    assert "across canonical axis 0 (R)" in cut and "[k]" in cut and "0.5th and 99.5th percentiles" in how
