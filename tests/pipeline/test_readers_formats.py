"""Readers: the format registry, and synthetic known answers and bad inputs for Pillow formats and TIFF."""
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from medsass.pipeline.gray import to_gray
from medsass.pipeline.readers import READERS, probe, read
from PIL import Image
from readers_helpers import code_of, read1

from medsass.errors import InputError, MissingPluginError


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
