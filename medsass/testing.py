"""Small synthetic stores for tests and benchmarks, written through the real store/manifest code, and the config data
of a tiny training run on them.

Images are smooth bright blobs on a textured dark background; ``label`` is the true blob mask and
``pseudo_mask`` is a per-image Otsu threshold of the noisy image, so the two differ a little, as
real pseudo-masks differ from expert masks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from skimage.filters import threshold_otsu

from medsass import manifest, store

def blob_image(rng: np.random.Generator, size: int, n_blobs: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A (size, size) uint8 image of bright blobs plus texture and noise, and its true blob mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    field = np.zeros((size, size), np.float32)
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        r = rng.uniform(0.08, 0.2) * size
        field = np.maximum(field, np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))))
    truth = field > 0.5
    texture = 0.15 * np.sin(xx / rng.uniform(3, 9)) * np.cos(yy / rng.uniform(3, 9))
    img = 60 + 140 * field + 25 * texture + rng.normal(0, 12, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8), truth


def make_synthetic_store(
    path: str | Path,
    *,
    n: int = 64,
    size: int = 32,
    shard_records: int = 16,
    labeled_fraction: float = 1.0,
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
    degenerate_every: int = 0,
    seed: int = 0,
) -> Path:
    """Write a finished medsass store with ``n`` records; returns its path."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    group = store.create(path, n_records=n, size=size, shard_records=shard_records, attrs={"params": {"synthetic": True}})
    images = np.zeros((n, size, size), np.uint8)
    pseudo = np.zeros_like(images)
    labels = np.zeros_like(images)
    rows = []
    n_train, n_val = int(round(splits[0] * n)), int(round(splits[1] * n))
    for i in range(n):
        img, truth = blob_image(rng, size)
        t = float(threshold_otsu(img))
        pm = img > t
        degenerate = bool(degenerate_every and i % degenerate_every == degenerate_every - 1)
        if degenerate:
            pm[:] = False
        has_label = rng.random() < labeled_fraction
        images[i], pseudo[i] = img, pm
        if has_label:
            labels[i] = truth
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        rows.append(
            manifest.empty_row(
                sample_id=f"synthetic/{i:05d}.png", source=f"/synthetic/{i:05d}.png", source_rel=f"{i:05d}.png",
                format="png", n_frames=1, status="ok", row=i, shard=i // shard_records,
                orig_height=size, orig_width=size, orig_dtype="uint8", channels=1, photometric="L",
                crop_height=size, crop_width=size, resize_mode="stretch", content_height=size, content_width=size,
                intensity_low=0.0, intensity_high=255.0, method="otsu", threshold=t, polarity="bright",
                fg_fraction=float(pm.mean()), qc_flags="fg_low" if degenerate else "", degenerate=degenerate,
                has_label=bool(has_label), label_status="ok" if has_label else "missing",
                label_fg_fraction=float(truth.mean()) if has_label else float("nan"),
                group=f"g{i:05d}", split=split,
            )
        )
    for shard in range(store.n_shards(n, shard_records)):
        a, b = store.shard_bounds(shard, shard_records, n)
        store.write_rows(group, a, {store.IMAGE: images[a:b], store.PSEUDO_MASK: pseudo[a:b], store.LABEL: labels[a:b]})
    manifest.write_table(manifest.rows_to_table(rows), manifest.manifest_path(path))
    manifest.write_json(
        {"schema_version": manifest.SCHEMA_VERSION, "counts": {"ok": n, "failed": 0, "skipped": 0}, "params": {"synthetic": True}},
        manifest.summary_path(path),
    )
    store.consolidate(path)
    return path


def write_blob_pngs(folder: str | Path, n: int, *, size: int = 96, seed: int = 0, masks: str | Path | None = None) -> list[Path]:
    """``n`` blob PNGs (and their true masks as {0,255} PNGs in ``masks``) with the same stems."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img, truth = blob_image(rng, size)
        p = folder / f"img{i:04d}.png"
        Image.fromarray(img).save(p)
        if masks is not None:
            Path(masks).mkdir(parents=True, exist_ok=True)
            Image.fromarray(truth.astype(np.uint8) * 255).save(Path(masks) / f"img{i:04d}.png")
        out.append(p)
    return out


TINY_ENCODER = "tu-mobilenetv3_small_100"  # the smallest encoder that builds offline: 0.59 s a CPU step, 8 x 224 px


def tiny_train_config(out_dir: str | Path, stores: dict[str, str | Path], /, **sections: Any) -> dict[str, Any]:
    """Trainer config data for a run that takes seconds on a CPU: the tiny encoder, 2 steps of 4 images per stage, one
    thread, no loader workers, no progress bars or TensorBoard; ``sections`` update it as :func:`with_sections` does."""
    base = {
        "out_dir": str(out_dir), "stores": {k: str(v) for k, v in stores.items()}, "model": {"encoder": TINY_ENCODER},
        "pretrain": {"steps": 2, "batch_size": 4, "log_every": 1},
        "finetune": {"steps": 2, "batch_size": 4, "log_every": 1},
        "evaluate": {"batch_size": 16, "overlays": 1},
        "runtime": {"num_workers": 0, "progress": False, "threads": 1, "tensorboard": False},
    }
    return with_sections(base, **sections)


def tiny_study_train(**sections: Any) -> dict[str, Any]:
    """A study file's ``train`` section for runs that take seconds on a CPU (the tiny encoder, 2-3 steps per stage,
    validation every fine-tune step, the best checkpoint evaluated); ``sections`` update it as :func:`with_sections`."""
    base = {
        "base": "cpu_small", "model": {"encoder": TINY_ENCODER},
        "pretrain": {"steps": 3, "batch_size": 4, "log_every": 1, "eval_every": 0},
        "finetune": {"steps": 2, "batch_size": 4, "log_every": 1, "eval_every": 1, "label_fraction": None},
        "evaluate": {"overlays": 0, "batch_size": 16, "checkpoint": "best"},
        "runtime": {"device": "cpu", "num_workers": 0, "threads": 1, "progress": False, "tensorboard": False},
    }
    return with_sections(base, **sections)


def with_sections(cfg: dict[str, Any], /, **sections: Any) -> dict[str, Any]:
    """A copy of ``cfg`` whose sections are updated key by key (a dict value) or replaced (any other value)."""
    out = dict(cfg)
    for key, value in sections.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def ct_small_nifti(path: Path) -> Path:
    """pydicom's real CT slice (CT_small.dcm, shipped in pydicom's wheel) as a one-slice NIfTI: stored values plus
    scl_slope/scl_inter, the RAS affine from the DICOM geometry, as a DICOM -> NIfTI converter writes it."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    row, col = (float(v) for v in ds.PixelSpacing)
    iop = np.array(ds.ImageOrientationPatient, float)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * col, iop[3:] * row
    lps[:3, 2] = np.cross(iop[:3], iop[3:]) * float(ds.SliceThickness)
    lps[:3, 3] = np.array(ds.ImagePositionPatient, float)
    img = nib.Nifti1Image(ds.pixel_array.T[:, :, None].astype(np.uint16), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)
    img.header.set_slope_inter(float(ds.RescaleSlope), float(ds.RescaleIntercept))
    nib.save(img, str(path))
    return Path(path)
