"""The study file: a typed dataclass, loaded from YAML plus ``--set a.b=c`` (unknown keys are errors).

A study file names the datasets (a dataset file from data_manifests/ or an existing store), the arms, the
label budgets, the seeds, the training schedule (a trainer config, ``base: cpu_small`` allowed) and where
runs and results go. Relative paths are relative to the study file's folder. Example:
``benchmarks/studies/scale_cpu.yaml``; every key is below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medsass.pipeline.methods import METHODS
from medsass.trainer import weights
from medsass.trainer.config import load_config, merge, read_config_data

from medsass import configio
from medsass.errors import ConfigError

# Fine-tuning arms. Pseudo-mask arms start from a pretrain run on one threshold method's pseudo-masks.
PSEUDO_ARMS = ("end_to_end", "encoder_only")
ARMS = ("scratch", *PSEUDO_ARMS, "ssl")
# Optional arms from the study's ``init_weights`` (e.g. ImageNet): fine-tuned from those weights, and those weights
# pretrained end to end on the main target's pseudo-masks, then fine-tuned (its pretraining gives ``weights_zero_shot``).
WEIGHT_ARMS = ("weights", "weights_end_to_end")
# Rows without fine-tuning, made by every pretrain job: the stored pseudo-masks and the pretrained model as they are.
NO_LABEL_ARMS = ("floor", "zero_shot")
ARM_NAMES = {"floor": "pseudo-mask floor", "zero_shot": "zero-shot", "scratch": "scratch", "end_to_end": "end-to-end",
             "encoder_only": "encoder-only", "ssl": "SimCLR encoder", "weights": "init weights",
             "weights_end_to_end": "init weights + end-to-end", "weights_zero_shot": "init weights + pretrain, zero-shot",
             "end_to_end_kept": "end-to-end, keep_start"}


def recipe_arm(arm: str, recipe: str | None) -> str:
    """The report's and plots' arm of a recipe's runs (``end_to_end+gentle``); the arm itself without one."""
    return f"{arm}+{recipe}" if recipe else arm


def teacher_arm(arm: str, recipe: str) -> str:
    """The report's arm of the teachers of a teacher recipe's runs (``scratch+selftrain/teacher``): the arm's plain
    fine-tune, trained again inside each run."""
    return f"{arm}+{recipe}{TEACHER_SUFFIX}"


TEACHER_SUFFIX = "/teacher"


def arm_label(arm: str, target: str, main_target: str) -> str:
    """How tables and plots name an arm (pseudo-mask arms of another target carry the target's name; a recipe's runs,
    ``ARM+RECIPE``, the recipe's; a teacher recipe's teachers, ``ARM+RECIPE/teacher``, say so)."""
    base, _, recipe = arm.partition("+")
    name = ARM_NAMES.get(base, base)
    teacher = recipe.endswith(TEACHER_SUFFIX)
    if (base in ("end_to_end", "end_to_end_kept", "encoder_only", "floor", "zero_shot", "scratch") and target != main_target
            and not (teacher and base == "scratch")):  # scratch's teacher is a plain scratch run: no pseudo-masks read
        name = f"{name} ({target})"
    if teacher:
        return f"{name}, teacher of {recipe[:-len(TEACHER_SUFFIX)]}"
    return f"{name} + {recipe}" if recipe else name


@dataclass
class StoreSpec:
    """A dataset file (built per threshold method with the study's prep settings) or an existing store."""

    name: str
    dataset: str | None = None  # data_manifests/NAME.yaml: one store is built per method
    store: str | None = None  # or an existing medsass store (its own pseudo-masks; then targets: [store])

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.store is None):
            raise ValueError(f"{self.name!r}: give exactly one of dataset (a dataset file) or store (a built store)")


@dataclass
class SiteSpec(StoreSpec):
    """Another site's store, never trained on: every fine-tuned model is scored on its labeled records."""

    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])  # all of it: the model never saw any


