"""Batched augmentation: image/mask alignment, exact flips and rotations, reproducibility."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from medsass.trainer.augment import AugmentConfig, augment_batch

GEOMETRY_ONLY = AugmentConfig(brightness=0.0, contrast=0.0, gamma=0.0, noise_std=0.0)
NOTHING = AugmentConfig(hflip=0, vflip=0, rot90=0, affine=0, brightness=0, contrast=0, gamma=0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _binary_batch(b: int = 16, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    x = torch.zeros(b, 1, size, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(b):  # an asymmetric shape per sample, so every transform is visible
        cy, cx = torch.randint(size // 4, size - size // 4, (2,), generator=g).tolist()
        r = size // 6
        x[i, 0] = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r) | ((yy < size // 8) & (xx < size // 2))
    return x


def _cfg(base: AugmentConfig, **kw) -> AugmentConfig:
    return dataclasses.replace(base, **kw)


def test_nothing_is_identity():
    x = torch.rand(4, 1, 16, 16)
    m = (x > 0.5).float()
    ax, am = augment_batch(x, m, NOTHING, _gen(0))
    assert torch.equal(ax, x) and torch.equal(am, m)


def test_mask_stays_aligned_with_image():
    """Mask == (binary image > 0.5) before, hence exactly after: same warp, bilinear then > 0.5."""
    x = _binary_batch()
    cfg = _cfg(GEOMETRY_ONLY, affine=1.0, max_rotate_deg=30.0, max_scale=0.2, max_translate=0.1)
    ax, am = augment_batch(x, x.clone(), cfg, _gen(1))
    assert torch.equal(am, (ax > 0.5).float())
    assert not torch.equal(am, x)  # something did change
    assert set(am.unique().tolist()) <= {0.0, 1.0}


def test_flips_are_exact():
    x, m = torch.rand(8, 1, 12, 12), _binary_batch(8, 12)
    ax, am = augment_batch(x, m, _cfg(NOTHING, hflip=1.0), _gen(0))
    assert torch.equal(ax, x.flip(-1)) and torch.equal(am, m.flip(-1))
    ax, am = augment_batch(x, m, _cfg(NOTHING, vflip=1.0), _gen(0))
    assert torch.equal(ax, x.flip(-2)) and torch.equal(am, m.flip(-2))


def test_rot90_is_exact_and_shared_by_image_and_mask():
    x, m = torch.rand(32, 1, 10, 10), _binary_batch(32, 10)
    ax, am = augment_batch(x, m, _cfg(NOTHING, rot90=1.0), _gen(2))
    turns_seen = set()
    for i in range(len(x)):
        turns = [k for k in (1, 2, 3) if torch.equal(ax[i], torch.rot90(x[i], k, (-2, -1)))]
        assert len(turns) == 1
        assert torch.equal(am[i], torch.rot90(m[i], turns[0], (-2, -1)))
        turns_seen.add(turns[0])
    assert turns_seen == {1, 2, 3}


def test_probabilities_apply_per_sample():
    x = torch.rand(200, 1, 8, 8)
    ax, _ = augment_batch(x, torch.zeros_like(x), _cfg(NOTHING, hflip=0.5), _gen(3))
    flipped = sum(torch.equal(a, b.flip(-1)) for a, b in zip(ax, x)) / len(x)
    assert 0.35 < flipped < 0.65


def test_affine_without_range_is_identity():
    x = torch.rand(4, 1, 16, 16)
    cfg = _cfg(NOTHING, affine=1.0, max_rotate_deg=0.0, max_scale=0.0, max_translate=0.0)
    ax, am = augment_batch(x, (x > 0.5).float(), cfg, _gen(0))
    assert torch.allclose(ax, x, atol=1e-5) and torch.equal(am, (x > 0.5).float())


def test_reproducible_with_same_generator_state():
    x = torch.rand(8, 1, 32, 32)
    m = (x > 0.6).float()
    cfg = AugmentConfig(noise_std=0.05)
    a = augment_batch(x, m, cfg, _gen(42))
    b = augment_batch(x, m, cfg, _gen(42))
    c = augment_batch(x, m, cfg, _gen(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_default_outputs_stay_in_range_and_binary():
    x = torch.rand(16, 1, 32, 32)
    m = (x > 0.5).float()
    ax, am = augment_batch(x, m, AugmentConfig(noise_std=0.1), _gen(5))
    assert ax.shape == x.shape and ax.dtype == x.dtype and 0 <= ax.min() and ax.max() <= 1
    assert set(am.unique().tolist()) <= {0.0, 1.0}


def test_intensity_touches_image_only():
    x = torch.rand(8, 1, 16, 16)
    m = (x > 0.5).float()
    cfg = AugmentConfig(hflip=0, vflip=0, rot90=0, affine=0, brightness=0.2, contrast=0.2, gamma=0.2)
    ax, am = augment_batch(x, m, cfg, _gen(0))
    assert torch.equal(am, m) and not torch.allclose(ax, x)


def test_bad_input():
    with pytest.raises(TypeError, match="float"):
        augment_batch(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2, 1, 8, 8), NOTHING, _gen(0))
    with pytest.raises(ValueError, match="square"):
        augment_batch(torch.zeros(2, 1, 8, 6), torch.zeros(2, 1, 8, 6), _cfg(NOTHING, rot90=0.5), _gen(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu_with_a_cpu_generator():
    x = torch.rand(8, 1, 32, 32)
    m = (x > 0.5).float()
    cfg = AugmentConfig()
    cpu = augment_batch(x, m, cfg, _gen(9))
    gpu = augment_batch(x.cuda(), m.cuda(), cfg, _gen(9))
    assert torch.allclose(cpu[0], gpu[0].cpu(), atol=1e-4)
    assert (cpu[1] != gpu[1].cpu()).float().mean() < 1e-3  # boundary pixels may round differently
    dev = torch.Generator(device="cuda")
    a = augment_batch(x.cuda(), m.cuda(), cfg, dev.manual_seed(1))
    b = augment_batch(x.cuda(), m.cuda(), cfg, dev.manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
