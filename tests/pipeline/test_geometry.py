import numpy as np
import pytest
from medsass.pipeline import geometry


def test_stretch_and_back():
    img = (np.arange(40 * 60) % 251).astype(np.uint8).reshape(40, 60)
    [p] = geometry.placements(img.shape, 32, "stretch")
    canvas = geometry.place_image(img, p, 32)
    assert canvas.shape == (32, 32)
    back = geometry.to_source(canvas, p)
    assert back.shape == (40, 60)


def test_pad_keeps_aspect_and_centres():
    [p] = geometry.placements((50, 100), 64, "pad")
    assert (p.content_height, p.content_width) == (32, 64) and p.content_y == 16 and p.content_x == 0
    canvas = geometry.place_image(np.full((50, 100), 200, np.uint8), p, 64)
    assert canvas[:16].max() == 0 and canvas[48:].max() == 0 and canvas[16:48].min() == 200


def test_mask_stays_binary_and_close_to_area():
    rng = np.random.default_rng(0)
    mask = np.zeros((301, 257), bool)
    mask[50:200, 30:180] = True
    mask |= rng.random(mask.shape) < 0.02
    for mode in ("stretch", "pad"):
        [p] = geometry.placements(mask.shape, 64, mode)
        out = geometry.place_mask(mask, p, 64)
        assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
        frac = out[geometry._content(p)].mean()
        assert abs(frac - mask.mean()) < 0.03


def test_tiles_cover_the_image_and_map_back():
    img = np.random.default_rng(1).integers(0, 255, (70, 100), dtype=np.uint8)
    ps = geometry.placements(img.shape, 32, "tile")
    assert len(ps) == 3 * 4  # starts 0,32,38 and 0,32,64,68
    cover = np.zeros(img.shape, int)
    for p in ps:
        tile = geometry.place_image(img, p, 32)
        assert (tile == img[p.crop_y : p.crop_y + 32, p.crop_x : p.crop_x + 32]).all()
        back = geometry.to_source(tile, p, order=0)
        assert (back == img[p.crop_y : p.crop_y + p.crop_height, p.crop_x : p.crop_x + p.crop_width]).all()
        cover[p.crop_y : p.crop_y + p.crop_height, p.crop_x : p.crop_x + p.crop_width] += 1
    assert cover.min() >= 1


def test_small_image_tile_is_padded():
    [p] = geometry.placements((10, 20), 32, "tile")
    tile = geometry.place_image(np.full((10, 20), 9, np.uint8), p, 32)
    assert tile[:10, :20].min() == 9 and tile[10:].max() == 0 and tile[:, 20:].max() == 0


def test_unknown_mode():
    with pytest.raises(ValueError, match="stretch, pad or tile"):
        geometry.placements((4, 4), 8, "zoom")
