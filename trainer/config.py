"""The trainer's typed config: one dataclass per concern, loaded from YAML plus ``--set a.b=c``.

A YAML file may start with ``base: other.yaml`` (a path relative to the file): it then holds only
its deltas from that base (nanoGPT style). Mappings merge key by key; lists and scalars replace.
Unknown keys and wrong types are :class:`ConfigError` naming the dotted key (``medsass.configio``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medsass.pipeline.methods import FG_HIGH, FG_LOW
from medsass.trainer.augment import AugmentConfig
from medsass.trainer.records import read_sample_ids, sample_ids_digest

from medsass import configio
from medsass.errors import ConfigError

Stage = Literal["pretrain", "finetune", "evaluate"]
STAGES: tuple[str, ...] = ("pretrain", "finetune", "evaluate")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # example configs, shipped with the package


@dataclass
class ModelConfig:
    encoder: str = "resnet50"  # any smp encoder, or tu-<timm model>; mit_b0 / tu-swin_tiny_patch4_window7_224 for the ViT row
    # initial encoder weights of the first stage (pretrain, or finetune.init=scratch); null = random. An smp weight name
    # (imagenet, ...: smp/timm download it into their cache, the only download medsass makes) or a local state-dict
    # file (.pt/.pth/.safetensors, read weights_only). Never re-loaded on resume, never needed by evaluate / predict
    encoder_weights: str | None = None
    decoder_attention_type: Literal["scse"] | None = "scse"  # the authors' U-Net uses scSE attention

    def __post_init__(self) -> None:
        if self.encoder_weights is not None and not self.encoder_weights.strip():
            raise ValueError("model.encoder_weights is empty: give an smp weight name (imagenet), a state-dict file, or null")


@dataclass
class LossConfig:
    name: Literal["focal_tversky", "dice", "bce", "bce_dice"] = "focal_tversky"  # paper: focal_tversky
    fn_weight: float = 0.7  # focal-Tversky weight of false negatives (paper 0.7; smp calls it beta)
    fp_weight: float = 0.3  # focal-Tversky weight of false positives (paper 0.3; smp calls it alpha)
    gamma: float = 0.75  # loss = (1 - TI) ** gamma
    per_image: bool = False  # false: TP/FP/FN pooled over the batch (as smp); true: mean over images
    # How a soft pseudo-label p in [0, 1] (selftrain mode soft) is used; binary targets give the same loss under all three:
    # threshold: target p >= 0.5; weight: that target, each pixel weighted by its confidence |2p - 1|; target: p itself
    soft_labels: Literal["threshold", "weight", "target"] = "threshold"

    def __post_init__(self) -> None:
        if self.fn_weight < 0 or self.fp_weight < 0 or self.fn_weight + self.fp_weight <= 0:
            raise ValueError("loss.fn_weight and loss.fp_weight must be >= 0 and not both 0")
        if self.gamma <= 0:
            raise ValueError(f"loss.gamma must be > 0, got {self.gamma}")
        if self.soft_labels == "weight" and self.name not in ("focal_tversky", "bce"):
            raise ValueError(f"loss.soft_labels=weight needs loss.name focal_tversky or bce (got {self.name}); "
                             "or use soft_labels threshold / target")


@dataclass
class StageConfig:
    """What pretrain and finetune share: data, optimiser, schedule, logging."""

    stores: dict[str, float] = field(default_factory=dict)  # store name -> sampling weight; {} = all stores, weight 1; 0 drops one
    splits: list[str] = field(default_factory=lambda: ["train"])  # splits to train on (never test)
    steps: int = 1000  # optimiser steps
    batch_size: int = 16  # per process and micro-batch; effective = batch_size * grad_accum * world size
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 3e-4  # Adam learning rate (paper 3e-4)
    weight_decay: float = 0.0  # Adam weight decay (AdamW when > 0)
    schedule: Literal["cosine", "constant"] = "cosine"  # lr schedule after warm-up (paper: cosine)
    warmup_steps: int = 0  # linear warm-up steps
    min_lr: float = 0.0  # cosine floor
    grad_clip: float | None = None  # max gradient norm; null = no clipping
    eval_every: int = 0  # steps between val-IoU checks (best.pt); 0 = only at the end
    checkpoint_every: int = 500  # steps between last.pt checkpoints (resume points)
    log_every: int = 10  # steps between metrics.jsonl lines
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # batched on the device, seeded by (seed, step)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.warmup_steps < 0:
            raise ValueError("eval_every and warmup_steps must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.splits or "test" in self.splits or not set(self.splits) <= {"train", "val"}:
            raise ValueError(f"splits must be a non-empty subset of [train, val] (never test), got {self.splits}")
        bad = {k: w for k, w in self.stores.items() if w < 0}
        if bad:
            raise ValueError(f"store weights must be >= 0, got {bad}")


@dataclass
class PretrainConfig(StageConfig):
    mode: Literal["end_to_end", "encoder_only"] = "end_to_end"  # what is carried to finetune: whole U-Net or encoder only
    target: str = "pseudo_mask"  # pseudo_mask, or pseudo_labels/<name>
    exclude_degenerate: bool = True  # skip records whose pseudo-mask failed QC

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target != "pseudo_mask" and not self.target.startswith("pseudo_labels/"):
            raise ValueError(f"target must be pseudo_mask or pseudo_labels/<name>, got {self.target!r}")


@dataclass
class FinetuneConfig(StageConfig):
    init: Literal["auto", "end_to_end", "encoder_only", "scratch"] = "auto"  # auto: as the pretrain run's mode
    pretrained: str | None = None  # checkpoint or run folder to start from; null = <out_dir>/pretrain/final.pt
    label_fraction: float | None = None  # seeded subset of labeled train records (0.01, 0.1, 1.0); null = all
    label_count: int | None = None  # or a fixed number of them (not both)
    subset_seed: int | None = None  # seed of the subset; null = the run's seed
    # or exactly these records: a picks.csv (column sample_id; others ignored) or a text file, one sample id per line
    labeled_ids: str | None = None
    # init end_to_end: score the pretrained weights on val before the first step; best.pt keeps them unless a
    # fine-tuned checkpoint scores higher, so a fine-tune on a few labels never ends worse on val than the model it
    # started from (docs/results/label_efficiency.md). Needs labeled val records; evaluate.checkpoint auto|best uses it
    keep_start: bool = True
    # the encoder's learning rate as a fraction of lr (the decoder and head keep lr): < 1 is a gentler fine-tune that
    # moves the pretrained features less than the randomly initialised or task-specific parts; 1 = one lr for all
    encoder_lr_scale: float = 1.0
    # joint training: every step also fits a batch of the pretraining pool (pretrain.stores, .splits, .target; labels
    # unused) to its pseudo-masks, loss = loss(labeled batch) + w * loss(pool batch). w = pseudo_weight at step 1 and
    # then, with pseudo_decay linear, falls to 0 at the last step (the run starts as pretraining and ends as a plain
    # fine-tune); none keeps it. 0 = a plain fine-tune. Each step costs about twice as much
    pseudo_weight: float = 0.0
    pseudo_decay: Literal["linear", "none"] = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.pseudo_weight >= 0 and math.isfinite(self.pseudo_weight)):
            raise ValueError(f"pseudo_weight must be >= 0 (0 = a plain fine-tune), got {self.pseudo_weight}")
        if not 0 < self.encoder_lr_scale <= 1:
            raise ValueError(f"encoder_lr_scale must be in (0, 1] (the encoder's fraction of lr), got {self.encoder_lr_scale}")
        if self.label_fraction is not None and self.label_count is not None:
            raise ValueError("set label_fraction or label_count, not both (null one of them)")
        if self.labeled_ids is not None and (self.label_fraction is not None or self.label_count is not None):
            raise ValueError("labeled_ids lists the records to fine-tune on; it replaces label_fraction / label_count, "
                             "so null those (or null labeled_ids)")
        if self.label_fraction is not None and not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.label_count is not None and self.label_count < 1:
            raise ValueError(f"label_count must be >= 1, got {self.label_count}")


@dataclass
class EvaluateConfig:
    stores: list[str] = field(default_factory=list)  # store names to evaluate on; [] = all stores
    splits: list[str] = field(default_factory=lambda: ["test"])  # one metrics.json entry per split
    # auto: finetune's best.pt (best val IoU) where the fine-tune had labeled val records, else its final.pt;
    # pretrain (zero-shot) | finetune (final.pt) | best (best.pt) | PATH to a .pt
    checkpoint: str = "auto"
    target: Literal["label", "pseudo_mask"] = "label"  # label: real masks; pseudo_mask: agreement with Otsu
    batch_size: int = 32  # per process
    threshold: float = 0.5  # on sigmoid probabilities, as smp.metrics
    overlays: int = 4  # overlay PNGs of the N best and N worst images

    def __post_init__(self) -> None:
        if not self.splits or not set(self.splits) <= {"train", "val", "test"}:
            raise ValueError(f"splits must be a non-empty subset of [train, val, test], got {self.splits}")
        if self.batch_size < 1 or self.overlays < 0:
            raise ValueError("batch_size must be >= 1 and overlays >= 0")


@dataclass
class SelfTrainConfig:
    """``medsass-train selftrain``: re-label the pretrain pool with the model's predictions, pretrain again, N rounds."""

    rounds: int = 1  # re-label + pretrain rounds
    name: str = "st"  # round r writes pseudo_labels/<name>_r<r> in every pretrain store (an existing name is refused)
    mode: Literal["hard", "soft"] = "hard"  # hard: {0,1} = p >= threshold; soft: p' = sigmoid(logit p - logit threshold) as uint8 round(255 p')
    # the probability counted as foreground: match_fg = the t at which the pool's foreground fraction equals its parent
    # target's (label-free; undoes the inflation the FN-heavy loss gives p: at 0.5 the masks grow every round), or a number
    threshold: float | Literal["match_fg"] = "match_fg"
    source: str | None = None  # round 0's model (.pt or run folder); null = <out_dir>/pretrain/final.pt (trained first if missing)
    min_fg: float = FG_LOW  # a new pseudo-label with a smaller foreground fraction is degenerate (not pretrained on)
    max_fg: float = FG_HIGH  # ... or with a larger one (both default to prep's QC limits)
    evaluate: bool = True  # zero-shot IoU of every round's model on evaluate.splits' labeled records

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"selftrain.rounds must be >= 1, got {self.rounds}")
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"selftrain.name={self.name!r}: use letters, digits, _ and - only")
        if self.threshold != "match_fg" and not 0 < self.threshold < 1:
            raise ValueError(f"selftrain.threshold must be in (0, 1) or match_fg, got {self.threshold}")
        if not 0 <= self.min_fg < self.max_fg <= 1:
            raise ValueError(f"need 0 <= selftrain.min_fg < selftrain.max_fg <= 1, got {self.min_fg}, {self.max_fg}")


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA, off on CPU
    channels_last: bool | Literal["auto"] = "auto"  # NHWC memory format; auto: on CUDA only (slower on CPU)
    compile: bool = False  # torch.compile the model
    num_workers: int = 4  # DataLoader workers per process
    pin_memory: bool = True  # pinned host memory (CUDA only)
    prefetch_factor: int = 4  # batches prefetched per worker
    shuffle_buffer: int = 256  # records in the stream's shuffle buffer
    in_memory_limit_mb: int = 512  # stores smaller than this are read into memory
    threads: int | None = None  # torch intra-op threads; null = torch default
    progress: bool = True  # tqdm progress bar (rank 0)
    tensorboard: bool = True  # also log to <stage>/tb when tensorboard is installed