@dataclass
class DatasetSpec(StoreSpec):
    # threshold methods pretrained on; the first is the main target (the default recipe), the others are compared on
    # ``other_targets.arms`` / ``other_targets.budgets`` only. ``METHOD@POLARITY`` (e.g. ``fov_otsu_hull@store``) builds
    # that method with ``threshold.polarity=POLARITY`` (auto: per image; store: the store's majority; bright; dark)
    targets: list[str] = field(default_factory=lambda: ["fov_otsu_hull"])
    sites: list[SiteSpec] = field(default_factory=list)
    # also pretrain on the main target's pseudo-masks of the main pool plus the sites' train + val records (unlabeled,
    # as a deploying hospital has them): target "<main>+sites", run with other_targets' arms and budgets
    pool_sites: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool_sites and not self.sites:
            raise ValueError(f"dataset {self.name!r}: pool_sites needs sites")
        if not self.targets:
            raise ValueError(f"dataset {self.name!r}: targets must name at least one threshold method")
        if self.store is not None and self.targets != ["store"]:
            raise ValueError(f"dataset {self.name!r} is an existing store: its pseudo-masks are fixed; set targets: [store]")
        if self.store is None:
            for t in self.targets:
                method, polarity = split_target(t)
                if method not in METHODS or (polarity is not None and polarity not in POLARITIES):
                    raise ValueError(f"dataset {self.name!r}: target {t!r} is not METHOD or METHOD@POLARITY with METHOD one "
                                     f"of {', '.join(METHODS)} and POLARITY one of {', '.join(POLARITIES)}")


POLARITIES = ("auto", "store", "bright", "dark")


def split_target(target: str) -> tuple[str, str | None]:
    """``fov_otsu_hull@store`` -> (``fov_otsu_hull``, ``store``); ``otsu`` -> (``otsu``, None: the prep settings' polarity)."""
    method, sep, polarity = target.partition("@")
    return method, (polarity if sep else None)


@dataclass
class PrepSpec:
    size: int = 128  # stored image size (a multiple of 32)
    salt: str = "medsass-study"  # fixed, so the grouped splits of a dataset's stores are identical
    workers: int = 1  # Dask workers for prep
    overrides: list[str] = field(default_factory=list)  # more dataset-file keys, e.g. threshold.polarity=dark


@dataclass
class OtherTargets:
    arms: list[str] = field(default_factory=lambda: ["end_to_end"])
    budgets: list[str] = field(default_factory=lambda: ["1", "5", "25"])


@dataclass
class SSLSpec:
    """The self-supervised baseline: SimCLR (lightly's NT-Xent loss and projection head) on the encoder."""

    method: Literal["simclr"] = "simclr"
    steps: int | None = None  # null: pretrain.steps (the same compute budget as pseudo-mask pretraining)
    batch_size: int | None = None  # images per step (two views each); null: pretrain.batch_size
    lr: float = 3e-4
    temperature: float = 0.2
    projection_dim: int = 128
    crop_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])  # RandomResizedCrop area range

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError("ssl.temperature and ssl.lr must be > 0")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"ssl.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}")


@dataclass
class StrategiesSpec:
    """Which images to label (``medsass-train suggest``): each strategy picks the n labeled images of the end-to-end
    arm from the labeled train split (as if unlabeled), using the pretrained model; compared with the arm's random
    subset (same seed, same pretrained model, same schedule)."""

    names: list[str] = field(default_factory=lambda: ["diverse", "uncertain", "hybrid"])
    budgets: list[str] = field(default_factory=lambda: ["2", "5", "10", "25"])
    datasets: list[str] = field(default_factory=list)  # [] = every dataset of the study
    # the pseudo-mask targets whose end-to-end model picks and is fine-tuned; [] = each dataset's main target (a target
    # of a dataset that lacks it is skipped there, so one list can name each dataset's default recipe)
    targets: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [n for n in self.names if n not in ("diverse", "uncertain", "hybrid", "random")]
        if bad:
            raise ValueError(f"strategies.names: unknown {bad}; choose from diverse, uncertain, hybrid, random "
                             "(random: suggest's own random order; the end-to-end arm's subset is the baseline)")


# finetune keys that define the comparison itself (which start, which labels, what is kept): not a recipe's to change
RECIPE_FIXED = ("init", "pretrained", "label_count", "label_fraction", "labeled_ids", "subset_seed", "keep_start",
                "splits", "stores")


