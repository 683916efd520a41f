"""Digests of the stores build-masks makes from the real data sets: the check that a refactor changed no stored byte.

    python benchmarks/store_identity.py --out /tmp/before.json            # build every dataset file, write digests
    python benchmarks/store_identity.py --out /tmp/after.json
    python benchmarks/store_identity.py --compare /tmp/before.json /tmp/after.json
    python benchmarks/store_identity.py --set threshold.polarity=auto --out /tmp/x.json   # across a default change

Each dataset file of data_manifests/ whose inputs exist (../shared/data) is built with a fixed salt and one worker
into a scratch folder; per store it records the sha256 of every array's decoded bytes and of the manifest's
content (all columns, rows in order). ``--compare`` prints one line per store and exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def store_digests(path: Path) -> dict[str, str]:
    import numpy as np
    import zarr

    from medsass.manifest import read_manifest

    out = {}
    group = zarr.open_group(str(path), mode="r")
    for name, arr in sorted(group.arrays()):
        out[name] = hashlib.sha256(np.ascontiguousarray(arr[...]).tobytes()).hexdigest()[:16]
    for sub_name, sub in sorted(group.groups()):
        for name, arr in sorted(sub.arrays()):
            out[f"{sub_name}/{name}"] = hashlib.sha256(np.ascontiguousarray(arr[...]).tobytes()).hexdigest()[:16]
    df = read_manifest(path)
    out["manifest"] = hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()[:16]
    out["records"] = str(int((df["row"] >= 0).sum()))
    return out


def build_all(names: list[str], scratch: Path, overrides: list[str] = ()) -> dict[str, dict[str, str]]:
    from medsass.pipeline.build import build
    from medsass.pipeline.config import load_dataset_file

    result = {}
    for ds in sorted((ROOT / "data_manifests").glob("*.yaml")):
        if names and ds.stem not in names:
            continue
        out = scratch / f"{ds.stem}.zarr"
        try:
            cfg = load_dataset_file(ds, ["runtime.salt=store-identity", "runtime.workers=1", "runtime.progress=false", f"out={out}", *overrides])
        except Exception as exc:  # noqa: BLE001 - a dataset whose inputs are absent here
            print(f"skip {ds.stem}: {exc}", file=sys.stderr)
            continue
        if not all(Path(s.path).exists() for s in cfg.sources):
            print(f"skip {ds.stem}: inputs not here", file=sys.stderr)
            continue
        build(cfg)
        result[ds.stem] = store_digests(out)
        print(f"{ds.stem}: {result[ds.stem]}", file=sys.stderr)
    return result


def compare(a: dict, b: dict) -> int:
    bad = 0
    for name in sorted(set(a) | set(b)):
        same = a.get(name) == b.get(name)
        bad += not same
        print(f"{name}: {'identical' if same else 'DIFFERENT'} ({a.get(name, {}).get('records', '?')} records)")
        if not same and name in a and name in b:
            for k in sorted(set(a[name]) | set(b[name])):
                if a[name].get(k) != b[name].get(k):
                    print(f"    {k}: {a[name].get(k)} != {b[name].get(k)}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the digests here (JSON)")
    ap.add_argument("--datasets", default="", help="comma-separated dataset file names (default: all whose inputs exist)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a dataset-file override for every build (e.g. threshold.polarity=auto: the default before 2026-12-05)")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*(json.loads(p.read_text()) for p in args.compare))
    if args.out is None:
        ap.error("--out or --compare")
    with tempfile.TemporaryDirectory(prefix="store_identity_") as tmp:
        digests = build_all([n for n in args.datasets.split(",") if n], Path(tmp), args.overrides)
    args.out.write_text(json.dumps(digests, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
