"""How good are threshold pseudo-masks on real images with expert masks, and does polarity="auto" pick the
right side?

For every image/mask pair of the datasets in ../shared/data (pairing rules from each SOURCE.md), and for every
method of medsass.pipeline.threshold, it computes the per-image IoU against the expert mask for four polarities:
auto (the module's rule), bright, dark, and oracle (the better of bright and dark for that image), then prints
the mean IoU per dataset (and per subset) and how often auto picked the oracle's side.

    python benchmarks/pseudo_mask_quality.py                        # all datasets, all methods
    python benchmarks/pseudo_mask_quality.py --datasets ph2_dermoscopy cxr_lungs --methods otsu
    python benchmarks/pseudo_mask_quality.py --out /tmp/tables.md --timing --rules

Grayscale: colour images become float32 BT.601 luma (0.299 R + 0.587 G + 0.114 B; alpha dropped); single-channel
images keep their dtype (8-bit, 16-bit). Expert masks: binary GT = mask > 0 (instance labels included). The
expert masks are used for measuring only; nothing here feeds them back into the thresholding.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from medsass.metrics import mask_iou
from medsass.pipeline import threshold as th
from PIL import Image

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = ("ph2_dermoscopy", "isic_sample", "nuclei_sample", "retina_vessels", "cxr_lungs", "sample")
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "dsb2018_nuclei"  # the bundled CC0 nuclei tiles
POLARITIES = ("auto", "oracle", "bright", "dark")


# ----------------------------------------------------------------------------- data


def pairs(dataset: str, root: Path = DATA) -> list[tuple[str, Path, Path]]:
    """(subset, image path, mask path) for one dataset, following its SOURCE.md pairing rule."""
    d = root / dataset
    if dataset == "sample":
        return [("DSB2018", p, SAMPLE / "masks" / p.name) for p in sorted((SAMPLE / "images").glob("*.tif"))]
    if dataset == "ph2_dermoscopy":
        return [("PH2", p, d / "masks" / f"{p.stem}_lesion.png") for p in sorted((d / "images").glob("*.png"))]
    if dataset == "isic_sample":
        return [("ISIC", p, d / "masks" / f"{p.stem}.png") for p in sorted((d / "images").glob("*.jpg"))]
    if dataset == "cxr_lungs":
        return [("CXR", p, d / "masks" / f"{p.stem}.png") for p in sorted((d / "images").iterdir())]
    if dataset == "nuclei_sample":
        out = []
        for sub in ("N2DH-GOWT1", "N2DL-HeLa", "NIH3T3"):
            for p in sorted((d / sub / "images").iterdir()):
                if p.suffix == ".tif":  # tNN.tif <-> man_segNN.tif
                    m = p.parent.parent / "masks" / f"man_seg{p.stem[1:]}.tif"
                else:  # dna-N.png <-> N.png
                    m = p.parent.parent / "masks" / f"{p.stem.split('-', 1)[1]}.png"
                out.append((sub, p, m))
        return out
    if dataset == "retina_vessels":  # sorted order pairs them within each subfolder
        out = []
        for sub, img_glob, mask_glob in (("DRIVE", "*_training.tif", "*_manual1.gif"),
                                         ("CHASE_DB1", "*.jpg", "*_1stHO.png")):
            imgs = sorted((d / sub / "images").glob(img_glob))
            masks = sorted((d / sub / "masks").glob(mask_glob))
            if len(imgs) != len(masks):
                raise RuntimeError(f"{d / sub}: {len(imgs)} images but {len(masks)} masks")
            out += [(sub, i, m) for i, m in zip(imgs, masks)]
        return out
    raise ValueError(f"unknown dataset {dataset!r}. Available options are: {', '.join(DATASETS)}")


def read_array(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        return tifffile.imread(path)
    with Image.open(path) as im:
        if im.mode in ("P", "PA"):
            im = im.convert("RGB")
        elif im.mode in ("1", "LA"):
            im = im.convert("L")
        return np.asarray(im)


def to_gray(a: np.ndarray) -> np.ndarray:
    """Colour -> float32 BT.601 luma; single-channel images keep their dtype."""
    if a.ndim == 3:
        rgb = a[..., :3].astype(np.float32)
        return rgb[..., 0] * np.float32(0.299) + rgb[..., 1] * np.float32(0.587) + rgb[..., 2] * np.float32(0.114)
    return a


def load_gt(path: Path) -> np.ndarray:
    m = read_array(path)
    if m.ndim == 3:
        m = m[..., :3].max(axis=-1)
    return m > 0


# ----------------------------------------------------------------------------- measuring


iou = mask_iou  # the one IoU (medsass.metrics): 1 when both masks are empty


@dataclass
class Row:
    dataset: str
    subset: str
    name: str
    method: str
    iou: dict[str, float]  # polarity -> IoU
    auto_side: str
    oracle_side: str

    @property
    def agree(self) -> bool:  # ties count as agreement
        return self.iou["auto"] >= self.iou["oracle"] - 1e-12


def measure(gray: np.ndarray, gt: np.ndarray, method: str) -> tuple[dict[str, float], str, str]:
    res = {p: th.pseudo_mask(gray, method=method, polarity=p) for p in ("auto", "bright", "dark")}
    ious = {p: iou(r.mask, gt) for p, r in res.items()}
    oracle_side = "bright" if ious["bright"] >= ious["dark"] else "dark"
    ious["oracle"] = ious[oracle_side]
    return ious, res["auto"].polarity, oracle_side


def run(datasets, methods, root: Path = DATA, log=sys.stderr) -> list[Row]:
    rows = []
    for ds in datasets:
        for subset, img_path, mask_path in pairs(ds, root):
            gray, gt = to_gray(read_array(img_path)), load_gt(mask_path)
            if gray.shape != gt.shape:
                raise RuntimeError(f"{img_path}: image {gray.shape} and mask {gt.shape} differ")
            for m in methods:
                ious, auto_side, oracle_side = measure(gray, gt, m)
                rows.append(Row(ds, subset, img_path.name, m, ious, auto_side, oracle_side))
            print(f"  {ds}/{subset}/{img_path.name}", file=log, flush=True)
    return rows


# ----------------------------------------------------------------------------- reporting


def summary_table(rows: list[Row], methods) -> str:
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        groups[(r.dataset, "all")].append(r)
        groups[(r.dataset, r.subset)].append(r)
    lines = ["| dataset | subset | n | method | auto | oracle | bright | dark | auto = oracle side |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for (ds, sub), rs in groups.items():
        subsets = {r.subset for r in rows if r.dataset == ds}
        if sub != "all" and len(subsets) == 1:
            continue
        for m in methods:
            mr = [r for r in rs if r.method == m]
            if not mr:
                continue
            mean = {p: np.mean([r.iou[p] for r in mr]) for p in POLARITIES}
            agree = sum(r.agree for r in mr)
            lines.append(f"| {ds} | {sub} | {len(mr)} | {m} | {mean['auto']:.3f} | {mean['oracle']:.3f} | "
                         f"{mean['bright']:.3f} | {mean['dark']:.3f} | {agree}/{len(mr)} ({agree / len(mr):.0%}) |")
    return "\n".join(lines)


def disagreements(rows: list[Row], method: str = "otsu") -> str:
    lines = ["| dataset | image | auto | oracle | IoU bright | IoU dark |", "|---|---|---|---|---:|---:|"]
    for r in rows:
        if r.method == method and not r.agree:
            lines.append(f"| {r.dataset} | {r.name} | {r.auto_side} | {r.oracle_side} | "
                         f"{r.iou['bright']:.3f} | {r.iou['dark']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- alternative polarity rules


def _alternative_sides(gray: np.ndarray, t: float) -> dict[str, str]:
    """Simpler polarity rules measured against the module's one (all on a <=256 px strided copy)."""
    from skimage.segmentation import clear_border

    step = max(1, -(-max(gray.shape) // 256))
    b = gray[::step, ::step] > t
    d = ~b
    edge = np.concatenate([b[0], b[-1], b[:, 0], b[:, -1]])
    h, w = b.shape
    yy, xx = np.ogrid[:h, :w]
    centre = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 < 0.25
    return {
        # the side touching the image border less is foreground
        "border": "bright" if edge.mean() < 0.5 else "dark",
        # the side with more area in components not touching the border (clear_border) is foreground
        "interior": "bright" if clear_border(b).sum() > clear_border(d).sum() else "dark",
        # the smaller side is foreground
        "minority": "bright" if b.mean() < 0.5 else "dark",
        # the side over-represented in the central disc is foreground
        "centre": "bright" if b[centre].mean() > b.mean() else "dark",
    }


def compare_rules(datasets, root: Path = DATA) -> str:
    """auto = oracle agreement (plain Otsu) of simple rules and of choose_polarity, per dataset."""
    names = ("border", "interior", "minority", "centre", "choose_polarity")
    lines = ["| dataset | n | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for ds in datasets:
        hits = dict.fromkeys(names, 0)
        items = pairs(ds, root)
        for _, img_path, mask_path in items:
            gray, gt = to_gray(read_array(img_path)), load_gt(mask_path)
            t = th.pseudo_mask(gray, polarity="bright").threshold
            ib, idk = iou(gray > t, gt), iou(gray <= t, gt)
            sides = _alternative_sides(gray, t) | {"choose_polarity": th.choose_polarity(gray, t)}
            for n in names:
                hits[n] += (ib if sides[n] == "bright" else idk) >= max(ib, idk) - 1e-12
        lines.append(f"| {ds} | {len(items)} | " + " | ".join(f"{hits[n]}/{len(items)}" for n in names) + " |")
    return "\n".join(lines)


def timing(root: Path = DATA, repeat: int = 200) -> str:
    """Median time per 512x512 uint8 image (a real PH2 image resized) on this machine."""
    from skimage.filters import threshold_otsu

    img = read_array(pairs("ph2_dermoscopy", root)[0][1])
    gray = np.asarray(Image.fromarray(to_gray(img).round().astype(np.uint8)).resize((512, 512)))
    t = threshold_otsu(gray)

    def med(f) -> float:
        f()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) * 1e3

    cases = [
        ("skimage threshold_otsu", lambda: threshold_otsu(gray)),
        ("choose_polarity (rule only)", lambda: th.choose_polarity(gray, t)),
        ("pseudo_mask otsu, polarity=bright", lambda: th.pseudo_mask(gray, polarity="bright")),
        ("pseudo_mask otsu, polarity=auto", lambda: th.pseudo_mask(gray, polarity="auto")),
    ]
    cases += [(f"pseudo_mask {m}, polarity=auto", (lambda m=m: th.pseudo_mask(gray, method=m)))
              for m in th.METHODS if m != "otsu"]
    lines = ["| what (512x512 uint8) | median ms |", "|---|---:|"]
    lines += [f"| {name} | {med(f):.2f} |" for name, f in cases]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--methods", nargs="+", default=list(th.METHODS), choices=th.METHODS)
    ap.add_argument("--root", type=Path, default=DATA, help="folder holding the datasets (default ../shared/data)")
    ap.add_argument("--out", type=Path, help="also write the markdown to this file")
    ap.add_argument("--timing", action="store_true", help="add a timing table (512x512 uint8)")
    ap.add_argument("--rules", action="store_true", help="add a table comparing simpler polarity rules")
    args = ap.parse_args(argv)

    rows = run(args.datasets, args.methods, args.root)
    parts = ["## Mean per-image IoU vs expert masks, and auto-polarity agreement", "",
             summary_table(rows, args.methods), "",
             "## Images where auto and oracle sides differ (method otsu)", "",
             disagreements(rows, "otsu" if "otsu" in args.methods else args.methods[0]), ""]
    if args.rules:
        parts += ["## Simpler polarity rules vs choose_polarity (plain Otsu, auto = oracle side)", "",
                  compare_rules(args.datasets, args.root), ""]
    if args.timing:
        parts += ["## Timing", "", timing(args.root), ""]
    text = "\n".join(parts)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"<!-- generated by: python benchmarks/pseudo_mask_quality.py "
                            f"{' '.join(argv if argv is not None else sys.argv[1:])} -->\n\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