@dataclass
class RecipeSpec:
    """A variant of a fine-tune arm: the same pretrained start, labeled images, seed and test images, with some
    ``finetune`` keys changed (e.g. a gentler fine-tune, ``{encoder_lr_scale: 0.1}``); the report pairs it with the
    arm as the grid runs it (``end-to-end + NAME − end-to-end``) and with scratch."""

    name: str  # letters, digits, _ and -; the runs go to <seed>/n<NNN>_<name>/
    finetune: dict[str, Any] = field(default_factory=dict)  # trainer finetune keys (nested allowed), over train.finetune
    arms: list[str] = field(default_factory=lambda: ["end_to_end"])
    budgets: list[str] = field(default_factory=lambda: ["1", "2", "5"])
    targets: list[str] = field(default_factory=list)  # pseudo-mask targets of the pseudo-mask arms; [] = the main one
    datasets: list[str] = field(default_factory=list)  # [] = every dataset of the study
    # self-training with a teacher (a joint recipe only): the pool's targets are not the pseudo-masks but the
    # predictions (p >= 0.5) of the same arm's plain fine-tune (same start, labels and seed; trained again in the
    # run's folder teacher/), its best val checkpoint, written to a copy of the store (pool.zarr in the run's folder)
    teacher: bool = False
    # one round of label-free self-training before the fine-tune (pseudo-mask arms only): the arm's pretrained model
    # re-labels the pool (the rule of the study's train.selftrain section: by default the threshold at which the pool's
    # foreground fraction matches its pseudo-masks'), in a copy of the store, and a fresh model is pretrained on those
    # labels (the same schedule); the arm fine-tunes from it. Once per start (<start>/relabel/), shared by the budgets
    relabel: bool = False

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"recipes: name {self.name!r}: use letters, digits, _ and - only")
        if not self.finetune and not self.relabel:
            raise ValueError(f"recipes.{self.name}.finetune is empty: name the finetune keys it changes")
        if self.relabel:
            if self.teacher or self.fits_pseudo_masks:
                raise ValueError(f"recipes.{self.name}.relabel: a re-labelled pretraining is fine-tuned plainly; drop "
                                 "teacher and finetune.pseudo_weight (or relabel)")
            if any(a not in PSEUDO_ARMS for a in self.arms):
                raise ValueError(f"recipes.{self.name}.relabel: only the pseudo-mask arms ({', '.join(PSEUDO_ARMS)}) have "
                                 f"a pretrained model to re-label the pool with; got arms {self.arms}")
        fixed = sorted(set(self.finetune) & set(RECIPE_FIXED))
        if fixed:
            raise ValueError(f"recipes.{self.name}.finetune: {fixed} define the comparison (start, labels, what is "
                             "kept); a recipe changes how the fine-tune trains, e.g. lr, encoder_lr_scale, augment, steps")
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise ValueError(f"recipes.{self.name}.arms: {bad or 'empty'}; choose from {', '.join(ARMS)}")
        for b in self.budgets:
            parse_budget(b)
        if self.teacher and not self.fits_pseudo_masks:
            raise ValueError(f"recipes.{self.name}.teacher: the teacher's labels are fitted beside the labeled batch by a "
                             "joint fine-tune: set finetune.pseudo_weight > 0 (e.g. 1.0), or teacher: false")

    @property
    def fits_pseudo_masks(self) -> bool:
        """A joint recipe (``finetune.pseudo_weight > 0``): every arm fits the pool's pseudo-masks, scratch too, so its
        scratch runs go on each of ``targets`` like the pseudo-mask arms."""
        return float(self.finetune.get("pseudo_weight") or 0) > 0

    def arm_targets(self, arm: str, main: str) -> list[str]:
        """The pseudo-mask targets ``arm`` runs on under this recipe: ``targets`` (or the main one) where the arm reads
        pseudo-masks, else the main target (whose store it reads for images and labels only)."""
        return (self.targets or [main]) if arm in PSEUDO_ARMS or (arm == "scratch" and self.fits_pseudo_masks) else [main]


@dataclass
class ConvergenceSpec:
    """The convergence check: scratch (or other arms) re-run with ``factor`` x the fine-tune steps."""

    budgets: list[str] = field(default_factory=lambda: ["10", "100%"])
    arms: list[str] = field(default_factory=lambda: ["scratch"])
    factor: int = 2
    tolerance: float = 0.01  # |IoU(long) - IoU(short)| below this: converged
    # recipes whose schedule is checked too (e.g. one with more fine-tune steps, where the grid's had not converged):
    # their runs of these arms at these budgets, and the same with factor x the recipe's steps, on the recipe's datasets
    recipes: list[str] = field(default_factory=list)


