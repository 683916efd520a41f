"""Focal-Tversky against hand-computed cases, and the other losses against smp's."""
from __future__ import annotations

import pytest
import torch
from medsass.trainer.config import LossConfig
from medsass.trainer.losses import build_loss, focal_tversky


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)[None, None]  # (1, 1, H, W)


def test_focal_tversky_hand_computed_fp_heavy():
    pred = t([[1, 1], [1, 0]])
    target = t([[1, 0], [0, 0]])  # TP=1, FP=2, FN=0
    ti = 1 / (1 + 0.7 * 0 + 0.3 * 2)
    assert focal_tversky(pred, target).item() == pytest.approx((1 - ti) ** 0.75, rel=1e-6)


def test_focal_tversky_hand_computed_fn_heavy_weights_false_negatives_by_0_7():
    pred = t([[1, 0], [0, 0]])
    target = t([[1, 1], [1, 0]])  # TP=1, FP=0, FN=2
    ti = 1 / (1 + 0.7 * 2)
    loss = focal_tversky(pred, target, fn_weight=0.7, fp_weight=0.3, gamma=0.75)
    assert loss.item() == pytest.approx((1 - ti) ** 0.75, rel=1e-6)
    swapped = (1 - 1 / (1 + 0.3 * 2)) ** 0.75  # what the paper's weights swapped would give
    assert loss.item() != pytest.approx(swapped, rel=1e-3)


def test_focal_tversky_soft_probabilities_and_batch_pooling():
    pred = torch.tensor([0.5, 0.25, 0.0, 1.0]).view(2, 1, 1, 2)
    target = torch.tensor([1.0, 0.0, 1.0, 1.0]).view(2, 1, 1, 2)
    tp, fp, fn = 0.5 + 1.0, 0.25, 0.5 + 1.0  # pooled over both images
    expected = (1 - tp / (tp + 0.7 * fn + 0.3 * fp)) ** 0.75
    assert focal_tversky(pred, target).item() == pytest.approx(expected, rel=1e-6)
    per_image = [(1 - 0.5 / (0.5 + 0.7 * 0.5 + 0.3 * 0.25)) ** 0.75, (1 - 1 / (1 + 0.7 * 1)) ** 0.75]
    assert focal_tversky(pred, target, per_image=True).item() == pytest.approx(sum(per_image) / 2, rel=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.75])
def test_matches_smp_tversky_with_alpha_fp_beta_fn(gamma):
    from segmentation_models_pytorch.losses import TverskyLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=g)
    target = (torch.rand(3, 1, 8, 8, generator=g) > 0.6).float()
    ours = build_loss(LossConfig(fn_weight=0.7, fp_weight=0.3, gamma=gamma))(logits, target)
    smp_loss = TverskyLoss("binary", alpha=0.3, beta=0.7, gamma=gamma)(logits, target)  # smp: alpha = FP weight
    assert ours.item() == pytest.approx(smp_loss.item(), rel=1e-5)


def test_empty_target_gives_zero_loss_and_finite_zero_gradient():
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    loss = build_loss(LossConfig())(logits, torch.zeros(2, 1, 4, 4))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_perfect_prediction_keeps_gradient_finite():
    target = t([[1, 0], [0, 1]])
    logits = ((target * 2 - 1) * 200).requires_grad_(True)  # sigmoid saturates to exactly 0 / 1
    loss = build_loss(LossConfig())(logits, target)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-3)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", ["dice", "bce", "bce_dice"])
def test_other_losses(name):
    from segmentation_models_pytorch.losses import DiceLoss

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    value = build_loss(LossConfig(name=name))(logits, target).item()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target).item()
    dice = DiceLoss("binary", from_logits=True)(logits, target).item()
    assert value == pytest.approx({"dice": dice, "bce": bce, "bce_dice": bce + dice}[name], rel=1e-5)
