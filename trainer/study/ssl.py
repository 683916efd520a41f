"""The self-supervised baseline: SimCLR on the U-Net's encoder, on the same pool and budget as pseudo-mask pretraining.

Two augmented views of each pool image (random resized crop, flip, small rotation, brightness / contrast jitter,
blur) go through the encoder; its deepest feature map, average-pooled, goes through lightly's SimCLR projection
head, and lightly's NT-Xent loss pulls the two views of one image together. The result is written as a pretrain
checkpoint with ``mode: encoder_only`` (the decoder keeps its random init), so ``finetune.init=encoder_only``
carries it like any other pretrained encoder.

Resumable: ``last.pt`` every ``checkpoint_every`` steps; each step's batch and augmentation are drawn from
``(seed, step)``, so a resumed run takes the same steps as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from medsass.trainer import checkpoint as ckpt_mod
from medsass.trainer.config import TrainConfig
from medsass.trainer.data import select_rows
from medsass.trainer.loop import augment_seed, make_scheduler
from medsass.trainer.model import build_model, model_args
from medsass.trainer.stream import ArrayReader, read_rows
from medsass.trainer.study.spec import SSLSpec
from torch import nn

from medsass.errors import ConfigError
from medsass.manifest import read_json, write_json


class SimCLRModel(nn.Module):
    def __init__(self, unet: nn.Module, projection_dim: int):
        super().__init__()
        self.unet = unet
        with torch.no_grad():
            channels = unet.encoder.out_channels[-1]
        self.head = SimCLRProjectionHead(channels, 512, projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.unet.encoder(x)[-1]
        return self.head(F.adaptive_avg_pool2d(feat, 1).flatten(1))


def two_views(x: torch.Tensor, gen: torch.Generator, crop_scale: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented float views of a (B, 1, S, S) batch in [0, 1], every draw from ``gen``."""
    return augment_view(x, gen, crop_scale), augment_view(x, gen, crop_scale)


def augment_view(x: torch.Tensor, gen: torch.Generator, crop_scale: tuple[float, float]) -> torch.Tensor:
    b, _, s, _ = x.shape

    def u(lo: float, hi: float, n: int = b) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    # random resized crop + flip + rotation as one affine warp per image (aspect ratio 3/4 .. 4/3)
    area = u(*crop_scale)
    log_r = u(np.log(3 / 4), np.log(4 / 3))
    sx, sy = torch.sqrt(area * torch.exp(log_r)).clamp(max=1), torch.sqrt(area / torch.exp(log_r)).clamp(max=1)
    tx, ty = (1 - sx) * u(-1, 1), (1 - sy) * u(-1, 1)
    ang = torch.deg2rad(u(-15, 15))
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([sx * cos * flip, -sy * sin, tx], 1), torch.stack([sx * sin * flip, sy * cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # brightness / contrast jitter (p = 0.8), then gaussian blur (p = 0.5)
    jitter = (torch.rand(b, generator=gen) < 0.8).float().view(b, 1, 1, 1)
    contrast, bright = u(0.6, 1.4).view(b, 1, 1, 1), u(-0.2, 0.2).view(b, 1, 1, 1)
    mean = v.mean(dim=(2, 3), keepdim=True)
    v = jitter * ((v - mean) * contrast + mean + bright) + (1 - jitter) * v
    blur = torch.rand(b, generator=gen) < 0.5
    if blur.any():
        v[blur] = _gaussian_blur(v[blur], float(u(0.1, 1.5, 1)))
    return v.clamp(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(round(2 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(2, 3))


def run_ssl(config: TrainConfig, spec: SSLSpec, out_dir: str | Path, log=print) -> dict[str, Any]:
    """SimCLR-pretrain ``config.model``'s encoder on the pretrain pool; writes ``<out_dir>/pretrain/final.pt``."""
    stage = Path(out_dir) / "pretrain"
    done = stage / "done"
    if done.exists():
        return read_json(done)["metrics"]
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    pc = config.pretrain
    steps, batch = spec.steps or pc.steps, spec.batch_size or pc.batch_size
    if batch < 2:
        raise ConfigError("ssl.batch_size must be >= 2 (SimCLR contrasts the other images of the batch)")
    schedule = dataclasses.replace(pc, steps=steps, lr=spec.lr, batch_size=batch)
    store = config.stores["main"]
    rows = select_rows(store, splits=pc.splits, target="pseudo_mask", exclude_degenerate=False)
    if len(rows) < batch:
        raise ConfigError(f"ssl: the pool of {store} has {len(rows)} records, fewer than ssl.batch_size={batch}")
    reader = ArrayReader(store, "image")
    ckpt_mod.seed_everything(config.seed)
    unet = build_model(config.model)
    model = SimCLRModel(unet, spec.projection_dim)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    sched = make_scheduler(opt, schedule)
    loss_fn = NTXentLoss(temperature=spec.temperature)
    step, losses, t0 = 0, [], time.time()
    last = stage / "last.pt"
    if last.exists():
        state = ckpt_mod.load(last)
        model.load_state_dict(state["ssl_model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, losses = int(state["step"]), list(state["losses"])
        log(f"ssl: resuming {stage} at step {step}")
    model.train()
    every = max(1, min(pc.checkpoint_every, steps))
    while step < steps:
        rng = np.random.default_rng(augment_seed(config.seed, step, 0, 0))
        picked = np.sort(rng.choice(rows, size=batch, replace=False))
        x = torch.from_numpy(read_rows(reader, picked)).unsqueeze(1).float().div_(255)
        gen = torch.Generator().manual_seed(augment_seed(config.seed, step, 1, 0))
        v1, v2 = two_views(x, gen, tuple(spec.crop_scale))
        loss = loss_fn(model(v1), model(v2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % every == 0 or step == steps:
            ckpt_mod.save(last, {"kind": "last", "stage": "ssl", "ssl_model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict(), "step": step, "losses": losses,
                                 "model": unet.state_dict(), "model_args": model_args(config.model)})
        if step % max(1, pc.log_every * 10) == 0:
            log(f"ssl {stage}: step {step}/{steps} loss {np.mean(losses[-pc.log_every:]):.3f}")
    metrics = {"steps": steps, "batch_size": batch, "loss_first": float(np.mean(losses[:10])),
               "loss_last": float(np.mean(losses[-10:])), "seconds": round(time.time() - t0, 1)}
    ckpt_mod.save(stage / "final.pt", {"kind": "final", "stage": "pretrain", "mode": "encoder_only", "step": steps,
                                       "model": unet.state_dict(), "model_args": model_args(config.model),
                                       "ssl": dataclasses.asdict(spec), "stores": ckpt_mod.store_digests({"main": store})})
    write_json({"stage": "ssl", "metrics": metrics}, done)
    last.unlink(missing_ok=True)
    return metrics