@dataclass
class Study:
    out_dir: str  # stores and runs (large; keep it outside git)
    results_dir: str  # results.jsonl (the ledger; commit it), results.csv, tables, plots
    datasets: list[DatasetSpec]
    train: dict[str, Any]  # a trainer config without out_dir / stores / seed (``base: cpu_small`` allowed)
    name: str = ""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    budgets: list[str] = field(default_factory=lambda: ["1", "2", "5", "10", "25", "50", "100%"])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    # initial encoder weights for the arms weights / weights_end_to_end (list them in arms): an smp weight name
    # (imagenet; downloaded once by smp/timm into their cache) or a state-dict file (a path relative to the study file)
    init_weights: str | None = None
    other_targets: OtherTargets = field(default_factory=OtherTargets)
    ssl: SSLSpec = field(default_factory=SSLSpec)
    convergence: ConvergenceSpec | None = field(default_factory=ConvergenceSpec)
    strategies: StrategiesSpec | None = None
    recipes: list[RecipeSpec] = field(default_factory=list)  # fine-tune variants, each paired with its arm
    prep: PrepSpec = field(default_factory=PrepSpec)
    jobs: int = 1  # training runs in parallel (processes); each uses train.runtime.threads threads
    keep_final: bool = False  # keep each fine-tune run's final.pt (best.pt, the one evaluated, is always kept)
    bootstrap: int = 2000  # resamples for the paired intervals

    def __post_init__(self) -> None:
        for b in self.budgets + self.other_targets.budgets + (self.convergence.budgets if self.convergence else []) + (
                self.strategies.budgets if self.strategies else []):
            parse_budget(b)
        arms = self.arms + self.other_targets.arms + (self.convergence.arms if self.convergence else [])
        bad = [a for a in arms if a not in ARMS + WEIGHT_ARMS]
        if bad:
            raise ValueError(f"unknown arm(s) {bad}; arms are {', '.join(ARMS + WEIGHT_ARMS)}")
        weight_arms = [a for a in arms if a in WEIGHT_ARMS]
        if weight_arms and not self.init_weights:
            raise ValueError(f"arm(s) {weight_arms} need init_weights: an smp weight name (imagenet) or a state-dict file")
        if self.init_weights and not any(a in WEIGHT_ARMS for a in self.arms):
            raise ValueError(f"init_weights={self.init_weights!r} is used only by the arms {', '.join(WEIGHT_ARMS)}: "
                             "add one to arms (or remove init_weights)")
        if any(a not in PSEUDO_ARMS for a in self.other_targets.arms):
            raise ValueError(f"other_targets.arms may hold only {', '.join(PSEUDO_ARMS)} (the others use no pseudo-masks)")
        if self.jobs < 1 or not self.seeds or self.bootstrap < 100:
            raise ValueError("jobs must be >= 1, seeds non-empty and bootstrap >= 100")
        if self.convergence and self.convergence.factor < 2:
            raise ValueError("convergence.factor must be >= 2")
        names = [d.name for d in self.datasets] + [s.name for d in self.datasets for s in d.sites]
        if len(set(d.name for d in self.datasets)) != len(self.datasets):
            raise ValueError(f"dataset names must be unique: {names}")
        recipes = [r.name for r in self.recipes]
        if len(set(recipes)) != len(recipes):
            raise ValueError(f"recipe names must be unique: {recipes}")
        unknown = sorted({n for r in self.recipes for n in r.datasets} - {d.name for d in self.datasets})
        if unknown:
            raise ValueError(f"recipes name datasets the study does not have: {unknown}")
        conv = self.convergence
        for name in conv.recipes if conv else []:
            r = next((r for r in self.recipes if r.name == name), None)
            if r is None:
                raise ValueError(f"convergence.recipes: {name!r} is not one of the study's recipes ({', '.join(recipes) or 'none'})")
            if not set(r.arms) & set(conv.arms):
                raise ValueError(f"convergence.recipes: recipe {name!r} runs {r.arms}, none of the arms the check "
                                 f"re-runs ({conv.arms}): add one to the recipe's arms or to convergence.arms")


