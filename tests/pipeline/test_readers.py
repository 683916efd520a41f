"""Readers: synthetic known answers per format, bad inputs, and every real file in ../shared/data."""
import hashlib
import json
import re
import struct
import zlib
from pathlib import Path

import medsass.pipeline.readers.dicom as dicom_reader
import numpy as np
import pydicom
import pytest
import tifffile
from medsass.pipeline.discover import sniff
from medsass.pipeline.gray import to_gray
from medsass.pipeline.readers import READERS, Frame, Probe, probe, read
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medsass.errors import InputError, MissingPluginError, SkipInput

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA}")


def pydicom_file(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


def read1(path, fmt=None, **kw) -> Frame:
    [frame] = read(path, fmt or sniff(path), **kw)
    return frame


def code_of(path, fmt, **kw) -> str:
    with pytest.raises(InputError) as err:
        read(path, fmt, **kw)
    return err.value.code


def test_registry_covers_every_format():
    from medsass.pipeline.discover import FORMATS

    assert set(READERS) == set(FORMATS)
    for module in set(READERS.values()):
        assert callable(module.probe) and callable(module.read)
    with pytest.raises(InputError) as err:
        read(Path("x"), "webp")
    assert err.value.code == "unsupported_format" and "available" in err.value.reason


# --- Pillow ----------------------------------------------------------------------------------------
def save(tmp_path, im: Image.Image, name: str, **kw) -> Path:
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_png_gray_8bit_exact_no_float(tmp_path):
    arr = np.arange(48, dtype=np.uint8).reshape(6, 8)
    frame = read1(save(tmp_path, Image.fromarray(arr), "a.png"))
    assert frame.pixels.dtype == np.uint8 and frame.index == 0
    np.testing.assert_array_equal(frame.pixels, arr)
    assert frame.meta == {"orig_dtype": "uint8", "channels": 1, "photometric": "L", "exif_transposed": False}


def test_png_16bit_keeps_uint16(tmp_path):
    arr = (np.arange(48, dtype=np.uint16) * 1300).reshape(6, 8)
    path = save(tmp_path, Image.fromarray(arr), "a.png")
    assert Image.open(path).mode.startswith("I")
    frame = read1(path)
    assert frame.pixels.dtype == np.uint16 and frame.meta["orig_dtype"] == "uint16"
    np.testing.assert_array_equal(frame.pixels, arr)
    assert probe(path, "png").shape == (6, 8)


def test_png_rgb_rgba_la_known_luma(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[:2] = (255, 0, 0)
    rgb[2:] = (0, 0, 255)
    out = read1(save(tmp_path, Image.fromarray(rgb), "rgb.png")).pixels
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], 76.245, rtol=1e-5)
    np.testing.assert_allclose(out[3, 0], 29.07, rtol=1e-5)
    rgba = np.dstack([np.full((4, 5, 3), 200, np.uint8), np.full((4, 5), 255, np.uint8)])
    rgba[0, 0, 3] = 0
    frame = read1(save(tmp_path, Image.fromarray(rgba, "RGBA"), "rgba.png"))
    assert frame.pixels[0, 0] == 0 and frame.pixels[1, 1] == pytest.approx(200)
    assert frame.meta["channels"] == 4 and frame.meta["photometric"] == "RGBA"
    la = np.dstack([np.full((4, 5), 90, np.uint8), np.full((4, 5), 255, np.uint8)])
    frame = read1(save(tmp_path, Image.fromarray(la, "LA"), "la.png"))
    assert frame.pixels.dtype == np.uint8 and (frame.pixels == 90).all()


def test_png_16bit_colour_keeps_16_bits(tmp_path):
    import imagecodecs

    rgb = np.zeros((4, 5, 3), np.uint16)
    rgb[..., 0] = 1000  # not representable in 8 bits
    (tmp_path / "rgb16.png").write_bytes(imagecodecs.png_encode(rgb))
    frame = read1(tmp_path / "rgb16.png")
    np.testing.assert_allclose(frame.pixels, 299.0, rtol=1e-5)
    assert frame.meta["orig_dtype"] == "uint16" and frame.meta["channels"] == 3
    la = np.dstack([np.full((4, 5), 40000, np.uint16), np.full((4, 5), 65535, np.uint16)])
    (tmp_path / "la16.png").write_bytes(imagecodecs.png_encode(la))
    frame = read1(tmp_path / "la16.png")
    assert frame.pixels.dtype == np.uint16 and (frame.pixels == 40000).all() and frame.meta["channels"] == 2


