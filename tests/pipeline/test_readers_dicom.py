"""Readers: synthetic DICOM known answers (LUTs, multi-frame, colour), bad inputs, and PHI-free metadata."""
import hashlib
import json
from pathlib import Path

import medsass.pipeline.readers.dicom as dicom_reader
import numpy as np
import pydicom
import pytest
from medsass.pipeline.discover import sniff
from medsass.pipeline.gray import to_gray
from medsass.pipeline.readers import probe, read
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from readers_helpers import PHI, assert_phi_free, code_of, read1

from medsass.errors import InputError, MissingPluginError, SkipInput


def pydicom_file(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


# --- DICOM (synthetic) -----------------------------------------------------------------------------
def make_dicom(path: Path, pixels: np.ndarray, *, photometric="MONOCHROME2", bits_stored=None,
               preamble=True, file_meta=True, **tags) -> Path:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, generate_uid(), "CT"
    ds.PatientName, ds.PatientID, ds.InstitutionName = "Doe^Jane", "PID-98765", "Saint Example Hospital"
    ds.StudyDate, ds.AccessionNumber = "20240131", "ACC-4242"
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    if file_meta:
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.file_meta = meta
        ds.save_as(path, enforce_file_format=True)
        if not preamble:
            path.write_bytes(path.read_bytes()[132:])
    else:
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    return path


def test_dicom_monochrome1_rescale_window_by_hand(tmp_path):
    stored = np.array([[0, 500], [1000, 4095]], np.uint16)
    path = make_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", bits_stored=12,
                      RescaleSlope=2, RescaleIntercept=-100, WindowCenter=1000, WindowWidth=1001)
    frame = read1(path)
    # HU = 2x - 100 = [-100, 900, 1900, 8090]; LINEAR window c=999.5 w=1000 -> [0, 0.4005, 1, 1]; inverted
    np.testing.assert_allclose(frame.pixels, [[1.0, 0.5995], [0.0, 0.0]], atol=1e-6)
    assert frame.pixels.dtype == np.float32
    assert frame.meta["voi"] == "window" and frame.meta["inverted"] is True and frame.meta["rescaled"] is True
    assert frame.meta["photometric"] == "MONOCHROME1" and frame.meta["modality"] == "CT"


def test_dicom_monochrome1_without_window_inverts_in_stored_range(tmp_path):
    stored = np.array([[0, 1], [4000, 4095]], np.uint16)
    frame = read1(make_dicom(tmp_path / "a.dcm", stored, photometric="MONOCHROME1", bits_stored=12))
    assert frame.pixels.dtype == np.uint16 and frame.pixels.tolist() == [[4095, 4094], [95, 0]]
    assert frame.meta["voi"] == "none" and frame.meta["rescaled"] is False


def test_dicom_rescale_integer_and_float(tmp_path):
    stored = np.array([[-5, 0], [1000, 2047]], np.int16)
    frame = read1(make_dicom(tmp_path / "i.dcm", stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024))
    assert frame.pixels.dtype == np.int16 and frame.pixels.tolist() == [[-1029, -1024], [-24, 1023]]
    frame = read1(make_dicom(tmp_path / "f.dcm", stored, bits_stored=12, RescaleSlope=0.5, RescaleIntercept=1))
    assert frame.pixels.dtype == np.float32
    np.testing.assert_allclose(frame.pixels, [[-1.5, 1], [501, 1024.5]])
    frame = read1(make_dicom(tmp_path / "n.dcm", stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=0))
    assert frame.pixels.dtype == np.int16 and frame.meta["rescaled"] is False


