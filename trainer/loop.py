"""The training loop: batches in, optimiser steps out; checkpoints, validation and logs by callback.

Readable in one sitting. Everything that makes a step reproducible lives in :class:`LoopState`
(step, micro-batches consumed) plus the model/optimiser/scheduler/scaler states, and the
augmentation generator is seeded from (seed, step, micro-batch, rank) — so a run resumed from a
checkpoint takes exactly the steps an uninterrupted run takes.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from medsass.trainer import checkpoint as ck
from medsass.trainer import preempt
from medsass.trainer.config import StageConfig, stage_section
from medsass.trainer.data import ShardStream, Source, make_loader
from medsass.trainer.distributed import DistInfo
from medsass.trainer.evaluate import EvalSource, val_iou
from medsass.trainer.losses import LossFn, build_loss
from medsass.trainer.mask_quality import agreement_note, pool_agreement
from medsass.trainer.model import ENCODER_PREFIX, build_model, freeze_unused, init_encoder, load_weights, model_args
from medsass.trainer.precision import amp_dtype, use_channels_last
from medsass.trainer.targets import BINARY, PROBABILITY, TARGET_TRANSFORMS, TargetTransform, binary_target, is_soft_target
from medsass.trainer.weights import describe, replaced_since
from torch import nn
from tqdm.auto import tqdm

from medsass import configio, manifest
from medsass.atomic import atomic_write_bytes
from medsass.errors import ConfigError, MedsassWarning
from medsass.jsonl import read_jsonl


@dataclass
class LoopState:
    step: int = 0  # optimiser steps done
    batches: int = 0  # micro-batches this rank has consumed from its stream
    best: float | None = None  # best val IoU so far
    best_step: int | None = None  # the step best.pt holds (0: the starting weights, kept by finetune.keep_start)


def param_groups(model: nn.Module, cfg: StageConfig) -> list[dict[str, Any]]:
    """The trainable parameters: one group at ``cfg.lr``, or with ``encoder_lr_scale`` < 1 (finetune) the encoder's
    at ``lr * encoder_lr_scale`` first and the rest (decoder, attention, head) at ``lr``. The schedule scales both."""
    scale = getattr(cfg, "encoder_lr_scale", 1.0)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if scale == 1.0:
        return [{"params": [p for _, p in params], "lr": cfg.lr}]
    enc = [p for n, p in params if n.startswith(ENCODER_PREFIX)]
    if not enc:
        raise ConfigError(f"finetune.encoder_lr_scale={scale}: this model has no trainable encoder parameters "
                          f"(named {ENCODER_PREFIX}*); set it to 1")
    rest = [p for n, p in params if not n.startswith(ENCODER_PREFIX)]
    return [{"params": enc, "lr": cfg.lr * scale}, {"params": rest, "lr": cfg.lr}]


def make_optimizer(model: nn.Module, cfg: StageConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.weight_decay > 0:
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr)


def lr_factor(step: int, cfg: StageConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warm-up, then cosine to ``min_lr`` (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: StageConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def augment_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1_009 + micro) * 65_537 + rank & (2**63 - 1)


@dataclass
class PseudoTerm:
    """Joint training (``finetune.pseudo_weight``): each labeled micro-batch is trained beside a batch of pool images
    fitted to their pseudo-masks, the pool's loss weighted by :meth:`weight`."""

    batches: Iterator[dict[str, torch.Tensor]]
    start: float  # the weight at the first step
    decay: str  # linear: falls to 0 over ``steps``; none: constant
    steps: int

    def weight(self, step: int) -> float:
        """The pool loss's weight in the step that ``step`` steps precede (0 = the first)."""
        return self.start * (1 - step / self.steps) if self.decay == "linear" else self.start


