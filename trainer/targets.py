"""What a stored target array holds, and how the training loop turns it into the loss's target.

A target is ``pseudo_mask``, ``label`` or ``pseudo_labels/<name>``. Its encoding (array attribute
``attrs['medsass']['encoding']``) is ``binary`` (foreground = value > 0) or ``probability_u8``
(round(255 p), written by self-training's soft mode). ``TARGET_TRANSFORMS[encoding]`` is the
:class:`~medsass.trainer.loop.Loop`'s target transform: the uint8 batch target becomes a float target in
[0, 1], augmented together with the image.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from medsass.trainer.augment import AugmentConfig, augment_batch, augment_soft
from torch import Tensor

from medsass import store as store_mod
from medsass.errors import ConfigError

BINARY, PROBABILITY = "binary", "probability_u8"  # array attrs['medsass']['encoding']


def target_encoding(store: str | Path, target: str) -> str:
    """``binary`` or ``probability_u8``: how the values of a target array are to be read."""
    if not target.startswith(store_mod.PSEUDO_GROUP + "/"):
        return BINARY
    if not store_mod.is_store(Path(store) / target):
        return BINARY
    return store_mod.array_meta(store, target).attrs.get("encoding", BINARY)


def is_soft_target(stores, target: str) -> bool:
    """Whether ``target`` holds probabilities in these stores (all of them, or none: mixing is refused)."""
    kinds = {target_encoding(s, target) for s in stores}
    if len(kinds) > 1:
        raise ConfigError(f"{target} is soft (probabilities) in some stores and binary in others; "
                          "pretrain on one kind at a time (give the others weight 0 in pretrain.stores)")
    return kinds == {PROBABILITY}


def to_mask(values: np.ndarray, encoding: str) -> np.ndarray:
    """The hard mask a target array stands for: > 0 (binary), p >= 0.5 i.e. value >= 128 (probability)."""
    return values >= 128 if encoding == PROBABILITY else values > 0


# -- the Loop's target transforms: (images in [0, 1], uint8 targets, augment config, generator) -> (x, y) --

TargetTransform = Callable[[Tensor, Tensor, AugmentConfig, torch.Generator], tuple[Tensor, Tensor]]


def binary_target(images: Tensor, targets: Tensor, cfg: AugmentConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """{0, 1} masks (value > 0), augmented with the image."""
    return augment_batch(images, (targets > 0).float(), cfg, generator)


def probability_target(images: Tensor, targets: Tensor, cfg: AugmentConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Probabilities p = value / 255, resampled with the image (not re-binarised)."""
    return augment_soft(images, targets.float().div_(255), cfg, generator)


TARGET_TRANSFORMS: dict[str, TargetTransform] = {BINARY: binary_target, PROBABILITY: probability_target}
