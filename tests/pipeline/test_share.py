"""``medsass-prep share``: a copy of a store that names no patient, file, folder or date, and trains as the original.

The hospital here is a clinical export as they come: folders named after the patient and the study date, DICOM
headers full of names, IDs, dates and UIDs, one broken file (a failure reason) and one text file (a skip). Every
byte of the shared copy is then searched for each of those values.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import stat

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
import torch
import zarr
from click.testing import CliRunner
from medsass.pipeline.build import build
from medsass.pipeline.cli import main
from medsass.pipeline.config import BuildConfig, InputSource, LabelSource
from medsass.pipeline.share import COLUMN_POLICY, share_store
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medsass import manifest
from medsass.errors import StoreError

TINY = "tu-mobilenetv3_small_100"
# last, first, MRN, birth date, study date, accession number
PATIENTS = [
    ("Doelington", "Janessa", "MRN4815162", "19710415", "20240301", "ACC90817263"),
    ("Smithfield", "Robertson", "MRN2342108", "19650923", "20231117", "ACC55320194"),
    ("Garciaz", "Mariabella", "MRN7788990", "19880102", "20220630", "ACC11223344"),
    ("Nakamurai", "Kenjiro", "MRN5566771", "19590711", "20240212", "ACC66778899"),
    ("Okonkwoh", "Chidimma", "MRN3141592", "19930528", "20210909", "ACC24681357"),
]
INSTITUTION, PHYSICIAN = "Saint Elsewhere Hospital", "Strangelove^Merkin"


def date_forms(d: str) -> list[str]:
    y, m, day = d[:4], d[4:6], d[6:]
    return [d, f"{y}-{m}-{day}", f"{y}/{m}/{day}", f"{day}.{m}.{y}", f"{m}/{day}/{y}", f"{day}/{m}/{y}"]


def make_export(root, masks) -> list[str]:
    """The export and its masks; returns every identifying value written (header values, folder and file names)."""
    src = get_testdata_file("CT_small.dcm", download=False)
    tokens = [INSTITUTION, "Elsewhere", PHYSICIAN, "Strangelove", "Merkin"]
    for p, (last, first, mrn, birth, study, acc) in enumerate(PATIENTS):
        iso = f"{study[:4]}-{study[4:6]}-{study[6:]}"
        rel = f"{last}^{first}_{mrn}/{iso}"
        (root / rel).mkdir(parents=True)
        (masks / rel).mkdir(parents=True)
        study_uid, series_uid = generate_uid(), generate_uid()
        tokens += [last, first, f"{last}^{first}", f"{first} {last}", mrn, mrn[3:], acc, study_uid, series_uid,
                   f"{last}^{first}_{mrn}", *date_forms(birth), *date_forms(study)]
        for k in range(3):
            ds = pydicom.dcmread(src)
            ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = f"{last}^{first}", mrn, birth, acc
            ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study
            ds.StudyTime, ds.InstitutionName, ds.ReferringPhysicianName = "101500", INSTITUTION, PHYSICIAN
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            pixels = np.roll(ds.pixel_array, (9 * k + 5 * p, 4 * p), axis=(0, 1)).astype(ds.pixel_array.dtype)
            ds.PixelData = pixels.tobytes()
            stem = f"CT_{last}_{study}_{k}"
            ds.save_as(root / rel / f"{stem}.dcm")
            Image.fromarray((pixels > np.median(pixels)).astype(np.uint8) * 255).save(masks / rel / f"{stem}.png")
            tokens += [stem, f"{stem}.dcm", f"{stem}.png", str(ds.SOPInstanceUID)]
        if p == 0:
            whole = (root / rel / f"{stem}.dcm").read_bytes()
            (root / rel / f"CT_{last}_broken.dcm").write_bytes(whole[:-10000])  # pixel data cut short: failed
            (root / rel / f"notes_{last}_{study}.txt").write_text(f"{first} {last} {mrn} seen {iso}\n")  # skipped
            tokens += [f"CT_{last}_broken", f"notes_{last}_{study}"]
        if p == 1:  # PNG magic, then garbage: Pillow's error quotes the whole path, and so does the failure reason
            (root / rel / f"photo_{last}_{study}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2)
            tokens += [f"photo_{last}_{study}"]
    for base in (root, masks):  # every folder above the files, and the full paths
        tokens += [str(base)] + [part for part in base.parts if len(part) >= 5]
    return sorted(set(tokens))


@pytest.fixture(scope="module")
def hospital(tmp_path_factory, dask_scheduler):
    tmp = tmp_path_factory.mktemp("hospital")
    root, masks = tmp / "pacs_export_ward7", tmp / "masks_ward7"
    tokens = make_export(root, masks)
    original = tmp / "ct.zarr"
    cfg = BuildConfig(sources=[InputSource(path=str(root), labels=LabelSource(dir=str(masks)))], out=str(original))
    cfg.runtime.scheduler, cfg.runtime.progress, cfg.geometry.size = dask_scheduler, False, 64
    result = build(cfg)
    assert result.counts == {"ok": 15, "failed": 2, "skipped": 1}, result.counts
    ckpt = _relabel(original, tmp / "Doelington^Janessa_MRN4815162_runs")  # a path that names a patient
    tokens += [str(ckpt.parent), ckpt.parent.name]
    df = manifest.read_manifest(original)
    tokens += [s for s in set(df.sample_id) | set(df.group) if s]
    tokens.append((original / "_medsass" / "salt").read_text().strip())
    shared = tmp / "shared.zarr"
    res = CliRunner().invoke(main, ["share", str(original), str(shared)])
    assert res.exit_code == 0, res.output
    return {"tmp": tmp, "root": root, "original": original, "shared": shared, "tokens": sorted(set(tokens))}


def _relabel(store, folder):
    """A self-training round (pseudo_labels/round1 with its sidecar and provenance) from a checkpoint in ``folder``."""
    from medsass.trainer import checkpoint as ckpt_mod
    from medsass.trainer.config import load_config
    from medsass.trainer.model import build_model, model_args
    from medsass.trainer.selftrain import relabel

    torch.manual_seed(0)
    cfg = load_config({"out_dir": "x", "stores": {"s": "x"}, "model": {"encoder": TINY}})
    model = build_model(cfg.model)
    path = folder / "final.pt"
    folder.mkdir()
    ckpt_mod.save(path, {"model": model.state_dict(), "model_args": model_args(cfg.model), "step": 3})
    relabel(store, path, "round1", splits=["train", "val"], round=1, threshold="match_fg")
    return path


def every_byte(folder) -> dict[str, bytes]:
    """Raw bytes of every file, its name, decoded parquet tables, and every array of the Zarr group, decompressed."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, folder)
            out[rel] = rel.encode() + b"\n" + open(path, "rb").read()
            if f.endswith(".parquet"):
                out[rel + " (table)"] = pq.read_table(path).to_pandas().to_csv().encode()
    group = zarr.open_group(str(folder), mode="r")
    for name, arr in group.arrays():
        out[f"{name} (array)"] = np.asarray(arr[:]).tobytes() + json.dumps(dict(arr.attrs)).encode()
    for name, sub in group.groups():
        for child, arr in sub.arrays():
            out[f"{name}/{child} (array)"] = np.asarray(arr[:]).tobytes() + json.dumps(dict(arr.attrs)).encode()
    out["attrs"] = json.dumps(dict(group.attrs)).encode()
    return out


