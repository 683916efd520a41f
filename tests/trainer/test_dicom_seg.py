"""``medsass-train predict --format dicom-seg``: DICOM SEGs that pydicom and highdicom read back.

Series are built from pydicom's bundled real CT/MR files (``get_testdata_file(..., download=False)``):
copies with their own SOP instances, slice positions and shifted pixels, and made-up identifiers
in the header (and a folder named like a patient) so the tests can check where they end up.
"""
from __future__ import annotations

import copy
import csv
import io
import logging
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from medsass.trainer import dicom_seg
from medsass.trainer.cli import main
from medsass.trainer.predict import PrepParams, predict_files
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.sr.coding import Code
from torch import nn

from medsass.errors import ConfigError

torch.set_num_threads(1)
SHARED_DICOM = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "MRN-4711", "PatientBirthDate": "19700101", "StudyDate": "20240102",
           "AccessionNumber": "ACC0815"}
FOLDER = "DOE_JANE_MRN4711"  # a folder named after the patient, as exports often are
PREP = PrepParams(32, "stretch")
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


class Thresholder(nn.Module):
    """A stand-in network with a known answer: foreground where the canvas is above 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) * 200.0


def real(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's bundled test file {name} is not installed")
    return Path(path)


def slices(name: str = "CT_small.dcm", n: int = 4, **changes) -> list:
    """``n`` slices of one new series from a real single-frame file: 5 mm apart, pixels shifted per slice."""
    base = dcmread(real(name))
    series, pixels = hd.UID(), base.pixel_array
    out = []
    for k in range(n):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series, hd.UID(), k + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [*base.ImagePositionPatient[:2], float(base.ImagePositionPatient[2]) + 5 * k]
        ds.PixelData = np.roll(pixels, 9 * k, axis=1).astype(pixels.dtype).tobytes()
        for key, value in {**PATIENT, **changes}.items():
            setattr(ds, key, value)
        out.append(ds)
    return out


def write(datasets: list, folder: Path, stem: str = "IM") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(datasets):
        paths.append(folder / f"{stem}{k + 1:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def read_rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "predictions.csv").open(newline="") as fh:
        return {Path(r["source"]).name: r for r in csv.DictReader(fh)}


def png_mask(out: Path, row: dict[str, str]) -> np.ndarray:
    return np.asarray(Image.open(out / row["mask"])) > 0


def referenced_uids(seg) -> list[str]:
    return [item.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for item in s.ReferencedInstanceSequence]


def test_series_predicts_to_one_seg_that_pydicom_and_highdicom_read(tmp_path):
    src = tmp_path / "in" / FOLDER
    sources = slices(n=4)
    paths = write(sources, src / "series1")
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (20, 1))).save(src / "photo.png")
    default = predict_files(Thresholder(), PREP, [tmp_path / "in"], tmp_path / "png")
    assert all(r["status"] == "ok" for r in default)
    rows = predict_files(Thresholder(), PREP, [tmp_path / "in"], tmp_path / "seg", output_format="dicom-seg", threshold=0.5)
    seg_rows = [r for r in rows if r["source"].endswith(".dcm")]
    assert {r["mask"] for r in seg_rows} == {f"{FOLDER}/series1/IM0001_seg.dcm"} and all(r["reason_code"] == "" for r in seg_rows)
    assert not list((tmp_path / "seg").rglob("*_mask.png"))[1:]  # only the photo's PNG is left
    photo = read_rows(tmp_path / "seg")["photo.png"]
    assert photo["reason_code"] == "not_dicom" and (tmp_path / "seg" / photo["mask"]).exists()

    path = tmp_path / "seg" / FOLDER / "series1" / "IM0001_seg.dcm"
    ds = dcmread(path)
    assert ds.SOPClassUID == SEG_STORAGE and ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert (ds.PatientName, ds.PatientID, ds.StudyInstanceUID) == ("Doe^Jane", "MRN-4711", sources[0].StudyInstanceUID)
    assert ds.FrameOfReferenceUID == sources[0].FrameOfReferenceUID and ds.Manufacturer == "medsass"
    segment = ds.SegmentSequence[0]
    assert segment.SegmentLabel == "foreground" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == "medsass" and segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert sorted(referenced_uids(ds)) == sorted(s.SOPInstanceUID for s in sources)

    seg = hd.seg.segread(path)
    uids = [s.SOPInstanceUID for s in sources]
    got = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    png = {r["source"]: r for r in default}
    want = np.stack([png_mask(tmp_path / "png", png[str(p)]) for p in paths])
    assert 0.05 < want.mean() < 0.95 and not np.array_equal(want[0], want[1])  # masks worth comparing
    np.testing.assert_array_equal(got > 0, want)
    assert got.shape == (4, int(sources[0].Rows), int(sources[0].Columns))  # the source's own pixel grid

    # privacy: nothing of the paths in the SEG; no header values in the CSV
    assert FOLDER.encode() not in path.read_bytes() and b"IM0001" not in path.read_bytes()
    text = (tmp_path / "seg" / "predictions.csv").read_text()
    for value in [*PATIENT.values(), "Doe", sources[0].StudyInstanceUID, sources[0].SeriesInstanceUID, *uids]:
        assert value not in text


def test_multiframe_input_gets_a_seg_that_references_each_frame(tmp_path):
    frames = slices(n=3)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(frames, hd.UID(), 2, hd.UID(), 1)  # a real-shaped multi-frame CT
    (tmp_path / "in").mkdir()
    enhanced.save_as(tmp_path / "in" / "volume.dcm")
    predict_files(Thresholder(), PREP, [tmp_path / "in"], tmp_path / "tif")
    pages = tifffile.imread(tmp_path / "tif" / "volume_mask.tif") > 0
    rows = predict_files(Thresholder(), PREP, [tmp_path / "in"], tmp_path / "seg", output_format="dicom-seg")
    assert rows[0]["mask"] == "volume_seg.dcm" and rows[0]["frames"] == 3 and not (tmp_path / "seg" / "volume_mask.tif").exists()
    seg = hd.seg.segread(tmp_path / "seg" / "volume_seg.dcm")
    got = seg.get_pixels_by_source_frame(enhanced.SOPInstanceUID, [1, 2, 3], combine_segments=True)
    assert pages.shape == (3, 128, 128) and pages.any()
    np.testing.assert_array_equal(got > 0, pages)
    refs = {int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
            for f in seg.PerFrameFunctionalGroupsSequence}
    assert refs <= {1, 2, 3} and refs


def test_series_highdicom_refuses_falls_back_to_one_seg_per_image(tmp_path):
    sources = slices(n=3)
    sources[1].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # one slice in another orientation
    write(sources, tmp_path / "in")
    rows = predict_files(Thresholder(), PREP, [tmp_path / "in"], tmp_path / "seg", output_format="dicom-seg")
    assert [r["mask"] for r in rows] == [f"IM000{k}_seg.dcm" for k in (1, 2, 3)]
    assert {r["reason_code"] for r in rows} == {"seg_per_image"}
    assert "shared orientation" in rows[0]["reason"]
    for row, ds in zip(rows, sources):
        assert referenced_uids(dcmread(tmp_path / "seg" / row["mask"])) == [ds.SOPInstanceUID]


def test_differing_pixel_spacing_is_refused_as_one_seg():
    sources = [dcmread(p, stop_before_pixels=True) for p in (real("CT_small.dcm"),) * 2]
    sources[1].SOPInstanceUID, sources[1].PixelSpacing = hd.UID(), [0.5, 0.5]
    masks = [np.zeros((128, 128), np.uint8), np.ones((128, 128), np.uint8)]
    outcomes = dicom_seg.segment_series(sources, masks)
    assert [o.members for o in outcomes] == [[0], [1]] and all(o.data is not None for o in outcomes)
    assert "pixel spacing differs" in outcomes[0].reason


def test_projection_image_without_slice_thickness_gets_a_seg_highdicom_reads():
    """highdicom would copy PixelSpacing without SliceThickness into the SEG and then refuse to read it."""
    ds = dcmread(real("CT_small.dcm"), stop_before_pixels=True)
    for key in ("SliceThickness", "ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID"):
        delattr(ds, key)
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1.1", "DX"  # a radiograph with a calibrated PixelSpacing
    mask = np.zeros((128, 128), np.uint8)
    mask[20:40, 30:90] = 1
    [outcome] = dicom_seg.segment_series([ds], [mask])
    assert outcome.code == "" and "PixelSpacing" in ds  # the caller's header is left as it was
    got = hd.seg.segread(io.BytesIO(outcome.data)).get_pixels_by_source_instance([ds.SOPInstanceUID], combine_segments=True)
    np.testing.assert_array_equal(got[0], mask)


def test_image_highdicom_cannot_describe_keeps_its_png_with_a_reason(tmp_path):
    bad = slices(n=1)[0]
    del bad.FrameOfReferenceUID  # a CT without a Frame of Reference (real archives have them: ../shared/data 693_*.dcm)
    write([bad], tmp_path / "in")
    rows = predict_files(Thresholder(), PREP, [tmp_path / "in"], tmp_path / "seg", output_format="dicom-seg")
    assert rows[0]["status"] == "ok" and rows[0]["reason_code"] == "seg_failed" and rows[0]["mask"] == "IM0001_mask.png"
    assert "Frame Of Reference" in rows[0]["reason"] and (tmp_path / "seg" / "IM0001_mask.png").exists()


def test_no_header_value_reaches_warnings_or_logs(tmp_path, caplog, capfd):
    ds = dcmread(real("CT_small.dcm"), stop_before_pixels=True)
    ds.PatientName = "CQ500-CT-310"  # highdicom warns about one-component names, quoting the name
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        seg = dicom_seg.build_segmentation([ds], [np.zeros((128, 128), np.uint8)])  # empty: highdicom logs too
    assert seg.PatientName == "CQ500-CT-310"
    assert not [w for w in seen if "CQ500" in str(w.message)] and "CQ500" not in caplog.text
    assert "CQ500" not in "".join(capfd.readouterr())


def test_safe_reason_drops_values_but_keeps_keywords():
    exc = AttributeError("'FileDataset' object has no attribute 'StudyInstanceUID'")
    assert dicom_seg.safe_reason(exc) == "AttributeError: '…' object has no attribute 'StudyInstanceUID'"
    text = dicom_seg.safe_reason(ValueError('name "Doe^Jane" of 1.2.840.113619.2.5 born 19700101'))
    assert "Doe" not in text and "113619" not in text and "1970" not in text


def test_segment_options_are_checked():
    assert dicom_seg.parse_code("SCT:10200004:Liver", option="--segment-type") == Code("10200004", "SCT", "Liver")
    assert dicom_seg.parse_code("DCM:1:a:b", option="x").meaning == "a:b"
    for bad in ("Liver", "SCT::Liver", "SCT:1:"):
        with pytest.raises(ConfigError, match="SCHEME:VALUE:MEANING"):
            dicom_seg.parse_code(bad, option="--segment-type")
    for label in ("", "a\\b", "x" * 65):
        with pytest.raises(ConfigError, match="--segment-label"):
            dicom_seg.SegmentSpec(label)
    with pytest.raises(ValueError, match="mask of shape"):
        dicom_seg.build_segmentation([dcmread(real("CT_small.dcm"), stop_before_pixels=True)], [np.zeros((64, 64))])


@pytest.mark.skipif(not SHARED_DICOM.exists(), reason="../shared/data/dicom is not here")
def test_real_archive_files_each_get_a_seg_or_keep_their_mask(tmp_path):
    """13 real files (JPEG 2000, JPEG, JPEG-LS, RLE; CT/MR/CR/NM/US; some share a SeriesInstanceUID while
    their sizes differ; two CTs lack a Frame of Reference): none fails, each is covered by a SEG that references
    it with the same mask as the default PNG, or keeps its PNG/TIFF with a reason."""
    rows = predict_files(Thresholder(), PREP, [SHARED_DICOM], tmp_path / "seg", output_format="dicom-seg")
    pngs = {r["source"]: r for r in predict_files(Thresholder(), PREP, [SHARED_DICOM], tmp_path / "png")}
    dicoms = [r for r in rows if r["source"].endswith(".dcm")]
    assert len(dicoms) == 13 and all(r["status"] == "ok" for r in dicoms)
    covered = [r for r in dicoms if r["mask"].endswith("_seg.dcm")]
    assert len(covered) >= 9
    for r in covered:
        src = dcmread(r["source"], stop_before_pixels=True)
        assert src.SOPInstanceUID in referenced_uids(dcmread(tmp_path / "seg" / r["mask"]))
        got = hd.seg.segread(tmp_path / "seg" / r["mask"]).get_pixels_by_source_instance([src.SOPInstanceUID], combine_segments=True)
        np.testing.assert_array_equal(got[0] > 0, png_mask(tmp_path / "png", pngs[r["source"]]))
    for r in dicoms:
        if r not in covered:
            assert r["reason_code"] == "seg_failed" and (tmp_path / "seg" / r["mask"]).exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real 2-step pretrain checkpoint of a tiny encoder (as tests/trainer/test_predict.py makes one)."""
    import zarr
    from medsass.trainer.config import load_config
    from medsass.trainer.run import run_stages

    from medsass import store as store_mod
    from medsass.testing import make_synthetic_store

    root = tmp_path_factory.mktemp("segck")
    store = make_synthetic_store(root / "s.zarr", n=12, size=32)
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["medsass"] = {**group.attrs["medsass"], "params": {
        "geometry": {"size": 32, "resize": "stretch", "tile": False, "tile_overlap": 0, "max_pixels": 2**28},
        "threshold": {"method": "otsu", "polarity": "auto", "intensity": "percentile"}}}
    store_mod.consolidate(store)
    run_stages(load_config({
        "out_dir": str(root / "run"), "stores": {"syn": str(store)}, "model": {"encoder": "tu-mobilenetv3_small_100"},
        "stages": ["pretrain"], "pretrain": {"steps": 2, "batch_size": 4, "log_every": 1},
        "runtime": {"num_workers": 0, "progress": False, "threads": 1, "tensorboard": False},
    }))
    return root / "run" / "pretrain" / "final.pt"


