"""``finetune.pseudo_weight``: joint training, a pool batch fitted to its pseudo-masks beside every labeled batch."""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from medsass.trainer import loop as loop_mod
from medsass.trainer.config import FinetuneConfig, load_config, stage_section
from medsass.trainer.distributed import DistInfo
from medsass.trainer.loop import Loop, LoopState, PseudoTerm
from medsass.trainer.data import select_rows
from medsass.trainer.run import plan_run, run_stages
from torch import nn

from medsass.errors import ConfigError
from medsass.testing import tiny_train_config


def test_the_weight_falls_linearly_to_zero_or_stays():
    linear = PseudoTerm(iter(()), 2.0, "linear", 10)
    assert [linear.weight(s) for s in (0, 5, 9)] == pytest.approx([2.0, 1.0, 0.2])
    assert [PseudoTerm(iter(()), 0.5, "none", 10).weight(s) for s in (0, 9)] == [0.5, 0.5]


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_the_weight_must_be_a_finite_non_negative_number(bad):
    with pytest.raises(ValueError, match="pseudo_weight"):
        FinetuneConfig(pseudo_weight=bad)


def _batches(value: float) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield {"image": torch.full((2, 1, 4, 4), value, dtype=torch.uint8), "target": torch.zeros((2, 1, 4, 4), dtype=torch.uint8)}


def _loop(accum: int = 1) -> Loop:
    net = nn.Conv2d(1, 1, 1, bias=False)  # no batch norm: the labeled images' loss does not see the pool's
    nn.init.constant_(net.weight, 3.0)
    dist = DistInfo()

    def mse(logits, y):
        return ((logits - y) ** 2).mean()

    return Loop(net, FinetuneConfig(steps=4, grad_accum=accum), mse, seed=0, dist=dist,
                target_transform=lambda x, t, aug, gen: (x, t.float()))


@pytest.mark.parametrize("accum", [1, 2])
def test_the_step_loss_is_the_labeled_loss_plus_the_weighted_pool_loss(accum):
    # logits = 3 x: labeled images 1/255 -> loss 9/255^2; pool images 2/255 -> loss 36/255^2
    unit = 9 / 255**2
    plain = _loop(accum).train_step(_batches(1), LoopState())
    assert plain == pytest.approx(unit, rel=1e-5)
    state = LoopState(step=2)  # linear over 4 steps: weight 0.5 x 0.5 at step index 2
    joint = _loop(accum).train_step(_batches(1), state, PseudoTerm(_batches(2), 0.5, "linear", 4))
    assert joint == pytest.approx(unit + 0.25 * 4 * unit, rel=1e-5)
    assert state.step == 3 and state.batches == accum  # one labeled batch per micro-batch, as a plain step counts


def test_the_default_leaves_older_runs_sections_unchanged_and_a_joint_section_names_the_pool(tmp_path):
    cfg = load_config(tiny_train_config(tmp_path, {"s": "x"}))
    ft = stage_section(cfg, "finetune")
    assert "pseudo_weight" not in ft["finetune"] and "pseudo_decay" not in ft["finetune"] and "pseudo_pool" not in ft
    cfg = load_config(tiny_train_config(tmp_path, {"s": "x", "t": "y"}, finetune={"pseudo_weight": 1.0},
                                        pretrain={"stores": {"s": 1.0, "t": 0.0}, "splits": ["train", "val"]}))
    section = stage_section(cfg, "finetune")
    assert section["finetune"]["pseudo_weight"] == 1.0 and section["finetune"]["pseudo_decay"] == "linear"
    assert section["pseudo_pool"] == {"stores": {"s": "x"}, "weights": {"s": 1.0}, "splits": ["train", "val"],
                                      "target": "pseudo_mask", "exclude_degenerate": True}


