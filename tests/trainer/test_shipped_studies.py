"""The study configs that ship in benchmarks/studies load: every key known, every recipe a valid trainer config (a
broken shipped study would only show when a user, or the next session of the scale study, runs it). The template
for a user's own data (my_data.yaml) also runs, on the bundled sample, as its comments tell a user to try it."""
from __future__ import annotations

from pathlib import Path

import pytest
from medsass.testing import TINY_ENCODER
from medsass.trainer.study import ledger
from medsass.trainer.study.runner import run_study
from medsass.trainer.study.spec import load_study

STUDY_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "studies"
STUDIES = sorted(STUDY_DIR.glob("scale_*.yaml"))
TEMPLATE = STUDY_DIR / "my_data.yaml"


def test_the_scale_studies_ship():
    assert [p.name for p in STUDIES] == ["scale_cpu.yaml", "scale_gpu.yaml"]


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_a_shipped_study_loads(path):
    study, train = load_study(path)
    assert study.datasets and study.seeds and train["model"]["encoder"]
    for r in study.recipes:  # recipes name only datasets and targets the study has
        names = {d.name: d for d in study.datasets}
        assert set(r.datasets) <= set(names), r.name
        for d in (names[n] for n in (r.datasets or names)):
            assert set(r.targets) <= set(d.targets), (r.name, d.name)


def test_the_template_for_a_users_data_runs_on_the_bundled_sample(tmp_path):
    """my_data.yaml as shipped (the bundled sample's dataset file, the default target, scratch against end-to-end),
    with a few steps per stage: the stores build, the paired runs train, the report compares only the arms it has,
    and a second call runs nothing."""
    study, train = load_study(TEMPLATE)
    assert study.arms == ["scratch", "end_to_end"] and study.convergence and study.datasets[0].targets == ["fov_otsu_hull@store"]
    assert train["finetune"]["steps"] == 500 and train["pretrain"]["steps"] == 1500 and train["model"]["encoder"] == "resnet18"
    quick = [f"out_dir={tmp_path / 'out'}", f"results_dir={tmp_path / 'res'}", f"train.model.encoder={TINY_ENCODER}",
             "train.pretrain.steps=3", "train.finetune.steps=2", "train.finetune.eval_every=1", "train.runtime.device=cpu",
             "train.runtime.threads=1", "train.runtime.num_workers=0", "convergence=null", "bootstrap=200"]
    out = run_study(str(TEMPLATE), quick, seeds=[0], budgets=["1"], log=lambda *_: None)
    assert out.ran == 3 and not out.failed
    rows = ledger.read_ledger(tmp_path / "res")
    assert sorted((r["kind"], r["arm"]) for r in rows.values()) == [
        ("finetune", "end_to_end"), ("finetune", "scratch"), ("pretrain", "pretrain")]
    table = (tmp_path / "res" / "table.md").read_text()
    assert "## sample" in table and "| labels | end-to-end − scratch |" in table
    assert "SimCLR" not in table and "encoder-only" not in table  # no empty columns for arms the study does not run
    again = run_study(str(TEMPLATE), quick, seeds=[0], budgets=["1"], log=lambda *_: None)
    assert again.ran == 0 and len(ledger.read_ledger(tmp_path / "res")) == 3