class MetricsLog:
    """``metrics.jsonl`` (rank 0), plus TensorBoard when installed; on resume, drops lines past the resume step."""

    def __init__(self, path: Path, *, enabled: bool, resume_step: int, tensorboard: bool):
        self.path, self.enabled, self.tb = path, enabled, None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # lines a killed run wrote after its last checkpoint would repeat; a torn last line goes too
            remedy = "The file only holds the training log: delete that line (or the file, losing the curves so far) and re-run"
            kept = [r for r in read_jsonl(path, remedy=remedy) if r.get("step", 0) <= resume_step]
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        if tensorboard:
            with contextlib.suppress(ImportError):  # lazy: tensorboard is optional (not installed here) and off by default
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tb"), purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def note(self, step: int, text: str, *, echo: bool = True) -> None:
        """A line of text in the log (``{"step", "note", "time"}``), and on stderr with ``echo``."""
        self.write({"step": step, "note": text, "time": time.time()})
        if echo and self.enabled:
            print(f"medsass: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Loop:
    """One stage's optimisation: ``Loop(...).run(batches, state, ...)``."""

    def __init__(
        self,
        model: nn.Module,
        cfg: StageConfig,
        loss_fn: LossFn,
        *,
        seed: int,
        dist: DistInfo,
        amp: str = "auto",
        channels_last: bool = False,
        compile: bool = False,
        target_transform: TargetTransform = binary_target,
    ):
        self.model, self.cfg, self.loss_fn, self.seed, self.dist = model, cfg, loss_fn, seed, dist
        self.device = dist.device
        self.amp_dtype = amp_dtype(amp, self.device)
        self.channels_last = channels_last
        self.target_transform = target_transform  # uint8 target -> float target, augmented with the image (trainer/targets.py)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        net: nn.Module = model
        if dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.net = torch.compile(net) if compile else net

    # -- state (for checkpoints) -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])

    # -- one step --------------------------------------------------------------------------
    def prepare(self, batch: dict[str, torch.Tensor], step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 batch -> float images in [0, 1] and targets in [0, 1] on the device, augmented."""
        x = batch["image"].to(self.device, non_blocking=True).float().div_(255)
        t = batch["target"].to(self.device, non_blocking=True)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(augment_seed(self.seed, step, micro, self.dist.rank))
        x, y = self.target_transform(x, t, self.cfg.augment, gen)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]], state: LoopState, pseudo: PseudoTerm | None = None) -> float:
        """One optimiser step; with ``pseudo``, each micro-batch goes through the network together with a pool batch
        (one forward pass, so batch norm sees both) and the loss adds the pool batch's, weighted."""
        cfg, accum = self.cfg, self.cfg.grad_accum
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self.prepare(next(batches), state.step, micro)
            n = x.shape[0]
            if pseudo is not None:  # its own augmentation draws: micro-batch numbers after the labeled ones
                xp, yp = self.prepare(next(pseudo.batches), state.step, accum + micro)
                x = torch.cat([x, xp])
            state.batches += 1
            last = micro == accum - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.net.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                    logits = self.net(x).float()
                loss = self.loss_fn(logits[:n], y)
                if pseudo is not None:
                    loss = loss + pseudo.weight(state.step) * self.loss_fn(logits[n:], yp)
                loss = loss / accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with warnings.catch_warnings():  # fp16: the scaler may skip a step; the schedule still counts it
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            self.scheduler.step()
        state.step += 1
        value = float(total)
        if not math.isfinite(value) and self.amp_dtype != torch.float16:  # fp16: the scaler skips such steps
            raise FloatingPointError(f"loss is {value} at step {state.step}; lower the lr or check the data")
        return value

    # -- the loop --------------------------------------------------------------------------
    def run(
        self,
        batches: Iterator[dict[str, torch.Tensor]],
        state: LoopState,
        *,
        validate: Callable[[nn.Module], float] | None,
        checkpoint: Callable[[str, LoopState], None],
        log: MetricsLog,
        progress: bool = True,
        desc: str = "train",
        keep_start: bool = False,
        pseudo: PseudoTerm | None = None,
    ) -> LoopState:
        """Train from ``state`` to ``cfg.steps``; ``checkpoint(kind, state)`` with kind last | best.

        ``keep_start``: score the starting weights on val before step 1, as the first best.pt candidate.
        ``pseudo``: joint training, a pool batch fitted to its pseudo-masks beside each labeled one."""
        cfg = self.cfg
        per_step = cfg.batch_size * cfg.grad_accum * self.dist.world_size
        bar = tqdm(total=cfg.steps, initial=state.step, desc=desc, disable=not (progress and self.dist.is_main), dynamic_ncols=True)
        busy, losses = 0.0, []  # seconds spent in train steps since the last log line (not eval / checkpoints)
        if validate is not None and state.step == 0 and keep_start:
            state.best, state.best_step = validate(self.model), 0  # the starting weights: the first best.pt candidate
            log.write({"step": 0, "val_iou": state.best, "best_val_iou": state.best})
            checkpoint("best", state)
        while state.step < cfg.steps:
            t0 = time.perf_counter()
            losses.append(self.train_step(batches, state) if pseudo is None else self.train_step(batches, state, pseudo))
            busy += time.perf_counter() - t0
            # the last group's: lr itself (with finetune.encoder_lr_scale the first is the encoder's, scaled)
            step, lr = state.step, self.scheduler.get_last_lr()[-1]
            rate = len(losses) * per_step / max(busy, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.write({"step": step, "loss": sum(losses) / len(losses), "lr": lr, "samples_per_s": rate, "time": time.time()})
                busy, losses = 0.0, []
            if validate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                val = validate(self.model)
                improved = state.best is None or val > state.best
                state.best = val if improved else state.best
                state.best_step = step if improved else state.best_step
                log.write({"step": step, "val_iou": val, "best_val_iou": state.best})
                if improved:
                    checkpoint("best", state)
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint("last", state)
            if preempt.requested(self.dist):  # SIGUSR1/SIGTERM: last.pt now, exit PREEMPT_EXIT (trainer/preempt.py)
                preempt.stop(checkpoint, state, self.dist, log)
        bar.close()
        return state


# -- a training stage, wired: model, data, checkpoints ---------------------------------------------


def keeps_start(config, plan) -> bool:
    """finetune.keep_start applies to a fine-tune that starts from a whole pretrained model (init end_to_end):
    from scratch or from an encoder alone, the start is (partly) random and never the model to keep."""
    return plan.stage == "finetune" and config.finetune.keep_start and plan.init == "end_to_end"


def run_training(config, plan, dist) -> dict[str, Any]:
    """Run (or resume) the pretrain or finetune stage ``plan`` describes; returns its summary."""
    stage, scfg, rt = plan.stage, getattr(config, plan.stage), config.runtime
    ck.seed_everything(config.seed)
    # model.encoder_weights initialise only a stage that starts from nothing, and never under a resume
    model = build_model(config.model)
    loaded = init_encoder(model, config.model) if plan.resume is None and plan.init == "scratch" else None
    init_id = loaded["identity"] if loaded else (plan.resume or {}).get("encoder_weights")  # kept across resumes
    if plan.resume is None and plan.init in ("end_to_end", "encoder_only"):
        load_weights(model, ck.load(plan.source)["model"], parts="all" if plan.init == "end_to_end" else "encoder")
    model.to(dist.device)
    target = config.pretrain.target if stage == "pretrain" else "label"
    weights = config.stage_stores(stage)
    stores = {n: config.stores[n] for n in weights}
    sources = [Source(store=Path(stores[n]), rows=plan.rows[n], weight=weights[n], target=target) for n in weights]
    if dist.enabled:  # DDP refuses parameters that get no gradient
        freeze_unused(model, plan.image_size)
    soft = stage == "pretrain" and is_soft_target(stores.values(), target)
    loop = Loop(model, scfg, build_loss(config.loss), seed=config.seed, dist=dist, amp=rt.amp,
                channels_last=use_channels_last(rt.channels_last, dist.device), compile=rt.compile,
                target_transform=TARGET_TRANSFORMS[PROBABILITY if soft else BINARY])
    state = LoopState()
    if plan.resume is not None:
        model.load_state_dict(plan.resume["model"])
        loop.load_state_dict(plan.resume)
        ck.restore_rng(plan.resume["rng"])
        state = LoopState(plan.resume["step"], plan.resume["batches"], plan.resume["best"], plan.resume.get("best_step"))

    def loader_of(sources: list[Source]):  # the same start_batch on resume: pool batches stay in step with the labeled ones
        stream = ShardStream(sources, seed=config.seed, rank=dist.rank, world_size=dist.world_size, shuffle_buffer=rt.shuffle_buffer,
                             batch_size=scfg.batch_size, start_batch=state.batches, in_memory_limit_mb=rt.in_memory_limit_mb)
        return make_loader(stream, batch_size=scfg.batch_size, num_workers=rt.num_workers,
                           pin_memory=rt.pin_memory and dist.device.type == "cuda", prefetch_factor=rt.prefetch_factor)

    loader = loader_of(sources)
    pool = config.pseudo_pool() if stage == "finetune" else {}  # joint training: the pool's pseudo-mask batches
    pool_loader = loader_of([Source(store=Path(config.stores[n]), rows=plan.pseudo_rows[n], weight=w, target=config.pretrain.target)
                             for n, w in pool.items()]) if pool else None
    # val IoU compares hard masks (> 0): not defined for a probability target, so no best.pt then
    val_sources = [] if soft else [EvalSource(n, Path(stores[n]), r, target) for n, r in plan.val_rows.items()]

    def validate(m: nn.Module) -> float:
        return val_iou(m, val_sources, batch_size=config.evaluate.batch_size, dist=dist, amp=loop.amp_dtype)

    keep_start = keeps_start(config, plan) and bool(val_sources)  # nothing to score the start on without val
    digests = ck.store_digests({**stores, **{n: config.stores[n] for n in pool}})
    mode = config.pretrain.mode if stage == "pretrain" else plan.init

    def payload(kind: str, st: LoopState) -> dict[str, Any]:
        out = {"kind": kind, "stage": stage, "model": model.state_dict(), "model_args": model_args(config.model),
               "mode": mode, "step": st.step, "batches": st.batches, "best": st.best, "best_step": st.best_step, "config": configio.to_dict(config),
               "section": stage_section(config, stage), "stores": digests, "num_workers": rt.num_workers,
               "world_size": dist.world_size, "rng": ck.capture_rng(), "encoder_weights": init_id}
        return {**out, **loop.state_dict()} if kind == "last" else out

    def checkpoint(kind: str, st: LoopState) -> None:
        if dist.is_main and kind == "last":
            ck.save_last(plan.dir, payload(kind, st))  # keeps the one it replaces as last.prev.pt
        elif dist.is_main:
            ck.save(plan.dir / f"{kind}.pt", payload(kind, st))

    log = MetricsLog(plan.dir / "metrics.jsonl", enabled=dist.is_main, resume_step=state.step, tensorboard=rt.tensorboard)
    if loaded:
        log.note(state.step, describe(loaded))
    replaced = replaced_since(init_id, config.model.encoder_weights) if plan.resume is not None and dist.is_main else None
    if replaced:
        log.note(state.step, replaced, echo=False)
        warnings.warn(replaced, MedsassWarning, stacklevel=2)
    if pool and plan.resume is None and dist.is_main:  # a joint fine-tune: how close are the pseudo-masks it fits?
        text, low = agreement_note(pool_agreement(config.stores, plan.pseudo_rows, config.pretrain.target))
        log.note(state.step, text, echo=not low)
        if low:
            warnings.warn(text, MedsassWarning, stacklevel=2)
    try:
        with preempt.watch():  # before iter(): forked DataLoader workers inherit the handlers
            batches = iter(loader)
            pool_batches = None if pool_loader is None else iter(pool_loader)
            pseudo = None if pool_batches is None else PseudoTerm(pool_batches, config.finetune.pseudo_weight,
                                                                  config.finetune.pseudo_decay, scfg.steps)
            try:
                loop.run(batches, state, validate=validate if val_sources else None, checkpoint=checkpoint, log=log, progress=rt.progress, desc=stage,
                         keep_start=keep_start, pseudo=pseudo)
            finally:
                # the workers ignore SIGTERM (stream.ignore_sigterm), so stop them here: an exception's traceback
                # keeps the iterator alive until exit, where multiprocessing would wait for them after a SIGTERM
                for it in (batches, pool_batches):
                    getattr(it, "_shutdown_workers", lambda: None)()
        kept = keep_start and state.best_step == 0
        if kept:
            log.note(state.step, f"best.pt is the pretrained model: no fine-tuned checkpoint beat its val IoU "
                                 f"{state.best:.4f} (finetune.keep_start)")
    finally:
        log.close()
    summary = {"step": state.step, "best_val_iou": state.best, "best_step": state.best_step,
               "samples": state.step * scfg.batch_size * scfg.grad_accum * dist.world_size}
    if keep_start:
        summary["start_kept"] = kept
    if dist.is_main:
        checkpoint("last", state)
        checkpoint("final", state)
        manifest.write_json({"stage": stage, "section": stage_section(config, stage), "metrics": summary, "init": mode,
                    "source": str(plan.source) if plan.source else None, "source_id": ck.file_id(plan.source)}, plan.dir / "done")
        # A finished stage is never resumed, so its resume point (weights + optimiser state, about 3x the model)
        # goes, as nnU-Net drops checkpoint_latest. Killed before this line, a re-run sees "done" and skips.
        (plan.dir / ck.LAST).unlink(missing_ok=True)
        (plan.dir / ck.PREV).unlink(missing_ok=True)
    return summary