def test_the_pool_is_the_pretrainings_records_and_never_test(tmp_path, store):
    data = tiny_train_config(tmp_path, {"syn": store}, finetune={"pseudo_weight": 1.0, "label_count": 2},
                             pretrain={"splits": ["train", "val"]})
    pre, ft = plan_run(load_config(data), ["pretrain", "finetune"])
    assert list(ft.pseudo_rows) == ["syn"] and ft.pseudo_rows["syn"].tolist() == pre.rows["syn"].tolist()
    assert len(ft.rows["syn"]) == 2
    test_rows = set(select_rows(store, splits=["test"], target="label", exclude_degenerate=False).tolist())
    assert test_rows and not test_rows & set(ft.pseudo_rows["syn"].tolist())
    (plain,) = plan_run(load_config(tiny_train_config(tmp_path, {"syn": store}, finetune={"init": "scratch"})), ["finetune"])
    assert plain.pseudo_rows == {}


def test_a_pool_of_weight_zero_is_a_clear_error(tmp_path, store):
    data = tiny_train_config(tmp_path, {"syn": store}, finetune={"pseudo_weight": 1.0, "stores": {"syn": 1.0}},
                             pretrain={"stores": {"syn": 0.0}})
    with pytest.raises(ConfigError, match="pseudo_weight"):
        plan_run(load_config(data), ["finetune"])


def test_a_joint_fine_tune_runs_resumes_exactly_and_refuses_a_changed_weight(tmp_path, store, monkeypatch):
    def cfg(out):
        return load_config(tiny_train_config(out, {"syn": store}, finetune={"steps": 4, "checkpoint_every": 2, "pseudo_weight": 1.0},
                                             evaluate={"overlays": 0}))

    run_stages(cfg(tmp_path / "ref"), ["pretrain", "finetune"])
    ref = torch.load(tmp_path / "ref" / "finetune" / "final.pt", weights_only=True)
    plain = load_config(tiny_train_config(tmp_path / "plain", {"syn": store}, finetune={"steps": 4, "checkpoint_every": 2},
                                          evaluate={"overlays": 0}))
    run_stages(plain, ["pretrain", "finetune"])
    other = torch.load(tmp_path / "plain" / "finetune" / "final.pt", weights_only=True)
    assert any(not torch.equal(ref["model"][k], other["model"][k]) for k in ref["model"])  # the pool term moved the weights

    real = loop_mod.Loop.train_step

    def interrupted(self, batches, state, pseudo=None):
        if self.cfg.steps == 4 and state.step == 3 and pseudo is not None:
            raise KeyboardInterrupt  # after step 2's last.pt
        return real(self, batches, state, pseudo)

    monkeypatch.setattr(loop_mod.Loop, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_stages(cfg(tmp_path / "cut"), ["pretrain", "finetune"])
    monkeypatch.setattr(loop_mod.Loop, "train_step", real)
    assert torch.load(tmp_path / "cut" / "finetune" / "last.pt", weights_only=True)["step"] == 2
    run_stages(cfg(tmp_path / "cut"), ["finetune"])
    resumed = torch.load(tmp_path / "cut" / "finetune" / "final.pt", weights_only=True)
    assert all(torch.equal(ref["model"][k], resumed["model"][k]) for k in ref["model"])
    logged = [json.loads(x) for x in (tmp_path / "cut" / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]
    # the pool's pseudo-masks were scored against the labels once, at the start (not again on resume)
    assert [r["step"] for r in logged if "score IoU" in r.get("note", "")] == [0]
    assert not any("pseudo_weight" in r.get("note", "") for r in map(json.loads, (tmp_path / "plain" / "finetune" / "metrics.jsonl").read_text().splitlines()))

    changed = tiny_train_config(tmp_path / "ref", {"syn": store}, finetune={"steps": 4, "checkpoint_every": 2, "pseudo_weight": 0.5},
                                evaluate={"overlays": 0})
    with pytest.raises(ConfigError, match="pseudo_weight"):
        run_stages(load_config(changed), ["finetune"])
