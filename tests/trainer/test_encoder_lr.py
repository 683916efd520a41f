"""``finetune.encoder_lr_scale``: the encoder trains at a fraction of lr, the decoder and head at lr."""
from __future__ import annotations

import json

import pytest
import torch
from medsass.trainer.config import FinetuneConfig, PretrainConfig, load_config, stage_section
from medsass.trainer.loop import make_optimizer, param_groups
from medsass.trainer.run import run_stages
from torch import nn

from medsass.errors import ConfigError
from medsass.testing import tiny_train_config


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 4)
        self.segmentation_head = nn.Linear(4, 1)

    def forward(self, x):
        return self.segmentation_head(self.decoder(self.encoder(x)))


def test_one_group_at_the_default_and_two_with_a_scale():
    net = _Net()
    (only,) = param_groups(net, FinetuneConfig(lr=1e-3))
    assert only["lr"] == 1e-3 and len(only["params"]) == 6
    enc, rest = param_groups(net, FinetuneConfig(lr=1e-3, encoder_lr_scale=0.1))
    assert enc["lr"] == pytest.approx(1e-4) and rest["lr"] == 1e-3
    assert {id(p) for p in enc["params"]} == {id(p) for p in net.encoder.parameters()}
    assert len(enc["params"]) + len(rest["params"]) == 6  # every parameter once
    assert len(param_groups(net, PretrainConfig(lr=1e-3))) == 1  # pretraining has no such key


def test_the_first_adam_step_moves_the_encoder_by_the_scaled_lr():
    # Adam's first step moves each weight by lr * g / (|g| + eps), i.e. by lr wherever |g| >> eps
    torch.manual_seed(0)
    net = _Net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = make_optimizer(net, FinetuneConfig(lr=1e-2, encoder_lr_scale=0.25, schedule="constant"))
    net(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs() for n, p in net.named_parameters()}
    assert torch.allclose(moved["encoder.weight"], torch.full((4, 4), 2.5e-3), rtol=1e-3)
    assert torch.allclose(moved["decoder.weight"], torch.full((4, 4), 1e-2), rtol=1e-3)


def test_a_model_without_encoder_parameters_is_a_config_error():
    with pytest.raises(ConfigError, match="encoder_lr_scale"):
        param_groups(nn.Linear(2, 2), FinetuneConfig(encoder_lr_scale=0.5))


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_the_scale_must_be_a_fraction(bad):
    with pytest.raises(ValueError, match="encoder_lr_scale"):
        FinetuneConfig(encoder_lr_scale=bad)


def test_the_default_leaves_older_runs_sections_unchanged(tmp_path):
    cfg = load_config(tiny_train_config(tmp_path, {"s": "x"}))
    assert "encoder_lr_scale" not in stage_section(cfg, "finetune")["finetune"]
    cfg = load_config(tiny_train_config(tmp_path, {"s": "x"}, finetune={"encoder_lr_scale": 0.1}))
    assert stage_section(cfg, "finetune")["finetune"]["encoder_lr_scale"] == 0.1


def test_a_fine_tune_with_a_scaled_encoder_lr_runs_logs_lr_and_refuses_a_changed_scale(tmp_path, store):
    data = tiny_train_config(tmp_path, {"syn": store}, finetune={"steps": 2, "encoder_lr_scale": 0.1, "schedule": "constant"},
                             evaluate={"overlays": 0})
    run_stages(load_config(data), ["pretrain", "finetune"])
    logged = [json.loads(x) for x in (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged if "lr" in r] == [3e-4, 3e-4]  # lr itself, not the encoder's
    data["finetune"]["encoder_lr_scale"] = 0.5
    with pytest.raises(ConfigError, match="encoder_lr_scale"):
        run_stages(load_config(data), ["finetune"])
