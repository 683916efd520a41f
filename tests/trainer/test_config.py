"""The trainer config: example files, base/delta files, overrides, strict keys and types."""
from __future__ import annotations

import pytest
from medsass.trainer.config import (
    CONFIG_DIR,
    TrainConfig,
    load_config,
    stage_section,
    with_overrides,
)

from medsass import configio
from medsass.errors import ConfigError

MINIMAL = {"out_dir": "out", "stores": {"a": "a.zarr"}}


def test_example_configs_load_and_paper_config_has_paper_hyperparameters():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"cpu_small", "paper_gpu"} <= set(names)
    for name in names:
        assert isinstance(load_config(name), TrainConfig)
    paper = load_config(CONFIG_DIR / "paper_gpu.yaml")
    assert paper.model.encoder == "resnet50" and paper.model.decoder_attention_type == "scse"
    assert paper.runtime.amp == "bf16"
    for stage in (paper.pretrain, paper.finetune):
        assert (stage.lr, stage.schedule, stage.batch_size) == (3e-4, "cosine", 16)
    assert (paper.loss.name, paper.loss.fn_weight, paper.loss.fp_weight, paper.loss.gamma) == ("focal_tversky", 0.7, 0.3, 0.75)
    small = load_config("cpu_small")
    assert small.pretrain.steps <= 1000 and small.model.encoder in ("resnet18", "tu-mobilenetv3_small_100")


def test_delta_config_inherits_from_its_base(tmp_path):
    (tmp_path / "base.yaml").write_text("out_dir: o\nstores: {a: a.zarr, b: b.zarr}\npretrain: {steps: 50, lr: 0.001}\n")
    (tmp_path / "ft.yaml").write_text("base: base.yaml\nstages: [finetune]\npretrain: {steps: 7}\nstores: {c: c.zarr}\n")
    cfg = load_config(tmp_path / "ft.yaml")
    assert cfg.stages == ["finetune"]
    assert (cfg.pretrain.steps, cfg.pretrain.lr) == (7, 0.001)  # mappings merge key by key
    assert cfg.stores == {"a": "a.zarr", "b": "b.zarr", "c": "c.zarr"}


def test_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="its own base"):
        load_config(tmp_path / "a.yaml")


def test_overrides_apply_with_types():
    cfg = load_config(MINIMAL, ["pretrain.steps=7", "stores.b=/x/b.zarr", "finetune.label_fraction=0.01", "runtime.channels_last=true"])
    assert cfg.pretrain.steps == 7 and cfg.stores["b"] == "/x/b.zarr" and cfg.finetune.label_fraction == 0.01
    assert cfg.runtime.channels_last is True
    assert with_overrides(cfg, ["seed=3"]).seed == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pretrain.stpes=3", "pretrain.stpes"),
        ("pretrain.steps=many", "pretrain.steps"),
        ("loss.name=focal", "loss.name"),
        ("model.encoder_weights=\"\"", "encoder_weights is empty"),
        ("finetune.label_count=5", "not both"),
        ("finetune.label_fraction=1.5", "label_fraction"),
        ("pretrain.splits=[train,test]", "never test"),
        ("pretrain.stores={zz: 1.0}", "unknown store"),
        ("stages=[pretrain,finetune,pretrain]", "twice"),
        ("stages=[train]", "stages[0]"),
        ("loss.gamma=0", "gamma"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(MINIMAL, [override, "finetune.label_fraction=0.1"] if "label_count" in override else [override])


def test_required_keys():
    with pytest.raises(ConfigError, match="missing required key out_dir"):
        load_config({"stores": {"a": "a"}})


def test_stage_stores_and_weights():
    cfg = load_config({"out_dir": "o", "stores": {"a": "a", "b": "b"}, "pretrain": {"stores": {"a": 2.0, "b": 0.0}}})
    assert cfg.stage_stores("pretrain") == {"a": 2.0}
    assert cfg.stage_stores("finetune") == {"a": 1.0, "b": 1.0}
    assert cfg.stage_stores("evaluate") == {"a": 1.0, "b": 1.0}


def test_stage_section_ignores_runtime_and_other_stages():
    cfg = load_config(MINIMAL)
    other = with_overrides(cfg, ["runtime.num_workers=0", "finetune.steps=3", "evaluate.splits=[val]"])
    assert list(configio.diff(stage_section(cfg, "pretrain"), stage_section(other, "pretrain"))) == []
    changed = with_overrides(cfg, ["pretrain.lr=0.1", "model.encoder=resnet18"])
    assert list(configio.diff(stage_section(cfg, "pretrain"), stage_section(changed, "pretrain"))) == ["model.encoder", "pretrain.lr"]


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("cpu_small")
    configio.dump_yaml(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
