"""medsass.pipeline.mask_geometry against scikit-image / SciPy as oracles, on random masks of many shapes."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label, regionprops
from skimage.morphology import convex_hull_image

from medsass.pipeline import mask_geometry as mg


def random_masks(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        h, w = rng.integers(3, 90, 2)
        yield ndi.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 4)) > rng.uniform(0.4, 0.6)


@pytest.mark.parametrize("width", [1, 2, 5])
def test_dilate_equals_scipy(width):
    square = np.ones((2 * width + 1,) * 2, bool)
    for x in random_masks(60, width):
        expect = ndi.binary_dilation(x, square)
        assert np.array_equal(mg.dilate(x, width), expect)
        assert np.array_equal(ndi.maximum_filter(x.view(np.uint8), 2 * width + 1).view(bool), expect)  # clean()'s old form


def test_touching_equals_binary_propagation():
    rng = np.random.default_rng(3)
    for x in random_masks(80, 3):
        seed = rng.random(x.shape) < 0.02
        assert np.array_equal(mg.touching(x, seed), ndi.binary_propagation(seed & x, mask=x))


def test_fill_holes_equals_scipy():
    borders = set()
    for x in random_masks(80, 4):
        assert np.array_equal(mg.fill_holes(x), ndi.binary_fill_holes(x))
        labels, _ = ndi.label(~x)
        borders.add(min(len(set(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])) - {0}), 4))
    assert borders == {0, 1, 2, 3, 4}  # both ways of filling are exercised (few border components, or many)


@pytest.mark.parametrize("n_border", [0, 1, 2, 3, 4, 6])
def test_fill_holes_with_a_known_number_of_surrounds(n_border):
    """Rings (each with a hole) in a background split into n_border pieces on the border by full-width bars."""
    x = np.zeros((40, 12 * max(n_border, 1)), bool)
    for k in range(max(n_border, 1)):
        x[10:19, 12 * k + 2 : 12 * k + 11] = True
        x[13:16, 12 * k + 5 : 12 * k + 8] = False  # the hole
    if n_border == 0:
        x[[0, -1]] = x[:, [0, -1]] = True  # a frame: the whole background is enclosed
    else:
        for k in range(1, n_border):
            x[:, 12 * k] = True  # a bar cuts the surround
    got = mg.fill_holes(x)
    assert np.array_equal(got, ndi.binary_fill_holes(x)) and got[14, 6]


def test_largest_equals_skimage_largest_region():
    for x in random_masks(80, 5):
        regions = regionprops(label(x, connectivity=1))
        got = mg.largest(x)
        if len(regions) <= 1:
            assert got is x
            continue
        areas = [r.area for r in regions]
        best = regions[int(np.argmax(areas))]  # first in label (raster) order on a tie, as ndi.label numbers them
        expect = np.zeros(x.shape, bool)
        expect[tuple(best.coords.T)] = True
        assert np.array_equal(got, expect)


def test_convex_hull_matches_skimage_within_one_pixel():
    square = np.ones((3, 3), bool)
    n = 0
    for x in random_masks(200, 6):
        if not x.any():
            assert not mg.convex_hull(x).any()
            continue
        n += 1
        got, expect = mg.convex_hull(x), convex_hull_image(x)
        assert (got >= x).all()  # contains the mask
        assert (got <= ndi.binary_dilation(expect, square)).all() and (expect <= ndi.binary_dilation(got, square)).all()
        if x.sum() >= 200:
            assert (got & expect).sum() / (got | expect).sum() > 0.9
    assert n > 150


def test_upsample_inverts_striding():
    x = np.random.default_rng(7).random((37, 50)) > 0.5
    for step in (1, 2, 3, 7):
        small = x[::step, ::step]
        up = mg.upsample(small, step, x.shape)
        assert up.shape == x.shape and np.array_equal(up[::step, ::step], small)
    assert mg.strided((512, 300), 128) == 4 and mg.strided((100, 100), 128) == 1
