"""Known answers for colour -> grayscale conversion."""
import numpy as np
import pytest
from medsass.pipeline.gray import to_gray


def test_gray_passes_through_in_native_dtype():
    for dtype in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        arr = np.arange(12, dtype=dtype).reshape(3, 4)
        out = to_gray(arr, mode="gray")
        assert out is arr  # no copy, no float conversion
    assert to_gray(np.zeros((2, 2), np.uint16), mode="I;16").dtype == np.uint16


@pytest.mark.parametrize(
    ("rgb", "expected"),
    [((255, 0, 0), 76.245), ((0, 255, 0), 149.685), ((0, 0, 255), 29.07), ((255, 255, 255), 255.0), ((0, 0, 0), 0.0)],
)
def test_rgb_uses_bt601_luma_in_float32(rgb, expected):
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[...] = rgb
    out = to_gray(arr, mode="rgb")
    assert out.dtype == np.float32 and out.shape == (2, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_rgb_uint16_keeps_its_range():
    arr = np.full((2, 2, 3), 65535, np.uint16)
    np.testing.assert_allclose(to_gray(arr, mode="RGB"), 65535.0, rtol=1e-6)


def test_rgba_composites_over_black():
    arr = np.zeros((1, 3, 4), np.uint8)
    arr[..., :3] = 200
    arr[0, :, 3] = (0, 255, 51)  # transparent, opaque, 20 %
    out = to_gray(arr, mode="rgba")
    np.testing.assert_allclose(out[0], [0.0, 200.0, 40.0], rtol=1e-5)


def test_opaque_rgba_equals_rgb():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, np.full((5, 6), 255, np.uint8)])
    np.testing.assert_array_equal(to_gray(rgba, mode="rgba"), to_gray(rgb, mode="rgb"))


def test_la_opaque_stays_native_and_transparent_composites():
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 0] = 100
    la[..., 1] = 255
    out = to_gray(la, mode="LA")
    assert out.dtype == np.uint8 and (out == 100).all()
    la[0, 0, 1] = 0
    out = to_gray(la, mode="la")
    assert out.dtype == np.float32 and out[0, 0] == 0 and out[1, 1] == 100


def test_float_alpha_is_in_unit_range():
    arr = np.ones((1, 1, 4), np.float32)
    arr[..., 3] = 0.5
    assert to_gray(arr, mode="rgba")[0, 0] == pytest.approx(0.5)


def test_auto_infers_layout_from_shape():
    assert to_gray(np.zeros((2, 2), np.uint8), mode="auto").dtype == np.uint8
    assert to_gray(np.zeros((2, 2, 3), np.uint8), mode="auto").dtype == np.float32
    assert to_gray(np.zeros((2, 2, 4), np.uint8), mode="auto").shape == (2, 2)


def test_bad_mode_or_shape_is_an_error():
    with pytest.raises(ValueError, match="available"):
        to_gray(np.zeros((2, 2)), mode="hsv")
    with pytest.raises(ValueError, match="does not match"):
        to_gray(np.zeros((2, 2, 3)), mode="rgba")
    with pytest.raises(ValueError, match="does not match"):
        to_gray(np.zeros((2, 2, 3)), mode="gray")
