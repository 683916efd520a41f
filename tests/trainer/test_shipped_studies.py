"""The study configs that ship in benchmarks/studies load: every key known, every recipe a valid trainer config (a
broken shipped study would only show when a user, or the next session of the scale study, runs it)."""
from __future__ import annotations

from pathlib import Path

import pytest
from medsass.trainer.study.spec import load_study

STUDIES = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "studies").glob("scale_*.yaml"))


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