def hits(blobs: dict[str, bytes], tokens: list[str]) -> list[str]:
    low = {k: v.lower() for k, v in blobs.items()}
    return [f"{t!r} in {k}" for t in tokens for k, v in low.items() if t.lower().encode() in v]


def test_every_byte_of_the_shared_copy_is_free_of_names_ids_dates_and_paths(hospital):
    tokens = hospital["tokens"]
    before = hits(every_byte(hospital["original"]), tokens)
    assert any("Doelington^Janessa_MRN4815162" in h for h in before)  # the search finds them where they are
    assert any("pacs_export_ward7" in h for h in before) and any("CT_Doelington_broken" in h for h in before)
    found = hits(every_byte(hospital["shared"]), tokens)
    assert not found, "identifying values in the shared copy:\n" + "\n".join(found[:40])
    assert not (hospital["shared"] / "_medsass").exists()


def test_the_copy_keeps_records_pixels_and_placement_and_maps_back_privately(hospital):
    original, shared = hospital["original"], hospital["shared"]
    a, b = manifest.read_manifest(original), manifest.read_manifest(shared)
    same = [c for c, p in COLUMN_POLICY.items() if p in ("keep", "code") and c in manifest.COLUMNS]  # no volumes here
    assert list(b.columns) == list(manifest.COLUMNS)
    assert a[same].equals(b[same])
    assert b.sample_id.str.fullmatch(r"rec-[0-9a-f]{20}").all() and b.sample_id.is_unique
    assert (b.source_rel == "").all() and (b.label_source == "").all() and (b.source_bytes == -1).all()
    failed = b[b.status == "failed"]
    assert sorted(failed.reason) == sorted(failed.reason_code) == ["decode_error", "truncated"]
    assert any("photo_Smithfield_20231117.png" in r for r in a.reason)  # as the original has it
    assert a.groupby("source").ngroups == b.groupby("source").ngroups  # records of one file still share a source
    assert (a.group.factorize()[0] == b.group.factorize()[0]).all() and not (set(a.group) & set(b.group)) - {""}
    ga, gb = zarr.open_group(str(original), mode="r"), zarr.open_group(str(shared), mode="r")
    for name in ("image", "pseudo_mask", "label", "pseudo_labels/round1"):
        assert np.array_equal(ga[name][:], gb[name][:]), name
    assert gb["pseudo_labels/round1"].attrs["medsass"] == ga["pseudo_labels/round1"].attrs["medsass"]
    prov = gb.attrs["medsass"]["pseudo_labels"]["round1"]
    assert "source_checkpoint" not in prov and prov["source_sha256"] == ga.attrs["medsass"]["pseudo_labels"]["round1"]["source_sha256"]
    side_a = pq.read_table(original / "pseudo_labels" / "round1.parquet").to_pandas()
    side_b = pq.read_table(shared / "pseudo_labels" / "round1.parquet").to_pandas()
    assert side_a.drop(columns="sample_id").equals(side_b.drop(columns="sample_id"))
    assert gb.attrs["medsass"]["params"]["geometry"] == ga.attrs["medsass"]["params"]["geometry"]
    assert gb.attrs["medsass"]["params"]["threshold"] == ga.attrs["medsass"]["params"]["threshold"]

    home = original / "_medsass" / "share"
    for f in ("ids.parquet", "key.json"):
        assert stat.S_IMODE((home / f).stat().st_mode) == 0o600, f
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    ids = pq.read_table(home / "ids.parquet").to_pandas()
    back = dict(zip(ids.shared_id, ids.sample_id))
    assert [back[s] for s in b.sample_id] == list(a.sample_id)
    assert [back[s] for s in side_b.sample_id] == list(side_a.sample_id)
    assert dict(zip(ids.shared_source, ids.source)) == dict(zip(b.source, a.source))


