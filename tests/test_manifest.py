import json

import numpy as np
import pytest
import zarr

from medsass import manifest, store
from medsass.errors import StoreError
from medsass.testing import make_synthetic_store


def test_rows_roundtrip_and_defaults(tmp_path):
    rows = [manifest.empty_row(sample_id="a", status="ok", row=0, threshold=12.5, has_label=True),
            manifest.empty_row(sample_id="b", status="failed", reason="bad", reason_code="decode_error")]
    path = tmp_path / "m.parquet"
    manifest.write_table(manifest.rows_to_table(rows), path)
    back = manifest.read_table(path).to_pylist()
    assert back[0]["threshold"] == 12.5 and back[0]["has_label"] is True and back[1]["row"] == -1
    assert np.isnan(back[1]["threshold"])
    with pytest.raises(KeyError, match="unknown manifest column"):
        manifest.empty_row(not_a_column=1)


def test_synthetic_store_opens_with_plain_zarr(tmp_path):
    p = make_synthetic_store(tmp_path / "s.zarr", n=20, size=16, shard_records=8)
    g = zarr.open_group(str(p), mode="r")
    assert g["image"].shape == (20, 16, 16) and g["image"].shards == (8, 16, 16) and g["image"].chunks == (1, 16, 16)
    assert set(np.unique(g["pseudo_mask"][:])) <= {0, 1}
    df = manifest.read_manifest(p)
    assert len(df) == 20 and (df.row == np.arange(20)).all()


def test_unknown_schema_version_is_refused(tmp_path):
    p = make_synthetic_store(tmp_path / "s.zarr", n=4, size=16)
    summary = json.loads((p / "manifest.json").read_text())
    summary["schema_version"] = 99
    (p / "manifest.json").write_text(json.dumps(summary))
    with pytest.raises(StoreError, match="schema version 99"):
        manifest.read_manifest(p)


def test_foreign_store_is_refused(tmp_path):
    zarr.open_group(str(tmp_path / "x.zarr"), mode="w").create_array("a", shape=(2,), dtype="uint8")
    with pytest.raises(StoreError, match="not a medsass store"):
        store.open_store(tmp_path / "x.zarr")
    with pytest.raises(StoreError, match="not a Zarr v3 store"):
        store.open_store(tmp_path / "missing.zarr")


def test_every_column_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "data_manifests" / "SCHEMA.md").read_text()
    for name in manifest.COLUMNS:
        assert f"| `{name}` |" in doc, f"manifest column {name} is missing from data_manifests/SCHEMA.md"
