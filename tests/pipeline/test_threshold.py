"""medsass.pipeline.threshold: tiny synthetic arrays with known answers, plus a few real images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from medsass.pipeline.threshold import (
    METHODS,
    REGION_METHODS,
    PseudoMask,
    choose_polarity,
    field_of_view,
    pseudo_mask,
)
from skimage import filters

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
RNG = np.random.default_rng(0)


def disk(shape, center, radius):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def bimodal(dtype, lo, hi, shape=(64, 80)):
    a = np.where(disk(shape, (30, 40), 18), hi, lo) + RNG.normal(0, (hi - lo) / 10, shape)
    return a.astype(dtype)


# ----------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    "dtype,lo,hi",
    [(np.uint8, 40, 200), (np.uint16, 1000, 40000), (np.int16, -900, 300), (np.float32, 0.1, 0.7),
     (np.float64, -3.0, 5.0)],
)
def test_otsu_equals_skimage(dtype, lo, hi):
    g = bimodal(dtype, lo, hi)
    r = pseudo_mask(g, polarity="bright")
    assert r.threshold == float(filters.threshold_otsu(g))  # exact, same histogram as skimage
    np.testing.assert_array_equal(r.mask, g > r.threshold)
    d = pseudo_mask(g, polarity="dark")
    np.testing.assert_array_equal(d.mask, g <= r.threshold)


@pytest.mark.parametrize("method", ["li", "yen", "triangle"])
def test_other_methods_are_skimages(method):
    g = bimodal(np.uint8, 40, 200)
    expected = getattr(filters, f"threshold_{method}")(g)
    assert pseudo_mask(g, method=method, polarity="bright").threshold == pytest.approx(float(expected))


def test_multiotsu_records_the_threshold_it_used():
    g = np.full((60, 60), 10, np.uint8)
    g[10:50, 10:50] = 120
    g[20:40, 20:40] = 240
    g = (g + RNG.integers(0, 5, g.shape)).astype(np.uint8)
    low, high = filters.threshold_multiotsu(g.astype(float), classes=3)
    b = pseudo_mask(g, method="multiotsu", polarity="bright")
    d = pseudo_mask(g, method="multiotsu", polarity="dark")
    # foreground = the two classes away from the background end
    assert b.threshold == pytest.approx(low) and d.threshold == pytest.approx(high)
    np.testing.assert_array_equal(b.mask, g > b.threshold)
    np.testing.assert_array_equal(d.mask, g <= d.threshold)


def test_valid_restricts_threshold_and_mask():
    g = bimodal(np.uint8, 40, 200)
    valid = np.zeros(g.shape, bool)
    valid[:, :50] = True
    r = pseudo_mask(g, polarity="bright", valid=valid)
    assert r.threshold == float(filters.threshold_otsu(g[valid]))
    assert not r.mask[:, 50:].any()
    np.testing.assert_array_equal(r.mask[:, :50], g[:, :50] > r.threshold)


# ----------------------------------------------------------------------------- auto polarity


def test_bright_disk_on_dark_background():
    g = np.where(disk((100, 120), (50, 60), 25), 200, 20).astype(np.uint8)
    r = pseudo_mask(g)
    assert r.polarity == "bright"
    np.testing.assert_array_equal(r.mask, g == 200)
    assert r.flags == () and not r.degenerate and r.method == "otsu"
    assert r.fg_fraction == pytest.approx(r.mask.mean())


def test_dark_disk_on_bright_background_with_vignette():
    shape = (286, 382)  # PH2-like: the field of view is a circle wider than the image is tall
    fov = disk(shape, (143, 191), 185)
    lesion = disk(shape, (150, 200), 50)
    g = np.where(fov, 180.0, 0.0)
    g[lesion] = 80.0
    g = (g + RNG.normal(0, 6, shape)).clip(0, 255).astype(np.uint8)
    assert choose_polarity(g, filters.threshold_otsu(g)) == "dark"
    r = pseudo_mask(g)
    assert r.polarity == "dark"
    assert r.mask[lesion].mean() > 0.99


def test_many_small_bright_nuclei():
    g = np.full((256, 256), 20.0)
    for cy in range(8, 256, 40):
        for cx in range(8, 256, 40):  # some are cut by the image border
            g[disk(g.shape, (cy, cx), 7)] = 90
    g = (g + RNG.normal(0, 3, g.shape)).astype(np.float32)
    assert pseudo_mask(g).polarity == "bright"


def test_body_surrounded_by_air_is_bright():
    """CT/MR-like slice: a bright body with dark lungs inside, dark air all around it."""
    shape = (200, 200)
    g = np.full(shape, -1000.0)
    yy, xx = np.ogrid[:200, :200]
    g[((yy - 100) / 70) ** 2 + ((xx - 100) / 90) ** 2 <= 1] = 40.0
    g[disk(shape, (95, 65), 28) | disk(shape, (95, 135), 28)] = -850.0
    g = (g + RNG.normal(0, 10, shape)).astype(np.int16)
    assert pseudo_mask(g).polarity == "bright"


def test_dark_lungs_in_a_body_touching_the_edges():
    """Chest-X-ray-like: the body fills the image, two dark lung fields inside, dark air at the top corners."""
    shape = (200, 180)
    g = np.full(shape, 170.0)
    g[disk(shape, (95, 50), 40) | disk(shape, (95, 130), 40)] = 70.0
    g[disk(shape, (0, 0), 35) | disk(shape, (0, 179), 35)] = 15.0
    g = (g + RNG.normal(0, 8, shape)).clip(0, 255).astype(np.uint8)
    assert pseudo_mask(g).polarity == "dark"


def test_explicit_polarity_is_respected():
    g = np.where(disk((50, 50), (25, 25), 10), 200, 20).astype(np.uint8)
    assert pseudo_mask(g, polarity="dark").polarity == "dark"
    np.testing.assert_array_equal(pseudo_mask(g, polarity="dark").mask, g == 20)


def test_mask_is_native_resolution():
    g = np.zeros((701, 1100), np.uint16)  # the rule looks at a strided copy; the mask must not
    g[300:320, 500:530] = 5000
    r = pseudo_mask(g)
    assert r.mask.shape == g.shape and r.polarity == "bright"
    np.testing.assert_array_equal(r.mask, g == 5000)


# ----------------------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
@pytest.mark.parametrize("method", METHODS)
def test_constant_image(dtype, method):
    r = pseudo_mask(np.full((9, 7), 3, dtype), method=method)
    assert isinstance(r, PseudoMask)
    assert r.flags == ("constant",) and r.degenerate
    assert r.mask.shape == (9, 7) and r.mask.dtype == bool and not r.mask.any()
    assert r.fg_fraction == 0.0 and r.threshold == 3.0


def test_empty_valid_is_like_constant():
    r = pseudo_mask(bimodal(np.uint8, 40, 200), valid=np.zeros((64, 80), bool))
    assert r.flags == ("constant",) and not r.mask.any()


def test_tiny_foreground_flags_fg_low():
    g = np.zeros((100, 100), np.uint8)
    g[50, 50:53] = 255
    r = pseudo_mask(g)
    assert r.polarity == "bright" and r.mask.sum() == 3
    assert r.flags == ("fg_low",) and r.degenerate
    assert pseudo_mask(g, polarity="dark").flags == ("fg_high",)


@pytest.mark.parametrize("method", METHODS)
def test_one_by_two_image(method):
    r = pseudo_mask(np.array([[0, 1]], np.uint8), method=method)
    assert r.mask.shape == (1, 2) and r.polarity in ("bright", "dark")


def test_unknown_method_lists_options():
    with pytest.raises(ValueError, match="otsu, multiotsu, li, yen, triangle"):
        pseudo_mask(np.zeros((4, 4)), method="kmeans")


def test_unknown_polarity_lists_options():
    with pytest.raises(ValueError, match="auto, bright, dark"):
        pseudo_mask(np.zeros((4, 4)), polarity="up")


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        pseudo_mask(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        pseudo_mask(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="shape"):
        pseudo_mask(np.zeros((4, 4)), valid=np.ones((4, 5), bool))


# ----------------------------------------------------------------------------- real data


def _gray(path: Path) -> np.ndarray:
    if path.suffix == ".tif":
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im)
    if a.ndim == 3:  # BT.601 luma, float32
        rgb = a[..., :3].astype(np.float32)
        return rgb[..., 0] * np.float32(0.299) + rgb[..., 1] * np.float32(0.587) + rgb[..., 2] * np.float32(0.114)
    return a


REAL = [
    ("ph2_dermoscopy/images/IMD002.png", "dark"),
    ("ph2_dermoscopy/images/IMD080.png", "dark"),  # large, very dark lesion touching the vignette
    ("ph2_dermoscopy/images/IMD161.png", "dark"),
    ("nuclei_sample/N2DL-HeLa/images/t13.tif", "bright"),  # 16-bit LZW TIFF
    ("nuclei_sample/NIH3T3/images/dna-0.png", "bright"),
    ("cxr_lungs/images/ARDSSevere.png", "dark"),
    ("cxr_lungs/images/SARS-10.1148rg.242035193-g04mr34g05x-Fig5-day9.jpeg", "dark"),
]


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")
@pytest.mark.parametrize("rel,side", REAL, ids=[Path(r).name[:24] for r, _ in REAL])
def test_auto_picks_the_expected_side_on_real_images(rel, side):
    r = pseudo_mask(_gray(DATA / rel))
    assert r.polarity == side
    assert not r.degenerate


# ----------------------------------------------------------------------------- region-aware methods

def dermoscopy_like(hair: bool = False):
    shape = (286, 382)
    fov = disk(shape, (143, 191), 185)
    lesion = disk(shape, (150, 200), 60)
    g = np.where(fov, 180.0, 0.0)
    g[lesion] = 80.0
    if hair:
        for x0 in (40, 120, 300):  # thin dark diagonal lines, 2 px wide, crossing skin and lesion
            for dy in range(shape[0]):
                x = x0 + dy // 2
                if x + 2 < shape[1]:
                    g[dy, x : x + 2] = 60.0
    g = (g + np.random.default_rng(1).normal(0, 6, shape)).clip(0, 255).astype(np.uint8)
    return g, fov, lesion


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_field_of_view_excludes_vignette_corners():
    g, fov, _ = dermoscopy_like()
    region = field_of_view(g)
    assert region.shape == g.shape
    assert iou(region, fov) > 0.97
    assert field_of_view(np.where(disk((80, 80), (40, 40), 20), 200, 20).astype(np.uint8)).all()


def test_fov_otsu_excludes_corners_and_keeps_lesion():
    g, fov, lesion = dermoscopy_like()
    plain = pseudo_mask(g)
    r = pseudo_mask(g, method="fov_otsu")
    assert plain.polarity == r.polarity == "dark"
    assert plain.mask[~fov].mean() > 0.9  # plain Otsu keeps the black corners ...
    assert r.mask[~fov].mean() < 0.05  # ... the region-aware one does not
    assert r.mask[lesion].mean() > 0.99


def test_fov_otsu_clean_removes_hair():
    g, _, lesion = dermoscopy_like(hair=True)
    assert iou(pseudo_mask(g, method="fov_otsu").mask, lesion) < 0.9
    for method in ("fov_otsu_clean", "fov_otsu_hull"):
        assert iou(pseudo_mask(g, method=method).mask, lesion) > 0.95


def test_fov_otsu_hull_on_chest_like_image():
    """Two dark lung fields inside a bright body; dark air strips at both sides touch the lungs."""
    shape = (240, 240)
    g = np.full(shape, 170.0)
    lungs = disk(shape, (120, 75), 40) | disk(shape, (120, 165), 40)
    g[lungs] = 70.0
    g[:, :22] = g[:, -22:] = 10.0  # air outside the body
    g[110:116, :60] = 60.0  # a thin dark bridge from the left air strip into the lung
    g = (g + np.random.default_rng(2).normal(0, 6, shape)).clip(0, 255).astype(np.uint8)
    plain = pseudo_mask(g)
    r = pseudo_mask(g, method="fov_otsu_hull")
    assert plain.polarity == r.polarity == "dark"
    assert iou(plain.mask, lungs) < 0.8
    assert iou(r.mask, lungs) > 0.95


@pytest.mark.parametrize("method", [m for m in REGION_METHODS if "multiotsu" not in m])
def test_region_methods_leave_bright_foreground_alone(method):
    g = np.full((200, 200), 20.0)
    nuclei = np.zeros(g.shape, bool)
    for cy in range(10, 200, 45):
        for cx in range(10, 200, 45):
            nuclei |= disk(g.shape, (cy, cx), 9)
    g[nuclei] = 90
    g = (g + RNG.normal(0, 3, g.shape)).astype(np.float32)
    r = pseudo_mask(g, method=method)
    plain = pseudo_mask(g)
    assert r.polarity == "bright" and r.threshold == plain.threshold
    np.testing.assert_array_equal(r.mask, plain.mask)  # no holes to fill here
    assert iou(r.mask, nuclei) > 0.99


def test_region_method_threshold_is_computed_inside_the_field_of_view():
    g, _, _ = dermoscopy_like()
    r = pseudo_mask(g, method="fov_otsu")
    region = field_of_view(g)
    assert r.threshold == float(filters.threshold_otsu(g[region]))
    np.testing.assert_array_equal(r.mask, (g <= r.threshold) & region)


@pytest.mark.parametrize("lower", [True, False])
def test_envelope_drops_only_points_that_cannot_be_vertices(lower):
    from medsass.pipeline.mask_geometry import envelope as _envelope, monotone_chain as _monotone_chain

    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 4, 5, 17, 128]:
        for _ in range(200):
            y = np.sort(rng.choice(400, size=n, replace=False))
            x = rng.integers(0, rng.integers(1, 60), size=n)  # many ties and collinear runs
            hy, hx = _envelope(y, x, lower=lower)
            ry, rx = _monotone_chain(y, x, lower=lower)  # the chain over every point
            assert hy.tolist() == ry.tolist() and hx.tolist() == rx.tolist()
