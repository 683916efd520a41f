"""Numeric precision and memory layout from the runtime settings, shared by training, evaluation and prediction."""
from __future__ import annotations

import torch


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA and nothing on CPU for ``auto``; None means full precision."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[setting]


def use_channels_last(setting: bool | str, device: torch.device) -> bool:
    return setting is True or (setting == "auto" and device.type == "cuda")