def test_dicom_multiframe_selective(tmp_path, monkeypatch):
    stack = np.arange(4 * 3 * 5, dtype=np.uint16).reshape(4, 3, 5)
    path = make_dicom(tmp_path / "mf.dcm", stack)
    assert probe(path, "dicom").n_frames == 4
    seen = []
    real = dicom_reader.iter_pixels
    monkeypatch.setattr(dicom_reader, "iter_pixels", lambda f, **kw: seen.append(kw.get("indices")) or real(f, **kw))
    frames = read(path, "dicom", frames=[3, 1])
    assert seen == [[3, 1]]  # only the requested frames are decoded
    assert [f.index for f in frames] == [3, 1]
    np.testing.assert_array_equal(frames[0].pixels, stack[3])
    np.testing.assert_array_equal(frames[1].pixels, stack[1])
    assert len(read(path, "dicom")) == 4
    assert code_of(path, "dicom", max_pixels=3 * 5 * 3) == "too_large"
    assert len(read(path, "dicom", frames=[0], max_pixels=3 * 5)) == 1


def test_dicom_enhanced_functional_groups(tmp_path):
    stack = np.array([[[0, 100]], [[200, 300]]], np.uint16).repeat(2, axis=1)  # 2 frames of 2x2
    path = make_dicom(tmp_path / "e.dcm", stack, bits_stored=12)
    ds = pydicom.dcmread(path)
    shared, pvt = Dataset(), Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 2, -10, "US"
    shared.PixelValueTransformationSequence = [pvt]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for center, width in ((100, 201), (500, 201)):
        item, voi = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        item.FrameVOILUTSequence = [voi]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.save_as(path)
    f0, f1 = read(path, "dicom")
    # values 2x - 10: frame 0 [-10, 190] in window c=100 w=201 (LINEAR: c-0.5, w-1) -> [0, 90.5/200 + 0.5];
    # frame 1 [390, 590] in its own window c=500 -> the same; with frame 0's window it would be [1, 1]
    np.testing.assert_allclose(f0.pixels[0], [0.0, 0.9525], atol=1e-6)
    np.testing.assert_allclose(f1.pixels[0], [0.0, 0.9525], atol=1e-6)
    assert f0.meta["rescaled"] and f1.meta["voi"] == "window"


def test_dicom_without_preamble_or_meta(tmp_path):
    arr = np.arange(12, dtype=np.uint16).reshape(3, 4)
    for kw in ({"preamble": False}, {"file_meta": False}):
        path = make_dicom(tmp_path / "x", arr, **kw)
        assert path.read_bytes()[128:132] != b"DICM" and sniff(path) == "dicom"
        np.testing.assert_array_equal(read1(path, "dicom").pixels, arr)
        assert probe(path, "dicom").shape == (3, 4)


def test_dicom_float_pixel_data_nonfinite(tmp_path):
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.30", generate_uid()  # Parametric Map
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 2, 2, 1, "MONOCHROME2", 32
    ds.FloatPixelData = np.array([[1, 2], [np.nan, 4]], np.float32).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(tmp_path / "f.dcm", enforce_file_format=True)
    assert probe(tmp_path / "f.dcm", "dicom").meta["dtype"] == "float32"
    assert code_of(tmp_path / "f.dcm", "dicom") == "nonfinite"


def test_dicom_skips_objects_without_pixels(tmp_path):
    with pytest.raises(SkipInput) as err:
        probe(pydicom_file("reportsi.dcm"), "dicom")
    assert err.value.code == "no_pixel_data" and err.value.reason == "DICOM Basic Text SR has no pixel data"
    for name in ("rtstruct.dcm", "rtplan.dcm", "waveform_ecg.dcm", "test-SR.dcm"):
        with pytest.raises(SkipInput) as err:
            read(pydicom_file(name), "dicom")
        assert err.value.code == "no_pixel_data" and "has no pixel data" in err.value.reason
    with pytest.raises(SkipInput) as err:
        probe(pydicom_file("DICOMDIR"), "dicom")
    assert err.value.code == "dicomdir"
    ds = pydicom.dcmread(make_dicom(tmp_path / "np.dcm", np.zeros((2, 2), np.uint16)))
    del ds.PixelData
    ds.save_as(tmp_path / "np.dcm")
    with pytest.raises(SkipInput) as err:
        read(tmp_path / "np.dcm", "dicom")
    assert err.value.reason == "DICOM CT Image has no pixel data"
    with pytest.raises(SkipInput) as err:
        probe(pydicom_file("liver_1frame.dcm"), "dicom")  # SEG: label masks, not an image
    assert err.value.code == "non_image"


