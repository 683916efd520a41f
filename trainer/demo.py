"""``medsass-train demo``: the whole method on the bundled sample, on CPU, in a few minutes.

prep (build-masks on ``sample_data/dsb2018_nuclei``, CC0) -> pretrain on the pseudo-masks ->
fine-tune on 3 labeled tiles -> evaluate on the test split (with the pseudo-mask floor), all into ``OUT``.
Re-running resumes / skips what is finished, like every medsass command.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsass.pipeline.build import build
from medsass.pipeline.config import load_dataset_file
from medsass.trainer.config import load_config
from medsass.trainer.run import run_stages

from medsass.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATASET = REPO / "data_manifests" / "sample.yaml"

DEMO_OVERRIDES = (
    "model.encoder=tu-mobilenetv3_small_100",
    "pretrain.steps=200",
    "pretrain.eval_every=100",
    "pretrain.checkpoint_every=100",
    "finetune.label_count=3",
    "finetune.label_fraction=null",
    "finetune.steps=150",
    "finetune.eval_every=50",
    "finetune.checkpoint_every=50",
    "runtime.num_workers=1",
)


def run_demo(out: str | Path, *, workers: int = 2, progress: bool = True, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Build the sample store and run pretrain -> finetune -> evaluate; returns the evaluate metrics.

    ``overrides`` (``KEY=VALUE``, as ``--set``) apply to the training config after the demo's own, e.g.
    ``pretrain.steps=2`` for a quick check."""
    if not SAMPLE_DATASET.exists():
        raise ConfigError(f"the demo needs the repository's bundled sample ({SAMPLE_DATASET}); run it from a clone of medsass")
    out = Path(out)
    store = out / "sample.zarr"
    prep = load_dataset_file(SAMPLE_DATASET, [f"out={store}", f"runtime.workers={workers}", f"runtime.progress={str(progress).lower()}"])
    cfg = load_config("cpu_small", [f"stores.main={store}", f"out_dir={out / 'run'}", f"runtime.progress={str(progress).lower()}",
                                    *DEMO_OVERRIDES, *overrides])  # a bad --set fails before the prep step
    build(prep)
    results = run_stages(cfg)
    return results["evaluate"].metrics or {}
