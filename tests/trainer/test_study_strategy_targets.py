"""``strategies.targets``: which pseudo-mask target's end-to-end model picks the images to label (the default recipe's
target need not be the dataset's main one). Grid-level: no training."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from medsass.trainer.study.jobs import StudyData, make_jobs

from medsass.errors import ConfigError, MedsassError

STRATEGIES = {"names": ["uncertain"], "budgets": ["2", "5"]}


def _jobs(tmp_path: Path, strategies: dict, other_arms=("end_to_end",)):
    data = {"out_dir": str(tmp_path / "out"), "results_dir": str(tmp_path / "res"), "seeds": [0], "budgets": ["1", "5"],
            "arms": ["scratch", "end_to_end"], "convergence": None, "strategies": strategies,
            "other_targets": {"arms": list(other_arms), "budgets": ["5"]},
            "datasets": [{"name": "d", "dataset": "data.yaml", "targets": ["otsu", "fov_otsu_hull"]}], "train": {"base": "cpu_small"}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    from medsass.trainer.study.spec import load_study

    study, train = load_study(path)
    d = StudyData("d", {"otsu": "x.zarr", "fov_otsu_hull": "y.zarr"}, {}, {}, 10,
                  digests={"otsu": "abc", "fov_otsu_hull": "abd", "images": "def"})
    return make_jobs(study, train, [d])


def _picked(jobs):
    return sorted((j.target, j.n_labels) for j in jobs if j.strategy)


def _random(jobs, target):
    return sorted(j.n_labels for j in jobs if j.kind == "finetune" and j.arm == "end_to_end" and j.target == target
                  and not j.strategy and not j.recipe)


def test_strategies_default_to_the_main_target_and_can_name_another(tmp_path):
    default = _jobs(tmp_path, STRATEGIES)
    assert _picked(default) == [("otsu", 2), ("otsu", 5)]
    assert _random(default, "otsu") == [1, 2, 5]  # budget 2 is not in the grid: its random baseline is added
    explicit = _jobs(tmp_path, {**STRATEGIES, "targets": ["otsu"]})
    assert [j.key for j in explicit] == [j.key for j in default]  # naming the main target changes no key

    other = _jobs(tmp_path, {**STRATEGIES, "targets": ["fov_otsu_hull"]})
    assert _picked(other) == [("fov_otsu_hull", 2), ("fov_otsu_hull", 5)]
    assert _random(other, "fov_otsu_hull") == [2, 5]  # 5 is other_targets' budget; 2 is added for the comparison
    pre = {j.key for j in other if j.kind == "pretrain" and j.target == "fov_otsu_hull"}
    assert all(j.needs in pre and "/fov_otsu_hull/seed0/" in j.dir for j in other if j.strategy)
    grid = {j.key for j in default if not j.strategy} - {j.key for j in default if j.n_labels == 2}
    assert grid <= {j.key for j in other}  # the grid's own runs keep their keys


def test_unknown_targets_and_targets_without_pretraining_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"strategies.targets: \['fov_otsu_hul'\] is no dataset's target"):
        _jobs(tmp_path, {**STRATEGIES, "targets": ["fov_otsu_hul"]})
    with pytest.raises(MedsassError, match="no end-to-end pretraining"):
        _jobs(tmp_path, {**STRATEGIES, "targets": ["fov_otsu_hull"]}, other_arms=())


def test_each_dataset_uses_the_listed_targets_it_has():
    from medsass.trainer.study.jobs import strategy_targets
    from medsass.trainer.study.spec import StrategiesSpec

    shenzhen = StudyData("a", {"fov_otsu_hull": "1", "fov_otsu_hull@store": "2"}, {}, {}, 10, digests={})
    dsb = StudyData("b", {"fov_otsu_hull@store": "3", "otsu": "4"}, {}, {}, 10, digests={})
    kvasir = StudyData("c", {"otsu": "5"}, {}, {}, 10, digests={})
    st = StrategiesSpec(targets=["fov_otsu_hull@store"])
    assert [strategy_targets(st, d) for d in (shenzhen, dsb, kvasir)] == [["fov_otsu_hull@store"]] * 2 + [["otsu"]]
    assert strategy_targets(StrategiesSpec(), shenzhen) == ["fov_otsu_hull"]