def test_dicom_bad_inputs(tmp_path):
    path = make_dicom(tmp_path / "t.dcm", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    assert code_of(path, "dicom") == "truncated"
    path.write_bytes(data[:200])  # cut inside the header
    assert code_of(path, "dicom") == "truncated"
    assert code_of(pydicom_file("MR_truncated.dcm"), "dicom") == "truncated"
    path.write_bytes(b"")
    assert code_of(path, "dicom") == "empty_file"
    tiny = make_dicom(tmp_path / "tiny.dcm", np.zeros((1, 1), np.uint16))
    assert code_of(tiny, "dicom") == "too_small"


def test_dicom_missing_plugin_and_unsupported_syntax(tmp_path, monkeypatch):
    ds = pydicom.dcmread(make_dicom(tmp_path / "v.dcm", np.zeros((4, 4), np.uint8)))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    ds.PixelData = encapsulate([b"\x00" * 16])
    ds.save_as(tmp_path / "v.dcm")
    with pytest.raises(InputError) as err:
        read(tmp_path / "v.dcm", "dicom")
    assert err.value.code == "unsupported_format" and "MPEG2" in err.value.reason
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(MissingPluginError) as err:
        read(pydicom_file("JPEG2000.dcm"), "dicom")
    assert err.value.code == "missing_plugin"
    assert "install pylibjpeg-openjpeg" in err.value.reason and "1.2.840.10008.1.2.4.91" in err.value.reason
    with pytest.raises(MissingPluginError) as err:
        read(pydicom_file("MR_small_jpeg_ls_lossless.dcm"), "dicom")
    assert "pylibjpeg-libjpeg" in err.value.reason and "JPEG-LS" in err.value.reason


def test_dicom_colour(tmp_path):
    ds = pydicom.dcmread(pydicom_file("examples_palette.dcm"))
    expected = to_gray(pydicom.pixels.apply_color_lut(ds.pixel_array, ds), mode="auto")
    frame = read1(pydicom_file("examples_palette.dcm"))
    np.testing.assert_allclose(frame.pixels, expected)
    assert frame.meta["photometric"] == "PALETTE COLOR"
    rgb = read1(pydicom_file("SC_rgb_rle.dcm")).pixels  # the same test pattern, RGB RLE and YBR_FULL JPEG
    ybr = read1(pydicom_file("SC_rgb_jpeg_dcmtk.dcm"))
    assert ybr.meta["photometric"] == "YBR_FULL" and ybr.meta["channels"] == 3
    assert np.abs(rgb - ybr.pixels).mean() < 3  # lossy, but luma, not raw Y/Cb/Cr or garbage
    frames = read(pydicom_file("examples_ybr_color.dcm"), "dicom", frames=[0, 29])
    assert [f.pixels.shape for f in frames] == [(240, 320)] * 2


def test_dicom_meta_is_phi_free_and_group_is_salted_hash(tmp_path):
    path = make_dicom(tmp_path / "p.dcm", np.zeros((4, 4), np.uint16))
    pr = probe(path, "dicom", salt="pepper")
    assert pr.group == hashlib.sha256(b"pepperPID-98765").hexdigest()[:16]
    assert probe(path, "dicom", salt="salt2").group != pr.group
    for text in (repr(pr), json.dumps(read1(path).meta)):
        for secret in PHI:
            assert secret not in text
    assert_phi_free(pr.meta)
    assert_phi_free(read1(path).meta)
    ds = pydicom.dcmread(path)
    del ds.PatientID
    ds.save_as(path)
    assert probe(path, "dicom").group is None
