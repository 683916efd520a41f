from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
PH2 = REPO.parent / "shared" / "data" / "ph2_dermoscopy"
TINY = "tu-mobilenetv3_small_100"

# medsass-train options for a run of seconds on one CPU (size-64 store, 2 test images).
TINY_TRAIN = [
    "--set", f"model.encoder={TINY}", "--set", "pretrain.steps=6", "--set", "pretrain.batch_size=4", "--set", "pretrain.log_every=1",
    "--set", "pretrain.eval_every=0", "--set", "finetune.steps=4", "--set", "finetune.batch_size=4", "--set", "finetune.eval_every=0",
    "--set", "finetune.label_fraction=1.0", "--set", "evaluate.batch_size=8", "--set", "evaluate.overlays=1",
    "--set", "runtime.num_workers=0", "--set", "runtime.threads=1", "--set", "runtime.progress=false", "--set", "runtime.tensorboard=false",
]


@pytest.fixture(scope="session")
def workflows() -> Path:
    return WORKFLOWS


@pytest.fixture(scope="session")
def tiny_train() -> list[str]:
    return list(TINY_TRAIN)


@pytest.fixture(scope="session")
def ph2_dataset(tmp_path_factory) -> Path:
    """A dataset file for 8 real PH2 dermoscopy images with their expert masks (links into ../shared/data), 64 px."""
    if not (PH2 / "images").is_dir():
        pytest.skip(f"real data folder {PH2} is absent")
    root = tmp_path_factory.mktemp("ph2")
    for sub in ("images", "masks"):
        (root / sub).mkdir()
    for image in sorted((PH2 / "images").glob("*.png"))[:8]:
        (root / "images" / image.name).symlink_to(image)
        mask = PH2 / "masks" / f"{image.stem}_lesion.png"
        (root / "masks" / mask.name).symlink_to(mask)
    dataset = root / "ph2_tiny.yaml"
    dataset.write_text(
        "name: ph2_tiny\n"
        "sources:\n"
        "  - path: images\n"
        '    labels: {dir: masks, pattern: "{stem}_lesion.png"}\n'
        "geometry: {size: 64}\n"
        "threshold: {polarity: dark}\n"
        "split: {val: 0.25, test: 0.25, seed: 0}\n"
    )
    return dataset