def test_resharing_gives_the_same_ids_and_never_overwrites_other_data(hospital, tmp_path, monkeypatch):
    original, shared = hospital["original"], hospital["shared"]
    with pytest.raises(StoreError, match="--overwrite"):
        share_store(original, shared)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a shared copy"):
        share_store(original, foreign, overwrite=True)
    assert (foreign / "mine.txt").read_text() == "keep me"
    with pytest.raises(StoreError, match="outside the store"):
        share_store(original, original / "inside")
    with pytest.raises(StoreError, match="already a shared copy"):
        share_store(shared, tmp_path / "again")
    again = share_store(original, tmp_path / "again.zarr")
    assert manifest.file_digest(again.out / "manifest.parquet") == manifest.file_digest(shared / "manifest.parquet")

    # a store built with a salt of its own keeps none: the same salt must be given to share it, and no other
    copy = tmp_path / "salted.zarr"
    shutil.copytree(original, copy)
    salt = (copy / "_medsass" / "salt").read_text().strip()
    (copy / "_medsass" / "salt").unlink()
    with pytest.raises(StoreError, match="keeps no salt"):
        share_store(copy, tmp_path / "s1.zarr")
    (tmp_path / "salt.txt").write_text(salt + "\n")
    res = CliRunner().invoke(main, ["share", str(copy), str(tmp_path / "s2.zarr"), "--salt-file", str(tmp_path / "salt.txt")])
    assert res.exit_code == 0, res.output
    assert manifest.file_digest(tmp_path / "s2.zarr" / "manifest.parquet") == manifest.file_digest(shared / "manifest.parquet")
    monkeypatch.setenv("MEDSASS_SALT", "another salt")
    res = CliRunner().invoke(main, ["share", str(copy), str(tmp_path / "s3.zarr")])
    assert res.exit_code == 2 and "shared before with another salt" in res.output
    assert not (tmp_path / "s3.zarr").exists() and not list(tmp_path.glob(".s3.zarr*"))
    res = CliRunner().invoke(main, ["share", str(original), str(tmp_path / "s4.zarr")])  # its own salt wins, or a clash
    assert res.exit_code == 2 and "keeps its own salt" in res.output