@dataclass
class TrainConfig:
    out_dir: str  # one output folder for all stages
    stores: dict[str, str]  # store name -> path of a medsass store (prep output)
    stages: list[Stage] = field(default_factory=lambda: list(STAGES))  # run in this order
    seed: int = 0  # seeds model init, data order, augmentation
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    selftrain: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if not self.stores:
            raise ValueError("stores must name at least one store (name: path)")
        for where, names in (
            ("pretrain.stores", self.pretrain.stores),
            ("finetune.stores", self.finetune.stores),
            ("evaluate.stores", self.evaluate.stores),
        ):
            unknown = [n for n in names if n not in self.stores]
            if unknown:
                raise ValueError(f"{where} names unknown store(s) {unknown}; stores are {list(self.stores)}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages lists a stage twice: {self.stages}")

    def stage_stores(self, stage: str) -> dict[str, float]:
        """Store name -> sampling weight for a stage (weight-0 stores dropped)."""
        if stage == "evaluate":
            return {n: 1.0 for n in (self.evaluate.stores or self.stores)}
        weights = getattr(self, stage).stores or {n: 1.0 for n in self.stores}
        return {n: w for n, w in weights.items() if w > 0}

    def pseudo_pool(self) -> dict[str, float]:
        """The stores (name -> weight) a joint fine-tune (``finetune.pseudo_weight > 0``) draws its pseudo-mask batches
        from: the pretraining's; {} for a plain fine-tune."""
        return self.stage_stores("pretrain") if self.finetune.pseudo_weight > 0 else {}