def test_cli_predicts_a_series_to_a_seg_and_cleans_up_after_itself(checkpoint, tmp_path):
    sources = slices("MR_small.dcm", n=3)
    paths = write(sources, tmp_path / "in")
    out = tmp_path / "out"
    args = ["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(out), "--device", "cpu", "--format", "dicom-seg",
            "--segment-label", "lung", "--segment-type", "SCT:39607008:Lung",
            "--segment-category", "SCT:123037004:Anatomical Structure"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "1 DICOM SEG(s) for 3 input(s)" in res.output
    ds = dcmread(out / "IM0001_seg.dcm")
    segment = ds.SegmentSequence[0]
    assert segment.SegmentLabel == "lung" and segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lung"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert sorted(referenced_uids(ds)) == sorted(s.SOPInstanceUID for s in sources)
    got = hd.seg.segread(out / "IM0001_seg.dcm").get_pixels_by_source_instance([s.SOPInstanceUID for s in sources],
                                                                                 combine_segments=True)
    assert CliRunner().invoke(main, args[:5] + ["--out", str(tmp_path / "png"), "--device", "cpu"]).exit_code == 0
    want = np.stack([png_mask(tmp_path / "png", r) for r in read_rows(tmp_path / "png").values()])
    np.testing.assert_array_equal(got > 0, want)

    paths[0].write_bytes(paths[0].read_bytes()[:-2000])  # the series' first file is now cut short, inside its pixels
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 3 and "IM0001.dcm" in res.output
    assert not (out / "IM0001_seg.dcm").exists()  # an old SEG would contradict the CSV
    assert referenced_uids(dcmread(out / "IM0002_seg.dcm")) and read_rows(out)["IM0003.dcm"]["mask"] == "IM0002_seg.dcm"

    bad = CliRunner().invoke(main, args + ["--segment-type", "Lung"])
    assert bad.exit_code == 2 and "SCHEME:VALUE:MEANING" in bad.output