def test_palette_and_bilevel(tmp_path):
    pal = Image.new("P", (6, 4))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2, 1, 0, 2] * 4)
    out = read1(save(tmp_path, pal, "p.png")).pixels
    np.testing.assert_allclose(out[0, :3], [0, 76.245, 149.685], rtol=1e-5)
    gray_pal = Image.new("P", (6, 4))
    gray_pal.putpalette([v for i in range(256) for v in (i, i, i)])
    gray_pal.putdata([10, 20, 30, 40, 50, 60] * 4)
    out = read1(save(tmp_path, gray_pal, "gp.png")).pixels
    assert out.dtype == np.uint8 and list(out[0]) == [10, 20, 30, 40, 50, 60]
    gif = read1(save(tmp_path, gray_pal, "g.gif"), "gif")
    assert gif.pixels.dtype == np.uint8 and list(gif.pixels[0]) == [10, 20, 30, 40, 50, 60]
    bits = Image.fromarray(np.array([[0, 1, 1], [1, 0, 0]], bool))
    out = read1(save(tmp_path, bits, "b.png")).pixels
    assert out.dtype == np.uint8 and out.tolist() == [[0, 255, 255], [255, 0, 0]]


def test_bmp_and_cmyk_jpeg(tmp_path):
    arr = np.arange(30, dtype=np.uint8).reshape(5, 6)
    np.testing.assert_array_equal(read1(save(tmp_path, Image.fromarray(arr), "a.bmp"), "bmp").pixels, arr)
    white = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
    out = read1(save(tmp_path, white, "c.jpg", quality=95), "jpeg").pixels
    assert out.dtype == np.float32 and abs(float(out.mean()) - 255) < 3