def find_config(path: str | Path) -> Path:
    """A config file, a run folder (its resolved ``config.yaml``), or an example in ``trainer/configs/`` (``cpu_small``)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir() and (p / "config.yaml").is_file():
        return p / "config.yaml"
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"config file {path} does not exist (examples: {', '.join(sorted(x.stem for x in CONFIG_DIR.glob('*.yaml')))})")


def read_config_data(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """YAML data of ``path`` with its ``base:`` chain merged in."""
    path = find_config(path).resolve()
    if path in _seen:
        raise ConfigError(f"config {path} is its own base (cycle {' -> '.join(map(str, _seen + (path,)))})")
    data = configio.read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a path to a YAML file, got {base!r}")
    return merge(read_config_data(path.parent / base, _seen + (path,)), data)


def merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(source: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """Build the config from a YAML path (or example name) or a mapping, then ``key=value`` overrides."""
    data = source if isinstance(source, dict) else read_config_data(source)
    return configio.load(TrainConfig, data, overrides)


def with_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """A copy of ``cfg`` with ``key=value`` overrides applied (strictly re-validated)."""
    return configio.load(TrainConfig, configio.to_dict(cfg), overrides)


def stage_section(cfg: TrainConfig, stage: str) -> dict[str, Any]:
    """The parts of the config a stage's results depend on (compared on resume and skip)."""
    common = {"seed": cfg.seed, "model": configio.to_dict(cfg.model)}
    stores = {n: cfg.stores[n] for n in cfg.stage_stores(stage)}
    if stage == "evaluate":
        return {"stores": stores, "evaluate": configio.to_dict(cfg.evaluate)}
    loss = configio.to_dict(cfg.loss)
    if loss["soft_labels"] == "threshold":  # added later: at its default it must not change older runs' sections
        del loss["soft_labels"]
    section = {**common, "stores": stores, "loss": loss, stage: configio.to_dict(getattr(cfg, stage))}
    if stage == "finetune" and not cfg.finetune.keep_start:  # added later: off, it must match older runs' sections
        del section["finetune"]["keep_start"]
    if stage == "finetune" and cfg.finetune.encoder_lr_scale == 1.0:  # added later: at its default, as older runs
        del section["finetune"]["encoder_lr_scale"]
    if stage == "finetune" and cfg.finetune.pseudo_weight == 0:  # added later: off, as older runs
        del section["finetune"]["pseudo_weight"], section["finetune"]["pseudo_decay"]
    elif stage == "finetune":  # a joint fine-tune also depends on the pool it fits to pseudo-masks
        pc = cfg.pretrain
        section["pseudo_pool"] = {"stores": {n: cfg.stores[n] for n in cfg.pseudo_pool()}, "weights": cfg.pseudo_pool(),
                                  "splits": pc.splits, "target": pc.target, "exclude_degenerate": pc.exclude_degenerate}
    if stage == "finetune" and cfg.finetune.labeled_ids:  # the ids in the file, not only its path, decide the rows
        section["labeled_ids_sha256"] = sample_ids_digest(read_sample_ids(cfg.finetune.labeled_ids))
    return section

