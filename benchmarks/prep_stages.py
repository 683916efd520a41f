"""Per-image time of each prep stage on one DICOM, in one process, with the library functions called directly.

    python benchmarks/prep_stages.py FILE.dcm [--repeat 7]

Stages: hash (sha256 of the file), decode (pydicom's pixel decode alone), read (medsass's DICOM reader: decode plus
modality/VOI LUTs and MONOCHROME1 inversion; ``lut`` = read - decode), uint8 (the stored image's intensity mapping),
otsu and fov_otsu_hull (the pseudo-mask methods), place (resize of image and mask to the 256 px canvas) and the
whole per-file function (process_entry: hash + read + default method + uint8 + place). Best of ``--repeat`` runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _best_ms(fn, repeat: int) -> float:
    fn()  # warm up (imports, allocator)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)  # the machine's noise only adds time (timeit's rule)


def stage_times(path: Path, repeat: int = 7) -> dict[str, float]:
    from pydicom import dcmread

    from medsass import manifest
    from medsass.pipeline import geometry
    from medsass.pipeline.intensity import to_uint8
    from medsass.pipeline.readers import read
    from medsass.pipeline.threshold import pseudo_mask

    out: dict[str, float] = {}
    out["hash"] = _best_ms(lambda: manifest.file_digest(path), repeat)
    out["decode"] = _best_ms(lambda: dcmread(path).pixel_array, repeat)
    out["read"] = _best_ms(lambda: read(path, "dicom"), repeat)
    out["lut"] = out["read"] - out["decode"]
    frame = read(path, "dicom")[0]
    gray = frame.pixels
    orig = str(frame.meta.get("orig_dtype", ""))
    # the frame's levels (codes into its LUT table) where this version of prep has them
    levels = getattr(frame, "levels", None)

    def lv() -> dict:  # a fresh copy each call: the histogram of the codes is cached on the object
        return {"levels": type(levels)(levels.codes, levels.values)} if levels is not None else {}

    out["uint8"] = _best_ms(lambda: to_uint8(gray, "percentile", orig, **lv()), repeat)
    out["otsu"] = _best_ms(lambda: pseudo_mask(gray, method="otsu", **lv()), repeat)
    out["fov_otsu_hull"] = _best_ms(lambda: pseudo_mask(gray, method="fov_otsu_hull", **lv()), repeat)
    u8 = to_uint8(gray, "percentile", orig, **lv())[0]
    mask = pseudo_mask(gray, method="fov_otsu_hull", **lv()).mask
    place = geometry.placements(gray.shape, 256, "stretch")[0]
    out["place"] = _best_ms(lambda: (geometry.place_image(u8, place, 256), geometry.place_mask(mask, place, 256)), repeat)
    out["process_entry"] = _best_ms(lambda: _process(path), repeat)
    out["gray_dtype"] = str(gray.dtype)  # type: ignore[assignment]
    return out


def _process(path: Path) -> None:
    from medsass.pipeline.process import process_entry

    process_entry(_entry(path), [0], _PARAMS, strict=True)


_PARAMS = {"geometry": {"size": 256, "tile": False, "resize": "stretch", "tile_overlap": 0, "max_pixels": 1 << 28},
           "threshold": {"method": "fov_otsu_hull", "polarity": "auto", "intensity": "percentile"}}
_ENTRIES: dict[Path, object] = {}


def _entry(path: Path):
    if path not in _ENTRIES:
        from medsass.pipeline.plan import PlanEntry
        from medsass.pipeline.readers import probe

        p = probe(path, "dicom")
        _ENTRIES[path] = PlanEntry(
            source=str(path), root=str(path.parent), rel=path.name, sample_base=path.stem, source_index=0,
            size_bytes=path.stat().st_size, mtime_ns=path.stat().st_mtime_ns, format="dicom", n_frames=p.n_frames,
            height=p.shape[0], width=p.shape[1], records_per_frame=1, n_records=1, row_start=0, split="train",
            label_status="none", photometric=p.meta.get("photometric") or "", modality=p.meta.get("modality") or "")
    return _ENTRIES[path]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for f in args.files:
        res = stage_times(f, args.repeat)
        if args.json:
            print(json.dumps({"file": str(f), **res}))
        else:
            print(f"{f}: " + ", ".join(f"{k} {v:.1f} ms" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