def test_jpeg_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((16, 32), np.uint8)  # 16 rows x 32 cols, left half dark, right half bright
    stored[:, 16:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = save(tmp_path, Image.fromarray(stored), "r.jpg", exif=exif.tobytes(), quality=95)
    assert probe(path, "jpeg").shape == (32, 16)
    frame = read1(path, "jpeg")
    assert frame.pixels.shape == (32, 16) and frame.meta["exif_transposed"] is True
    expected = np.rot90(stored, k=-1)  # clockwise: the stored left (dark) side ends up on top
    assert np.abs(frame.pixels.astype(int) - expected).mean() < 8
    assert frame.pixels[:8].mean() < 30 and frame.pixels[-8:].mean() > 220


def test_pillow_bad_inputs(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    assert code_of(tmp_path / "zero.png", "png") == "empty_file"
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(2000))
    assert code_of(tmp_path / "noise.png", "png") == "decode_error"
    tiny = save(tmp_path, Image.new("L", (1, 1)), "tiny.png")
    assert code_of(tiny, "png") == "too_small"
    rng = np.random.default_rng(1)
    noisy = Image.fromarray(rng.integers(0, 256, (200, 300), dtype=np.uint8))
    for name, fmt in (("t.png", "png"), ("t.jpg", "jpeg")):
        data = save(tmp_path, noisy, name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        assert code_of(tmp_path / name, fmt) in ("truncated", "decode_error")
    big = save(tmp_path, noisy, "big.png")
    assert code_of(big, "png", max_pixels=1000) == "too_large"
    assert code_of(big, "png", frames=[1]) == "bad_frame_index"
    assert read(big, "png", frames=[]) == []


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [20_000, 100_000])  # under and over Pillow's own 2x bomb limit
def test_huge_png_header_is_too_large_without_decoding(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    assert code_of(path, "png") == "too_large"


# --- TIFF ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.uint32, np.float32, np.float64])
def test_tiff_dtypes_exact(tmp_path, dtype):
    arr = (np.arange(35) * 3).reshape(5, 7).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", arr)
    frame = read1(tmp_path / "a.tif", "tiff")
    assert frame.pixels.dtype == dtype
    np.testing.assert_array_equal(frame.pixels, arr)


def test_tiff_nonfinite(tmp_path):
    arr = np.ones((4, 4), np.float32)
    arr[0, 0], arr[1, 1] = np.nan, np.inf
    tifffile.imwrite(tmp_path / "n.tif", arr)
    with pytest.raises(InputError) as err:
        read(tmp_path / "n.tif", "tiff")
    assert err.value.code == "nonfinite" and "2 NaN/inf" in err.value.reason


def test_tiff_rgb_contig_and_planar(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "c.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    expected = to_gray(rgb, mode="rgb")
    for name in ("c.tif", "p.tif"):
        assert probe(tmp_path / name, "tiff").n_frames == 1
        np.testing.assert_allclose(read1(tmp_path / name, "tiff").pixels, expected, rtol=1e-6)


@pytest.mark.parametrize("compression", [None, "lzw", "zlib", "zstd"])
def test_tiff_multipage_compressed(tmp_path, compression):
    stack = np.random.default_rng(3).integers(0, 60000, (3, 8, 10), dtype=np.uint16)
    path = tmp_path / "s.tif"
    with tifffile.TiffWriter(path) as tw:
        for page in stack:
            tw.write(page, compression=compression)
    assert probe(path, "tiff").n_frames == 3
    frames = read(path, "tiff")
    assert [f.index for f in frames] == [0, 1, 2]
    for f in frames:
        np.testing.assert_array_equal(f.pixels, stack[f.index])
    [only] = read(path, "tiff", frames=[2])
    assert only.index == 2
    np.testing.assert_array_equal(only.pixels, stack[2])


def test_tiff_hyperstacks_every_plane_is_a_frame(tmp_path):
    data = np.arange(2 * 3 * 2 * 4 * 5, dtype=np.uint16).reshape(2, 3, 2, 4, 5)
    tifffile.imwrite(tmp_path / "ij.tif", data, imagej=True, metadata={"axes": "TZCYX"})
    tifffile.imwrite(tmp_path / "ome.tif", data[:, 0], ome=True, metadata={"axes": "TCYX"})
    planes = data.reshape(-1, 4, 5)
    assert probe(tmp_path / "ij.tif", "tiff").n_frames == 12
    for f in read(tmp_path / "ij.tif", "tiff"):
        np.testing.assert_array_equal(f.pixels, planes[f.index])
    ome = read(tmp_path / "ome.tif", "tiff")
    assert len(ome) == 4
    np.testing.assert_array_equal(ome[3].pixels, data[1, 0, 1])


def test_tiff_skips_reduced_resolution_and_inverts_miniswhite(tmp_path):
    arr = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)
    with tifffile.TiffWriter(tmp_path / "pyr.tif") as tw:
        tw.write(arr, subifds=1)
        tw.write(arr[::2, ::2], subfiletype=1)  # pyramid level in a SubIFD
        tw.write(arr[::8, ::8], subfiletype=1)  # thumbnail page
    assert probe(tmp_path / "pyr.tif", "tiff").n_frames == 1
    np.testing.assert_array_equal(read1(tmp_path / "pyr.tif", "tiff").pixels, arr)
    bits = np.array([[0, 1], [1, 1]], bool)
    tifffile.imwrite(tmp_path / "b.tif", bits, photometric="miniswhite")
    assert read1(tmp_path / "b.tif", "tiff").pixels.tolist() == [[255, 0], [0, 0]]
    small = np.array([[0, 10], [200, 255]], np.uint8)
    tifffile.imwrite(tmp_path / "w.tif", small, photometric="miniswhite")
    frame = read1(tmp_path / "w.tif", "tiff")
    assert frame.meta["inverted"] is True and frame.pixels.tolist() == [[255, 245], [55, 0]]


def test_tiff_palette_alpha_and_channels(tmp_path):
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, 1] = 65535
    cmap[0, 2] = 65535  # red
    tifffile.imwrite(tmp_path / "p.tif", np.array([[0, 1], [2, 1]], np.uint8), photometric="palette", colormap=cmap)
    np.testing.assert_allclose(read1(tmp_path / "p.tif", "tiff").pixels, [[0, 65535], [0.299 * 65535, 65535]], rtol=1e-5)
    la = np.dstack([np.full((3, 3), 100, np.uint8), np.tile(np.array([0, 255, 255], np.uint8), (3, 1))])
    tifffile.imwrite(tmp_path / "la.tif", la, photometric="minisblack", extrasamples=["unassalpha"])
    assert read1(tmp_path / "la.tif", "tiff").pixels.tolist() == [[0, 100, 100]] * 3
    two = np.arange(60, dtype=np.uint16).reshape(5, 6, 2)  # two gray channels, no alpha: two frames
    tifffile.imwrite(tmp_path / "two.tif", two, photometric="minisblack", planarconfig="contig")
    frames = read(tmp_path / "two.tif", "tiff")
    assert len(frames) == probe(tmp_path / "two.tif", "tiff").n_frames == 2
    for f in frames:
        np.testing.assert_array_equal(f.pixels, two[..., f.index])


def test_tiff_bad_inputs(tmp_path, monkeypatch):
    arr = np.random.default_rng(4).integers(0, 60000, (64, 64), dtype=np.uint16)
    for comp in (None, "lzw"):
        tifffile.imwrite(tmp_path / "t.tif", arr, compression=comp, rowsperstrip=8)
        data = (tmp_path / "t.tif").read_bytes()
        (tmp_path / "t.tif").write_bytes(data[: int(len(data) * 0.7)])
        assert code_of(tmp_path / "t.tif", "tiff") in ("truncated", "decode_error")
    (tmp_path / "z.tif").write_bytes(b"")
    assert code_of(tmp_path / "z.tif", "tiff") == "empty_file"
    tifffile.imwrite(tmp_path / "lzw.tif", arr, compression="lzw")

    def no_codec(self, *a, **k):
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_codec)
    with pytest.raises(MissingPluginError) as err:
        read(tmp_path / "lzw.tif", "tiff")
    assert err.value.code == "missing_plugin" and "install imagecodecs" in err.value.reason


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


