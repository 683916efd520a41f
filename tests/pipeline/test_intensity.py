import numpy as np
from medsass.pipeline.intensity import to_uint8


def test_uint8_unchanged():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out, lo, hi = to_uint8(img)
    assert out is img and (lo, hi) == (0.0, 255.0)


def test_uint16_minmax_maps_full_range():
    img = np.linspace(1000, 3000, 100).astype(np.uint16).reshape(10, 10)
    out, lo, hi = to_uint8(img, "minmax")
    assert (lo, hi) == (1000.0, 3000.0) and out.min() == 0 and out.max() == 255


def test_percentile_clips_hot_pixels():
    img = np.full((100, 100), 100.0, np.float32)
    img[:, 50:] = 200.0
    img[0, 0] = 1e6  # one hot pixel must not squash the range
    out, lo, hi = to_uint8(img)
    assert hi < 1e5 and out[50, 10] == 0 and out[50, 80] == 255


def test_signed_ct_and_constant():
    ct = np.array([[-1000, 0], [40, 400]], np.int16)
    out, lo, hi = to_uint8(ct, "minmax")
    assert out[0, 0] == 0 and out[1, 1] == 255
    out, lo, hi = to_uint8(np.full((4, 4), 7, np.uint16))
    assert out.max() == 0 and lo == hi == 7.0


def test_colour_8bit_luma_keeps_scale():
    luma = np.array([[0.4, 100.6], [254.9, 30.0]], np.float32)
    out, lo, hi = to_uint8(luma, source_dtype="uint8")
    assert out.tolist() == [[0, 101], [255, 30]] and (lo, hi) == (0.0, 255.0)
