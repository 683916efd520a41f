"""Integer paths of prep (pipeline/levels.py and its users) against the float paths they replace: exact equality.

An image given as :class:`Levels` (codes into a table of values) must give the same histogram, Otsu threshold,
pseudo-mask and uint8 image as the same image given as pixels; the DICOM reader's table must give the pixels its
LUTs give pixel by pixel; the dark ``fov_*_hull`` mask built on the small copy must equal the full-resolution one.
"""
from __future__ import annotations

import numpy as np
import pytest
from medsass.pipeline import levels as lv
from medsass.pipeline.field_of_view import clean, field_of_view
from medsass.pipeline.global_threshold import Values, apply_threshold, otsu_of_counts
from medsass.pipeline.intensity import linear_uint8, to_uint8
from medsass.pipeline.mask_geometry import Blocks, fill_holes, upsample
from medsass.pipeline.readers import dicom_display
from medsass.pipeline.threshold import METHODS, pseudo_mask
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from skimage import filters

RNG = np.random.default_rng(7)


def chest(shape=(300, 260), seed=0, dark_lungs=True) -> np.ndarray:
    """12-bit chest-like image: air around a body, two lungs (dark or bright), noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1 : 1 : shape[0] * 1j, -1 : 1 : shape[1] * 1j]
    img = np.full(shape, 300.0)
    img[(xx / 0.85) ** 2 + (yy / 1.05) ** 2 < 1] = 2200
    for side in (-1, 1):
        img[((xx - side * 0.38) / 0.25) ** 2 + ((yy + 0.1) / 0.55) ** 2 < 1] = 900 if dark_lungs else 3500
    img += rng.normal(0, 120, shape)
    return np.clip(img, 0, 4095).astype(np.uint16)


def window_table(codes_max: int, *, invert: bool = False) -> np.ndarray:
    """A float32 window-like table over 0..codes_max (clipped linear ramp), optionally decreasing."""
    x = np.arange(codes_max + 1, dtype=np.float64)
    t = np.clip((x - 0.2 * codes_max) / (0.6 * codes_max), 0, 1).astype(np.float32)
    return (np.float32(1) - t) if invert else t


# ----------------------------------------------------------------------------- Levels: counting and lookups


def test_bincount_and_take_equal_numpy_on_blocks_and_remainders():
    codes = RNG.integers(0, 4000, (lv.BLOCK // 100 + 3, 301), dtype=np.uint16)  # several blocks and a partial one
    np.testing.assert_array_equal(lv.bincount(codes, 4000), np.bincount(codes.ravel(), minlength=4000))
    table = RNG.random(4000).astype(np.float32)
    out = lv.take(table, codes)
    assert out.dtype == np.float32 and out.shape == codes.shape
    np.testing.assert_array_equal(out, table[codes])
    small = codes[:3, :4]
    np.testing.assert_array_equal(lv.bincount(small, 4000), np.bincount(small.ravel(), minlength=4000))


@pytest.mark.parametrize("dtype,lo,hi", [(np.uint16, 0, 4095), (np.uint16, 1000, 60000), (np.int16, -1024, 3071),
                                         (np.int16, -32768, 32767), (np.uint8, 3, 250), (np.int8, -100, 20)])
def test_of_integers_is_the_image_and_counts_its_values(dtype, lo, hi):
    img = RNG.integers(lo, hi + 1, (40, 50)).astype(dtype)
    levels = lv.Levels.of_integers(img)
    assert levels.values.dtype == dtype
    np.testing.assert_array_equal(levels.image(), img)
    np.testing.assert_array_equal(levels.strided(3), img[::3, ::3])
    values, counts = np.unique(img, return_counts=True)
    np.testing.assert_array_equal(levels.values[levels.counts > 0], values)
    np.testing.assert_array_equal(levels.counts[levels.counts > 0], counts)


def test_of_integers_refuses_what_it_cannot_code():
    assert lv.Levels.of_integers(np.zeros((3, 3), np.float32)) is None
    assert lv.Levels.of_integers(np.zeros((3, 3), np.int32)) is None
    with pytest.raises(ValueError, match="uint8 or uint16"):
        lv.Levels(np.zeros((2, 2), np.int32), np.zeros(3))


@pytest.mark.parametrize("inside", [0.1, 0.9])  # counts the smaller side either way
def test_counts_within_a_region(inside):
    img = RNG.integers(0, 300, (60, 70)).astype(np.uint16)
    where = RNG.random(img.shape) < inside
    levels = lv.Levels.of_integers(img)
    np.testing.assert_array_equal(levels.counts_within(where), np.bincount(img[where], minlength=levels.values.size))


@pytest.mark.parametrize("shape,step", [((100, 90), 3), ((96, 96), 3), ((7, 5), 4), ((3, 2), 4), ((50, 70), 1),
                                        ((200, 130), 8)])  # partial last blocks, a single block, stride 1
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_counts_in_blocks_equal_the_upsampled_mask(shape, step, fraction):
    img = RNG.integers(0, 500, shape).astype(np.uint16)
    small = RNG.random((-(-shape[0] // step), -(-shape[1] // step))) < fraction
    full = upsample(small, step, shape)
    levels = lv.Levels.of_integers(img)
    np.testing.assert_array_equal(levels.counts_in_blocks(small, step), np.bincount(img[full], minlength=levels.values.size))
    if step > 1:
        np.testing.assert_array_equal(np.sort(lv.block_pixels(img, small, step)), np.sort(img[full]))
    v = Values(img, Blocks(small, step, shape), levels)
    assert v.size == full.sum() and (v.is_constant() or v.threshold("otsu") == Values(img, full).threshold("otsu"))


# ----------------------------------------------------------------------------- Otsu from counted codes


@pytest.mark.parametrize("table", [
    np.arange(4096, dtype=np.uint16),  # integer image: skimage's one bin per value
    (np.arange(4096) - 1024).astype(np.int16),  # CT after rescale
    (np.arange(4096) // 16).astype(np.uint8),  # 8-bit VOI LUT output: values repeat across codes
    window_table(4095),  # float window: 256 bins over the data range
    window_table(4095, invert=True),  # MONOCHROME1 after the window: decreasing table
    (np.arange(4096, dtype=np.int32) * 20 - 1024),  # int32 after a wide rescale: skimage sees float64
    np.sin(np.arange(4096) / 300.0),  # non-monotone float64 table
])
def test_otsu_of_counts_is_skimages_threshold_of_the_pixels(table):
    codes = chest().astype(np.uint16)
    levels = lv.Levels(codes, table)
    img = levels.image()
    expected = filters.threshold_otsu(img.astype(np.float64) if img.dtype == np.int32 else img)
    assert Values(img, None, levels).threshold("otsu") == float(expected)
    assert otsu_of_counts(*Values(img, None, levels).tally) == float(expected)


def test_values_within_a_region_match_the_pixels_there():
    codes = chest()
    levels = lv.Levels(codes, window_table(4095))
    img = levels.image()
    where = np.zeros(img.shape, bool)
    where[40:200, 30:150] = True
    v = Values(img, where, levels)
    assert v.size == where.sum() and v.min() == img[where].min() and v.max() == img[where].max()
    assert v.threshold("otsu") == float(filters.threshold_otsu(img[where]))
    assert v.threshold("li") == float(filters.threshold_li(img[where]))  # other methods use the pixels


# ----------------------------------------------------------------------------- pseudo-masks and uint8


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("table", ["identity", "window", "inverted"])
@pytest.mark.parametrize("dark_lungs", [True, False])
def test_pseudo_mask_with_levels_equals_without(method, table, dark_lungs):
    codes = chest(seed=3, dark_lungs=dark_lungs)
    values = {"identity": np.arange(4096, dtype=np.uint16), "window": window_table(4095),
              "inverted": window_table(4095, invert=True)}[table]
    levels = lv.Levels(codes, values)
    img = levels.image()
    for valid in (None, np.pad(np.ones((280, 240), bool), 10)):
        a = pseudo_mask(img, method=method, valid=valid)
        b = pseudo_mask(img, method=method, valid=valid, levels=lv.Levels(codes, values))
        assert (a.threshold, a.polarity, a.flags, a.fg_fraction) == (b.threshold, b.polarity, b.flags, b.fg_fraction)
        np.testing.assert_array_equal(a.mask, b.mask)


def test_constant_and_empty_images_with_levels():
    codes = np.full((20, 30), 7, np.uint16)
    r = pseudo_mask(codes, levels=lv.Levels(codes, np.arange(8, dtype=np.uint16)), method="fov_otsu_hull")
    assert r.flags == ("constant",) and r.threshold == 7.0 and not r.mask.any()
    img = chest()
    r = pseudo_mask(img, valid=np.zeros(img.shape, bool), levels=lv.Levels.of_integers(img))
    assert r.flags == ("constant",) and r.threshold == 0.0


def test_levels_with_nonfinite_values_in_use_are_refused():
    codes = np.array([[0, 1], [1, 2]], np.uint16)
    table = np.array([0.0, np.nan, 1.0, np.inf], np.float32)  # code 3 is not used: its inf does not matter
    with pytest.raises(ValueError, match="NaN or inf"):
        pseudo_mask(table[codes], levels=lv.Levels(codes, table))
    ok = np.array([0.0, 0.5, 1.0, np.inf], np.float32)
    assert pseudo_mask(ok[codes], levels=lv.Levels(codes, ok)).threshold == float(filters.threshold_otsu(ok[codes]))


@pytest.mark.parametrize("mode", ["percentile", "minmax"])
@pytest.mark.parametrize("values", [window_table(4095), (np.arange(4096) - 1024).astype(np.int16),
                                    np.arange(4096, dtype=np.uint16)])
def test_uint8_from_levels_equals_the_float_mapping(mode, values):
    codes = chest(seed=5)
    img = values[codes]
    got, low, high = to_uint8(img, mode, levels=lv.Levels(codes, values))
    plain, low2, high2 = to_uint8(img, mode)  # 16-bit integers take their own levels here
    assert (low, high) == (low2, high2)
    expected = linear_uint8(img, low, high)  # the per-pixel float32 formula
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(plain, expected)
    by_hand = np.clip((img.astype(np.float32) - np.float32(low)) * np.float32(255 / (high - low)), 0, 255) + 0.5
    np.testing.assert_array_equal(expected, by_hand.astype(np.uint8))


# ----------------------------------------------------------------------------- dark fov_*_hull on the small copy


def full_resolution_dark_hull(gray: np.ndarray) -> np.ndarray:
    """The dark fov_otsu_hull mask as it was computed before: full-resolution threshold, clean, hole filling."""
    region = field_of_view(gray)
    t = float(filters.threshold_otsu(gray[region]))
    mask = clean(apply_threshold(gray, t, "dark", region), region, hull=True)
    return fill_holes(mask)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(300, 260), (513, 700), (256, 256), (100, 90)])  # strides 2, 3, 1 and 1
def test_dark_hull_on_the_small_copy_equals_full_resolution(seed, shape):
    img = chest(shape, seed)
    r = pseudo_mask(img, method="fov_otsu_hull", polarity="dark")
    np.testing.assert_array_equal(r.mask, full_resolution_dark_hull(img))
    assert r.mask.any()
    with_valid = pseudo_mask(img, method="fov_otsu_hull", polarity="dark", valid=np.ones(img.shape, bool))
    np.testing.assert_array_equal(r.mask, with_valid.mask)  # valid takes the full-resolution path


@pytest.mark.parametrize("scale", [1, 3])  # stride 1, and 3 on a 600 px image
def test_dark_hull_fills_the_hole_that_separate_hulls_enclose(scale):
    """Four dark bars touching only at their corners are four objects; their hulls enclose the centre: a hole."""
    img = np.full((200, 200), 2000.0)
    for sl in [(slice(50, 66), slice(66, 134)), (slice(134, 150), slice(66, 134)),
               (slice(66, 134), slice(50, 66)), (slice(66, 134), slice(134, 150))]:
        img[sl] = 500
    img = np.kron(img, np.ones((scale, scale))) + np.random.default_rng(1).normal(0, 30, (200 * scale, 200 * scale))
    img = img.astype(np.uint16)
    r = pseudo_mask(img, method="fov_otsu_hull", polarity="dark")
    assert r.mask[100 * scale, 100 * scale]  # the enclosed centre is filled
    np.testing.assert_array_equal(r.mask, full_resolution_dark_hull(img))


def test_dark_hull_without_an_outside_equals_full_resolution():
    img = chest()
    img[img < 600] = 2200  # no air: the field of view is the whole image
    assert field_of_view(img).all()
    np.testing.assert_array_equal(pseudo_mask(img, method="fov_otsu_hull", polarity="dark").mask,
                                  full_resolution_dark_hull(img))


# ----------------------------------------------------------------------------- the DICOM reader's table


def _ds(photometric="MONOCHROME2", bits=12, signed=False, **tags) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation, ds.SamplesPerPixel = photometric, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, int(signed)
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def _voi_lut(n: int, depth: int) -> Sequence:
    item = Dataset()
    item.LUTDescriptor = [n, 0, depth]
    item.LUTData = (np.linspace(0, 2**depth - 1, n) ** 1.3 / (2**depth - 1) ** 0.3).astype(int).tolist()
    return Sequence([item])


CASES = {
    "window": dict(WindowCenter=2048, WindowWidth=3000),
    "window_m1": dict(photometric="MONOCHROME1", WindowCenter=1500, WindowWidth=2001),
    "sigmoid": dict(WindowCenter=2000, WindowWidth=1000, VOILUTFunction="SIGMOID"),
    "voi_lut": dict(VOILUTSequence=_voi_lut(4096, 12)),
    "voi_lut_8bit_m1": dict(photometric="MONOCHROME1", VOILUTSequence=_voi_lut(4096, 8)),
    "rescale_int": dict(RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400),
    "rescale_float": dict(RescaleSlope=0.5, RescaleIntercept=-3.25),
    "rescale_int32": dict(bits=16, RescaleSlope=1, RescaleIntercept=-1024),
    "signed_ct": dict(signed=True, RescaleSlope=1, RescaleIntercept=0, WindowCenter=-600, WindowWidth=1500),
    "m1_only": dict(photometric="MONOCHROME1"),
    "bad_window": dict(WindowCenter=100, WindowWidth=0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dicom_table_gives_the_pixels_the_luts_give(case):
    tags = dict(CASES[case])
    ds = _ds(tags.pop("photometric", "MONOCHROME2"), tags.pop("bits", 12), tags.pop("signed", False), **tags)
    top = 2 ** int(ds.BitsStored)
    if ds.PixelRepresentation:
        arr = RNG.integers(-top // 2, top // 2, (37, 41)).astype(np.int16)
    else:
        arr = RNG.integers(5, top - 7, (37, 41)).astype(np.uint16)
    pixels, info, levels = dicom_display.to_display(arr, ds)
    lo, hi = dicom_display.stored_range(ds, arr, arr.min().item(), arr.max().item())
    per_pixel = dicom_display.apply_luts(arr, ds, lo, hi, dict(info))  # the LUTs applied to every pixel
    assert pixels.dtype == per_pixel.dtype
    np.testing.assert_array_equal(pixels, per_pixel)
    if case == "bad_window":  # nothing applied: the stored values as they are, no table
        assert levels is None and pixels is arr
    else:
        assert levels is not None and levels.values.size == arr.max() - arr.min() + 1
        np.testing.assert_array_equal(levels.image(), pixels)