PHI = ("Doe^Jane", "Doe", "Jane", "PID-98765", "Saint Example", "20240131", "ACC-4242")
_SAFE = re.compile(r"[A-Za-z0-9_.;:()\- ]{0,64}")


def assert_phi_free(meta: dict, secrets=PHI):
    text = json.dumps(meta)
    for secret in secrets:
        assert secret not in text
    for key, value in meta.items():
        assert re.fullmatch(r"[a-z_]+", key)
        assert value is None or isinstance(value, (bool, int, float)) or (
            isinstance(value, str) and _SAFE.fullmatch(value)
        ), (key, value)


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


# --- real files ------------------------------------------------------------------------------------
DICOM_TABLE = {  # from ../shared/data/dicom/SOURCE.md: modality, photometric, (rows, cols), frames
    "RG3_J2KR.dcm": ("CR", "MONOCHROME1", (1760, 1760), 1),
    "RG1_J2KI.dcm": ("CR", "MONOCHROME1", (1955, 1841), 1),
    "693_J2KR.dcm": ("CT", "MONOCHROME2", (512, 512), 1),
    "693_UNCR.dcm": ("CT", "MONOCHROME2", (512, 512), 1),
    "MR2_J2KR.dcm": ("MR", "MONOCHROME2", (1024, 1024), 1),
    "JPEG-LL.dcm": ("NM", "MONOCHROME2", (1024, 256), 1),
    "JPEG-lossy.dcm": ("NM", "MONOCHROME2", (1024, 256), 1),
    "JPGLosslessP14SV1_1s_1f_8b.dcm": ("US", "MONOCHROME2", (768, 1024), 1),
    "JLSL_16_15_1_1F.dcm": (None, "MONOCHROME2", (128, 128), 1),
    "MR_small_jpeg_ls_lossless.dcm": ("MR", "MONOCHROME2", (64, 64), 1),
    "MR_small_RLE.dcm": ("MR", "MONOCHROME2", (64, 64), 1),
    "CT_small.dcm": ("CT", "MONOCHROME2", (128, 128), 1),
    "emri_small_jpeg_2k_lossless.dcm": ("MR", "MONOCHROME2", (64, 64), 10),
}


@pytest.fixture(scope="module")
def real_dicom():
    """name -> (probe, frames), each file decoded once."""
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA}")
    folder = DATA / "dicom"
    assert sorted(p.name for p in folder.glob("*.dcm")) == sorted(DICOM_TABLE)
    return {name: (probe(folder / name, "dicom", salt="s"), read(folder / name, "dicom")) for name in DICOM_TABLE}