def test_train_evaluate_and_predict_on_the_shared_copy_as_on_the_original(hospital):
    from medsass.trainer.config import load_config
    from medsass.trainer.predict import predict
    from medsass.trainer.report import write_run_report
    from medsass.trainer.run import run_stages

    torch.set_num_threads(1)
    outs = {}
    for name in ("original", "shared"):
        out = hospital["tmp"] / f"run_{name}"
        cfg = load_config({
            "out_dir": str(out), "stores": {"ct": str(hospital[name])}, "model": {"encoder": TINY},
            "pretrain": {"steps": 3, "batch_size": 4, "log_every": 1, "target": "pseudo_labels/round1"},
            "finetune": {"steps": 3, "batch_size": 4, "log_every": 1},
            "evaluate": {"batch_size": 8, "overlays": 1, "splits": ["val", "test"]},
            "runtime": {"num_workers": 0, "progress": False, "threads": 1, "tensorboard": False},
        })
        res = run_stages(cfg)
        assert {s: r.status for s, r in res.items()} == {"pretrain": "done", "finetune": "done", "evaluate": "done"}
        outs[name] = out
    m = [json.loads((outs[n] / "evaluate" / "metrics.json").read_text()) for n in ("original", "shared")]
    assert m[0] == m[1] and m[0]["test"]["n"] == 3
    rows = [list(csv.DictReader((outs[n] / "evaluate" / "per_image.csv").open())) for n in ("original", "shared")]
    ids = pq.read_table(hospital["original"] / "_medsass" / "share" / "ids.parquet").to_pandas()
    back = dict(zip(ids.shared_id, ids.sample_id))
    assert [r["sample_id"] for r in rows[0]] == [back[r["sample_id"]] for r in rows[1]]
    assert [r["iou"] for r in rows[0]] == [r["iou"] for r in rows[1]]

    dcm = sorted(hospital["root"].rglob("CT_Smithfield_*_0.dcm"))
    pred = {n: hospital["tmp"] / f"pred_{n}" for n in outs}
    for n in outs:
        got = predict(outs[n], dcm, pred[n], device="cpu")
        assert [r["status"] for r in got] == ["ok"]
    masks = {n: sorted(pred[n].rglob("*_mask.png")) for n in outs}
    assert len(masks["shared"]) == 1
    assert np.array_equal(np.asarray(Image.open(masks["original"][0])), np.asarray(Image.open(masks["shared"][0])))

    report = write_run_report(outs["shared"])  # what the receiving side writes holds nothing of the hospital
    blobs = {str(p.relative_to(outs["shared"])): str(p).encode() + p.read_bytes()
             for p in outs["shared"].rglob("*") if p.is_file() and p.suffix in (".csv", ".json", ".jsonl", ".html", ".yaml", ".png")}
    assert report.exists() and blobs
    patient = [t for t in hospital["tokens"] if str(hospital["tmp"]) not in t and t not in hospital["tmp"].parts]
    found = hits(blobs, patient)
    assert not found, found[:20]
    store_report = hospital["tmp"] / "store_report.html"
    res = CliRunner().invoke(main, ["report", str(hospital["shared"]), "--out", str(store_report)])
    assert res.exit_code == 0, res.output
    res2 = CliRunner().invoke(main, ["inspect", str(hospital["shared"]), "--json"])
    assert res2.exit_code == 0 and json.loads(res2.output)["n_inputs"] == 18
    found = hits({"report": store_report.read_bytes(), "inspect": res2.output.encode()}, patient)
    assert not found, found[:20]