def parse_budget(text: str) -> tuple[str, float]:
    """``"5"`` -> ("count", 5); ``"10%"`` -> ("fraction", 0.1)."""
    t = str(text).strip()
    try:
        if t.endswith("%"):
            v = float(t[:-1]) / 100
            if 0 < v <= 1:
                return "fraction", v
        elif int(t) >= 1:
            return "count", int(t)
    except ValueError:
        pass
    raise ValueError(f"budget {text!r}: use a label count (5) or a percentage of the labeled train split (10%)")


def budget_counts(budgets: list[str], n_available: int) -> dict[int, list[str]]:
    """The budgets grouped by how many labeled images each means (``"100%"`` and ``"50"`` may be the same run)."""
    out: dict[int, list[str]] = {}
    for b in budgets:
        out.setdefault(budget_count(b, n_available), []).append(b)
    return out


def budget_count(text: str, n_available: int) -> int:
    """How many labeled train images a budget means (at most all of them, at least one)."""
    kind, v = parse_budget(text)
    n = int(v) if kind == "count" else round(v * n_available)
    return max(1, min(n, n_available))


def train_section(train: dict[str, Any], base: Path) -> dict[str, Any]:
    """A study's ``train:`` mapping with its ``base:`` config merged in (a path relative to the study file's folder
    ``base``, or an example name such as ``cpu_small``), less the keys the runner sets per run."""
    train = dict(train)
    parent = train.pop("base", None)
    if parent is not None:
        local = base / str(parent)
        train = merge(read_config_data(local if local.exists() else parent), train)
    for key in ("out_dir", "stores", "seed", "stages"):
        train.pop(key, None)  # set per run
    return train


def load_study(path: str | Path, overrides: list[str] = ()) -> tuple[Study, dict[str, Any]]:
    """The study and its merged trainer config data (``train.base`` resolved); paths made absolute."""
    path = Path(path).resolve()
    data = configio.read_yaml(path)
    try:
        study = configio.load(Study, data, list(overrides))
    except ConfigError as exc:  # name the study file, as the train: and recipes checks below do
        raise ConfigError(f"{path}: {exc}") from None
    base = path.parent

    def res(p: str | None) -> str | None:
        return None if p is None else p if Path(p).is_absolute() else str((base / p).resolve())

    study.out_dir, study.results_dir = res(study.out_dir), res(study.results_dir)
    if study.init_weights and weights.is_file(study.init_weights):
        study.init_weights = res(study.init_weights)
        if not Path(study.init_weights).is_file():
            raise ConfigError(f"{path}: init_weights: no such file {study.init_weights}")
    for d in study.datasets:
        d.dataset, d.store = res(d.dataset), res(d.store)
        for s in d.sites:
            s.dataset, s.store = res(s.dataset), res(s.store)
    train = train_section(study.train, base)
    if "keep_start" in (train.get("finetune") or {}):
        raise ConfigError(f"{path}: train.finetune.keep_start: the study runs its fine-tunes without it and reports "
                          "the keep_start arm from its ledger (the pretrainings' val scores); remove the key")
    try:  # the schedule must be a valid trainer config on its own
        load_config({**train, "out_dir": "x", "stores": {"main": "x"}})
    except ConfigError as exc:
        raise ConfigError(f"{path}: train: {exc}") from None
    if study.strategies:  # a target no dataset has is a typo, not a fallback to the main target
        known = {t for d in study.datasets for t in [*d.targets, *([f"{d.targets[0]}+sites"] if d.pool_sites else [])]}
        unknown = [t for t in study.strategies.targets if t not in known]
        if unknown:
            raise ConfigError(f"{path}: strategies.targets: {unknown} is no dataset's target ({', '.join(sorted(known))})")
    for r in study.recipes:  # and with each recipe
        try:
            load_config({**recipe_train(train, r), "out_dir": "x", "stores": {"main": "x"}})
        except ConfigError as exc:
            raise ConfigError(f"{path}: recipes.{r.name}: {exc}") from None
    return study, train


def recipe_train(train: dict[str, Any], recipe: RecipeSpec) -> dict[str, Any]:
    """The study's trainer config data with the recipe's finetune keys merged in."""
    return {**train, "finetune": merge(train.get("finetune") or {}, recipe.finetune)}