@needs_data
@pytest.mark.parametrize("name", sorted(DICOM_TABLE))
def test_real_dicom_decodes_as_documented(real_dicom, name):
    modality, photometric, shape, n = DICOM_TABLE[name]
    pr, frames = real_dicom[name]
    assert isinstance(pr, Probe) and pr.format == "dicom"
    assert (pr.meta["modality"], pr.meta["photometric"], pr.shape, pr.n_frames) == (modality, photometric, shape, n)
    assert [f.index for f in frames] == list(range(n))
    for f in frames:
        assert f.pixels.shape == shape and f.pixels.ndim == 2
        assert np.isfinite(f.pixels).all() and f.pixels.max() > f.pixels.min()
        assert f.meta["inverted"] is (photometric == "MONOCHROME1")
    ds = pydicom.dcmread(DATA / "dicom" / name)
    secrets = [str(ds.get(k)) for k in ("PatientID", "PatientName") if len(str(ds.get(k) or "")) >= 3]
    for text in (repr(pr), *(json.dumps(f.meta) for f in frames)):
        for secret in secrets:
            assert secret not in text
    assert_phi_free(pr.meta, secrets)
    for f in frames:
        assert_phi_free(f.meta, secrets)


@needs_data
def test_real_monochrome1_is_inverted(real_dicom):
    for name in ("RG3_J2KR.dcm", "RG1_J2KI.dcm"):
        raw = pydicom.dcmread(DATA / "dicom" / name).pixel_array.astype(np.float64)
        out = real_dicom[name][1][0].pixels.astype(np.float64)
        sub = (slice(None, None, 7), slice(None, None, 7))
        assert np.corrcoef(raw[sub].ravel(), out[sub].ravel())[0, 1] < -0.9


@needs_data
def test_real_lossless_pairs_agree(real_dicom):
    j2k, unc = real_dicom["693_J2KR.dcm"][1][0].pixels, real_dicom["693_UNCR.dcm"][1][0].pixels
    np.testing.assert_array_equal(j2k, unc)
    np.testing.assert_array_equal(real_dicom["MR_small_RLE.dcm"][1][0].pixels,
                                  real_dicom["MR_small_jpeg_ls_lossless.dcm"][1][0].pixels)
    lossless = real_dicom["JPEG-LL.dcm"][1][0].pixels.astype(float)
    lossy = real_dicom["JPEG-lossy.dcm"][1][0].pixels.astype(float)  # 12-bit JPEG via imagecodecs
    assert np.corrcoef(lossless.ravel(), lossy.ravel())[0, 1] > 0.95
    emri = read(DATA / "dicom" / "emri_small_jpeg_2k_lossless.dcm", "dicom", frames=[7])
    np.testing.assert_array_equal(emri[0].pixels, real_dicom["emri_small_jpeg_2k_lossless.dcm"][1][7].pixels)


REAL_IMAGES = [  # (relative path, format, (H, W), dtype, frames)
    ("tiff/stardist_img3d_synthetic.tif", "tiff", (61, 57), np.uint16, 31),
    ("tiff/stardist_mask3d_synthetic.tif", "tiff", (61, 57), np.uint16, 31),
    ("tiff/skimage_multipage.tif", "tiff", (15, 10), np.uint8, 2),
    ("tiff/skimage_multipage_rgb.tif", "tiff", (10, 10), np.float32, 2),
    ("nuclei_sample/N2DL-HeLa/images/t13.tif", "tiff", (700, 1100), np.uint16, 1),
    ("nuclei_sample/N2DL-HeLa/masks/man_seg13.tif", "tiff", (700, 1100), np.uint16, 1),
    ("nuclei_sample/N2DH-GOWT1/images/t01.tif", "tiff", (1024, 1024), np.uint8, 1),
    ("nuclei_sample/N2DH-GOWT1/masks/man_seg01.tif", "tiff", (1024, 1024), np.uint16, 1),
    ("nuclei_sample/NIH3T3/images/dna-0.png", "png", (1024, 1344), np.uint8, 1),
    ("nuclei_sample/NIH3T3/masks/0.png", "png", (1024, 1344), np.uint8, 1),
    ("retina_vessels/DRIVE/images/21_training.tif", "tiff", (584, 565), np.float32, 1),
    ("retina_vessels/DRIVE/masks/21_manual1.gif", "gif", (584, 565), np.uint8, 1),
    ("retina_vessels/CHASE_DB1/images/Image_01L.jpg", "jpeg", (960, 999), np.float32, 1),
    ("retina_vessels/CHASE_DB1/masks/Image_01L_1stHO.png", "png", (960, 999), np.uint8, 1),
    ("ph2_dermoscopy/images/IMD002.png", "png", (286, 382), np.float32, 1),
    ("ph2_dermoscopy/masks/IMD002_lesion.png", "png", (286, 382), np.uint8, 1),
    ("isic_sample/images/ISIC_0024311.jpg", "jpeg", (450, 600), np.float32, 1),
    ("isic_sample/masks/ISIC_0024311.png", "png", (450, 600), np.uint8, 1),
    ("cxr_lungs/images/pneumocystis-pneumonia-2-PA.png", "png", (954, 955), np.float32, 1),  # RGBA
    ("cxr_lungs/masks/pneumocystis-pneumonia-2-PA.png", "png", (954, 955), np.uint8, 1),
    ("cxr_lungs/images/kjr-21-e25-g001-l-a.jpg", "jpeg", (437, 424), np.uint8, 1),  # L JPEG
    ("cxr_lungs/images/kjr-21-e24-g002-l-a.jpg", "jpeg", (294, 298), np.float32, 1),  # RGB JPEG
    ("cxr_lungs/masks/kjr-21-e24-g002-l-a.png", "png", (294, 298), np.uint8, 1),
]
MASK_VALUES = {"png": {0, 255}, "gif": {0, 255}}