def test_every_manifest_column_has_a_sharing_rule():
    assert set(COLUMN_POLICY) == set(manifest.COLUMNS) | set(manifest.VOLUME_COLUMNS), \
        "decide in medsass.pipeline.share what a shared copy holds"


def test_a_nifti_stores_copy_keeps_its_window_and_volume_columns_and_no_names(tmp_path, dask_scheduler):
    """A C/W window ("40/400" looks like a path to the code rule) and the volume geometry travel; the folder and file
    names and the header's text do not."""
    import nibabel as nib
    from medsass.pipeline.share import format_summary
    from medsass.trainer.checkpoint import prep_params
    from medsass.trainer.predict import PrepParams

    last, first, mrn, _, study, _ = PATIENTS[0]
    case = f"CT_{last}_{study}"
    root = tmp_path / f"{last}^{first}_{mrn}"
    rng = np.random.default_rng(0)
    affine = np.array([[0, -0.8, 0, 120.5], [0, 0, 2.5, -31.25], [0.7, 0, 0, 17.0], [0, 0, 0, 1]])
    for k, sub in enumerate(("imagesTr", "labelsTr")):
        data = (rng.normal(40, 200, (20, 16, 12)).astype(np.int16) if k == 0 else
                (rng.random((20, 16, 12)) < 0.3).astype(np.uint8))
        img = nib.Nifti1Image(data, affine)
        img.header["descrip"] = f"{last}^{first} {mrn}".encode()
        (root / sub).mkdir(parents=True)
        nib.save(img, str(root / sub / (f"{case}_0000.nii.gz" if k == 0 else f"{case}.nii.gz")))
    original, shared = tmp_path / "vol.zarr", tmp_path / "vol_shared.zarr"
    res = CliRunner().invoke(main, ["build-masks", str(root / "imagesTr"), "--labels", str(root / "labelsTr"),
                                    "--label-pattern", "nnunet", "--window", "40/400", "--slice-axis", "coronal",
                                    "--out", str(original), "--size", "32", "--scheduler", dask_scheduler, "--no-progress"])
    assert res.exit_code == 0, res.output
    result = share_store(original, shared)
    ga, gb = zarr.open_group(str(original), mode="r"), zarr.open_group(str(shared), mode="r")
    assert ga.attrs["medsass"]["params"]["threshold"]["window"] == "40/400"
    assert gb.attrs["medsass"]["params"]["threshold"] == ga.attrs["medsass"]["params"]["threshold"]
    assert gb.attrs["medsass"]["params"]["geometry"] == ga.attrs["medsass"]["params"]["geometry"]
    assert manifest.read_json(manifest.summary_path(shared))["params"]["threshold"]["window"] == "40/400"
    # predict's preprocessing from the copy is the original's (the window was withheld, and predict refused it)
    assert (PrepParams.from_record(prep_params(shared), where="copy")
            == PrepParams.from_record(prep_params(original), where="original"))
    assert PrepParams.from_record(prep_params(shared), where="copy").window == "40/400"
    a, b = manifest.read_manifest(original), manifest.read_manifest(shared)
    volume = list(manifest.VOLUME_COLUMNS)
    assert list(b.columns) == list(manifest.COLUMNS) + volume and len(a) == len(b) == 12  # k runs anterior
    assert (b.slice_axis == "coronal").all() and b.has_label.all()
    for c in volume[1:]:
        assert [list(v) for v in a[c]] == [list(v) for v in b[c]], c
    assert np.allclose(np.array(b.volume_affine.iloc[0]).reshape(4, 4), affine)
    assert not [d for d in result.dropped if d.startswith("manifest column")]
    assert "volume geometry" in format_summary(result)
    tokens = [last, first, mrn, study, case, f"{last}^{first}", root.name, str(root)]
    found = hits(every_byte(shared), tokens)
    assert not found, found
    assert hits(every_byte(original), tokens)  # the search finds them where they are
