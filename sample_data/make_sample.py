#!/usr/bin/env python3
"""Regenerate ``sample_data/dsb2018_nuclei`` from the files that the ``stardist`` package ships.

What the source is: ``stardist/data/images/img2d.tif`` and ``stardist/data/images/mask2d.tif``
inside stardist 0.9.2 (wheel or sdist from PyPI). The two files are one 512x512 fluorescence
image of nuclei and its human-made instance mask, taken by StarDist from the 2018 Data Science
Bowl training set (BBBC038v1, CC0 1.0). See SOURCE.md next to this script.

What this does: checks both files against their known sha256, cuts them into 4x4 non-overlapping
128x128 tiles (no resampling, no intensity change, same dtype uint16), and writes

    dsb2018_nuclei/images/dsb2018_r{row}c{col}.tif   fluorescence tile (uint16, values 0..235)
    dsb2018_nuclei/masks/dsb2018_r{row}c{col}.tif    instance labels  (uint16, 0 = background)
    dsb2018_nuclei/SHA256SUMS                        sha256 of every written file

plus ``LICENSE-stardist-BSD-3-Clause.txt`` when the package carries its licence file.

How to run it (any one of these):

    pip download --no-deps stardist==0.9.2 -d /tmp/dl        # wheel for this platform
    python sample_data/make_sample.py /tmp/dl/stardist-0.9.2-*.whl

    pip download --no-deps --no-binary :all: --no-build-isolation stardist==0.9.2 -d /tmp/dl
    python sample_data/make_sample.py /tmp/dl/stardist-0.9.2.tar.gz     # sdist works too

    python sample_data/make_sample.py            # runs the pip download above into a temp dir

    python sample_data/make_sample.py --check    # only verify the committed files (no download)

Needs only numpy and tifffile (both project dependencies); stardist itself is never imported.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import tifffile

STARDIST_VERSION = "0.9.2"
MEMBERS = {
    "image": ("stardist/data/images/img2d.tif",
              "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750"),
    "mask": ("stardist/data/images/mask2d.tif",
             "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"),
}
LICENSE_MEMBERS = ("stardist-0.9.2.dist-info/licenses/LICENSE.txt", "LICENSE.txt")
TILE = 128
NAME = "dsb2018_nuclei"
HERE = Path(__file__).resolve().parent


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_members(archive: Path) -> dict[str, bytes]:
    """Bytes of the wanted members (matched by path suffix) from a wheel, an sdist or a folder."""
    wanted = [m for m, _ in MEMBERS.values()] + list(LICENSE_MEMBERS)
    found: dict[str, bytes] = {}

    def take(name: str, read) -> None:
        # an sdist prefixes every path with "stardist-<version>/"
        rel = name.split("/", 1)[1] if name.startswith("stardist-") and "/" in name else name
        if name in wanted:
            found.setdefault(name, read())
        elif rel in wanted:
            found.setdefault(rel, read())

    if archive.is_dir():
        root = archive if (archive / "stardist").is_dir() else archive.parent
        for w in wanted:
            p = root / w
            if p.is_file():
                found[w] = p.read_bytes()
    elif archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for n in z.namelist():
                take(n, lambda n=n: z.read(n))
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile():
                    take(m.name, lambda m=m: t.extractfile(m).read())
    return found


def _download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           f"stardist=={STARDIST_VERSION}", "-d", str(dest)]
    print("+", " ".join(cmd))
    subprocess.run(cmd, check=True)
    files = sorted(dest.glob("stardist-*"))
    if not files:
        sys.exit("pip download produced no stardist file")
    return files[0]


def _tiles(a: np.ndarray):
    h, w = a.shape
    for r in range(h // TILE):
        for c in range(w // TILE):
            yield f"dsb2018_r{r}c{c}", a[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]


def build(source: Path, out: Path) -> None:
    found = _read_members(source)
    arrays = {}
    for key, (member, digest) in MEMBERS.items():
        if member not in found:
            sys.exit(f"{member} not found in {source}")
        if _sha256(found[member]) != digest:
            sys.exit(f"{member}: sha256 mismatch (expected {digest}); not stardist {STARDIST_VERSION}?")
        arrays[key] = tifffile.imread(io.BytesIO(found[member]))
    img, mask = arrays["image"], arrays["mask"]
    assert img.shape == mask.shape == (512, 512) and img.dtype == mask.dtype == np.uint16

    dest = out / NAME
    sums = []
    for sub, arr in (("images", img), ("masks", mask)):
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for stem, tile in _tiles(arr):
            path = dest / sub / f"{stem}.tif"
            tifffile.imwrite(path, np.ascontiguousarray(tile), photometric="minisblack")
            sums.append(f"{_sha256(path.read_bytes())}  {sub}/{stem}.tif")
    (dest / "SHA256SUMS").write_text("\n".join(sums) + "\n")

    for lic in LICENSE_MEMBERS:
        if lic in found:
            (out / "LICENSE-stardist-BSD-3-Clause.txt").write_bytes(found[lic])
            break
    n = len(sums) // 2
    print(f"wrote {n} image/mask pairs of {TILE}x{TILE} uint16 to {dest}")


def check(out: Path) -> int:
    dest = out / NAME
    bad = 0
    for line in (dest / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split(maxsplit=1)
        p = dest / rel
        if not p.is_file() or _sha256(p.read_bytes()) != digest:
            print("MISMATCH", rel)
            bad += 1
    print("ok" if not bad else f"{bad} file(s) differ")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", nargs="?", type=Path,
                    help="stardist wheel/sdist or unpacked folder; omitted: pip download it")
    ap.add_argument("--out", type=Path, default=HERE, help="sample_data folder (default: here)")
    ap.add_argument("--check", action="store_true", help="only verify files against SHA256SUMS")
    args = ap.parse_args()
    if args.check:
        return check(args.out)
    if args.source is not None:
        build(args.source, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build(_download(Path(tmp)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
