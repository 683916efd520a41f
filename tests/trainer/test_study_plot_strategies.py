"""The strategies figure of the study report: each strategy's paired difference from random picks, per evaluation."""
from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np

from medsass.trainer.study.plot import plot_strategies
from medsass.trainer.study.report import Index


def _runs(seeds: dict[str, list[int]]) -> list[dict]:
    """Random picks: 50 TP, 10 FP, 10 FN per image (IoU 0.714); `uncertain`: no FP (0.833); `hybrid`: 30 FN
    (0.556) on the test split and the site; per strategy, the seeds listed, at 2 and 5 labels."""
    rng = np.random.default_rng(0)
    per = {"random": (50, 10, 10), "uncertain": (50, 0, 10), "hybrid": (50, 10, 30)}
    runs = []
    for where in ("test", "site:other"):
        for arm, ss in seeds.items():
            for seed in ss:
                for n in (2, 5):
                    counts = np.tile(np.array(per[arm]), (6, 1)) + rng.integers(0, 2, (6, 3))
                    runs.append({"dataset": "synth", "eval": where, "target": "store", "n_labels": n, "steps_factor": 1,
                                 "arm": "end_to_end" if arm == "random" else f"strategy:{arm}", "seed": seed,
                                 "counts": counts, "ids": [f"img{i}" for i in range(6)]})
    return runs


def test_the_strategies_figure_draws_each_strategy_minus_random_with_its_interval(tmp_path, monkeypatch):
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    study = SimpleNamespace(bootstrap=200, strategies=SimpleNamespace(names=["uncertain", "hybrid"], budgets=["2", "5"],
                                                                      datasets=[], targets=[]))
    d = SimpleNamespace(name="synth", n_labeled_train=20, sites=["other"], main_target="store", stores={"store": "x"})
    idx = Index(_runs({"random": [0, 1, 2], "uncertain": [0, 1, 2], "hybrid": [0, 1]}))
    path = tmp_path / "synth_strategies.png"
    assert plot_strategies(study, d, idx, path) and path.stat().st_size > 1000
    (fig,) = [f for f in figures if f is not None and f.axes]
    assert [ax.get_title() for ax in fig.axes] == ["synth: test split", "synth: other (another site)"]
    for ax in fig.axes:
        lines = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
        assert set(lines) == {"uncertain", "hybrid"}
        better, worse = lines["uncertain"].get_ydata(), lines["hybrid"].get_ydata()
        assert len(better) == len(worse) == 2  # both budgets
        assert np.allclose(better, 0.833 - 0.714, atol=0.02) and np.allclose(worse, 0.556 - 0.714, atol=0.02)
        markers = [ln for ln in ax.get_lines() if ln.get_marker() in ("s", "^")]  # the points (not the caps)
        filled = {(ln.get_color(), ln.get_markerfacecolor() != "none") for ln in markers}
        assert filled == {(lines["uncertain"].get_color(), True), (lines["hybrid"].get_color(), False)}  # 3 seeds / 2


def test_no_strategy_runs_no_figure(tmp_path):
    study = SimpleNamespace(bootstrap=50, strategies=SimpleNamespace(names=["uncertain"], budgets=["2"], datasets=[],
                                                                     targets=[]))
    d = SimpleNamespace(name="synth", n_labeled_train=20, sites=[], main_target="store", stores={"store": "x"})
    path = tmp_path / "synth_strategies.png"
    assert not plot_strategies(study, d, Index(_runs({"random": [0]})), path) and not path.exists()
    study.strategies.datasets = ["another"]
    assert not plot_strategies(study, d, Index(_runs({"random": [0], "uncertain": [0]})), path) and not path.exists()