@needs_data
@pytest.mark.parametrize(("rel", "fmt", "shape", "dtype", "n"), REAL_IMAGES)
def test_real_images_decode_as_documented(rel, fmt, shape, dtype, n):
    path = DATA / rel
    assert sniff(path) == fmt
    pr = probe(path, fmt)
    assert (pr.format, pr.shape, pr.n_frames, pr.group) == (fmt, shape, n, None)
    frames = read(path, fmt)
    assert len(frames) == n
    for f in frames:
        assert f.pixels.shape == shape and f.pixels.dtype == dtype
        assert {"orig_dtype", "channels", "photometric"} <= set(f.meta)
        assert_phi_free(f.meta)
    if "/masks/" in rel and fmt in MASK_VALUES:
        assert set(np.unique(frames[0].pixels).tolist()) == MASK_VALUES[fmt]
    if "man_seg" in rel:  # instance labels 0..N
        assert frames[0].pixels.min() == 0 and frames[0].pixels.max() > 5
    if "HeLa/images" in rel:
        assert 30000 < frames[0].pixels.min() and frames[0].pixels.max() < 40000
    if fmt == "tiff" and "retina" not in rel and "rgb" not in rel:  # gray TIFF is bit-exact
        np.testing.assert_array_equal(np.stack([f.pixels for f in frames]).squeeze(), tifffile.imread(path))


@needs_data
def test_real_image_mask_shapes_agree():
    for folder in ("ph2_dermoscopy", "isic_sample", "cxr_lungs"):
        images = sorted((DATA / folder / "images").iterdir())[:3]
        masks = sorted((DATA / folder / "masks").iterdir())[:3]
        for image, mask in zip(images, masks):
            assert probe(image, sniff(image)).shape == probe(mask, sniff(mask)).shape


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_plain_gray_png_fast_path_gives_pillows_array(tmp_path, dtype):
    import imagecodecs
    from medsass.pipeline.readers import pillow

    rng = np.random.default_rng(0)
    a = (rng.random((37, 53)) * np.iinfo(dtype).max).astype(dtype)
    for i, data in enumerate([imagecodecs.png_encode(a), _pil_png(a)]):
        path = tmp_path / f"g{i}.png"
        path.write_bytes(data)
        with Image.open(path) as im:
            assert pillow._plain_gray_png(im, data) is not None  # the libpng path is taken
        fast = read(path, "png", [0], max_pixels=10**8, data=data)[0]
        slow = read(path, "png", [0], max_pixels=10**8)[0]  # no bytes given: Pillow decodes
        assert fast.pixels.dtype == slow.pixels.dtype == dtype
        assert np.array_equal(fast.pixels, a) and np.array_equal(slow.pixels, a)
        assert fast.meta == slow.meta


def test_gray_png_with_an_icc_profile_goes_through_pillow(tmp_path, capfd):
    """libpng warns on stderr about some ICC profiles (scikit-image's page.png); Pillow reads them quietly."""
    import skimage

    from medsass.pipeline.readers import pillow

    path = Path(skimage.__file__).parent / "data" / "page.png"
    data = path.read_bytes()
    with Image.open(path) as im:
        assert im.mode == "L" and "icc_profile" in im.info
        assert pillow._plain_gray_png(im, data) is None
        expected = np.asarray(im)
    frame = read(path, "png", [0], max_pixels=10**8, data=data)[0]
    assert np.array_equal(frame.pixels, expected)
    assert "PNG warning" not in capfd.readouterr().err


def _pil_png(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()
