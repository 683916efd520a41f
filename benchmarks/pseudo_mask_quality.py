"""placeholder loader (being written)"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# dataset -> list of (subset, image glob, mask-path-from-image-path)
def _nuclei_mask(p: Path) -> Path:
    if p.suffix == ".tif":
        return p.parent.parent / "masks" / f"man_seg{p.stem[1:]}.tif"
    return p.parent.parent / "masks" / f"{p.stem.split('-', 1)[1]}.png"


def _sorted_pairs(folder: Path, img_pat: str, mask_pat: str) -> list[tuple[Path, Path]]:
    imgs = sorted((folder / "images").glob(img_pat))
    masks = sorted((folder / "masks").glob(mask_pat))
    if len(imgs) != len(masks):
        raise RuntimeError(f"{folder}: {len(imgs)} images but {len(masks)} masks")
    return list(zip(imgs, masks))


def pairs(dataset: str, root: Path = DATA) -> list[tuple[str, Path, Path]]:
    """(subset, image path, mask path) for one dataset, per its SOURCE.md pairing rule."""
    d = root / dataset
    out: list[tuple[str, Path, Path]] = []
    if dataset == "ph2_dermoscopy":
        for p in sorted((d / "images").glob("*.png")):
            out.append(("PH2", p, d / "masks" / f"{p.stem}_lesion.png"))
    elif dataset == "isic_sample":
        for p in sorted((d / "images").glob("*.jpg")):
            out.append(("ISIC", p, d / "masks" / f"{p.stem}.png"))
    elif dataset == "cxr_lungs":
        for p in sorted((d / "images").iterdir()):
            out.append(("CXR", p, d / "masks" / f"{p.stem}.png"))
    elif dataset == "nuclei_sample":
        for sub in ("N2DH-GOWT1", "N2DL-HeLa", "NIH3T3"):
            for p in sorted((d / sub / "images").iterdir()):
                out.append((sub, p, _nuclei_mask(p)))
    elif dataset == "retina_vessels":
        out += [("DRIVE", i, m) for i, m in _sorted_pairs(d / "DRIVE", "*_training.tif", "*_manual1.gif")]
        out += [("CHASE_DB1", i, m) for i, m in _sorted_pairs(d / "CHASE_DB1", "*.jpg", "*_1stHO.png")]
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    return out


def read_array(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        return tifffile.imread(path)
    with Image.open(path) as im:
        if im.mode in ("P", "PA", "1", "LA"):
            im = im.convert("RGB" if im.mode in ("P", "PA") else "L")
        return np.asarray(im)


def to_gray(a: np.ndarray) -> np.ndarray:
    """Colour -> float32 BT.601 luma; single-channel stays at its native dtype."""
    if a.ndim == 3:
        rgb = a[..., :3].astype(np.float32)
        return rgb[..., 0] * np.float32(0.299) + rgb[..., 1] * np.float32(0.587) + rgb[..., 2] * np.float32(0.114)
    return a


def load_gt(path: Path) -> np.ndarray:
    m = read_array(path)
    if m.ndim == 3:
        m = m[..., :3].max(axis=-1)
    return m > 0
