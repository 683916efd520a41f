"""Pseudo-masks scored against the expert labels: the figures selftrain reports and a joint fine-tune logs."""
from __future__ import annotations

import numpy as np
import pytest
from medsass.trainer.mask_quality import JOINT_WARN_BELOW, agreement_note, labeled_rows, pool_agreement, quality_of

from medsass import manifest
from medsass.store import LABEL, PSEUDO_MASK, open_store
from medsass.testing import make_synthetic_store


def test_quality_of_known_counts():
    q = quality_of(np.array([[2, 1, 1], [0, 0, 0], [0, 3, 0]]))  # IoU 0.5, 1 (both empty), 0
    assert q == {"n": 3, "iou_per_image_mean": pytest.approx(0.5), "iou": pytest.approx(2 / 7)}
    assert quality_of(np.zeros((0, 3))) == {"n": 0, "iou_per_image_mean": None, "iou": None}


@pytest.fixture(scope="module")
def half_labeled(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("q") / "s.zarr", n=40, size=32, labeled_fraction=0.5, seed=3)


def test_pool_agreement_scores_only_the_labeled_pool_records(half_labeled):
    df = manifest.read_manifest(half_labeled)
    pool = df.loc[df.split.isin(["train", "val"]), "row"].to_numpy()
    expect_rows = df.loc[df.split.isin(["train", "val"]) & df.has_label, "row"].to_numpy()
    assert 0 < len(expect_rows) < len(pool)  # some pool records have no label: they are not scored
    group, _ = open_store(half_labeled)
    pm, lab = np.asarray(group[PSEUDO_MASK][:])[expect_rows] > 0, np.asarray(group[LABEL][:])[expect_rows] > 0
    micro = (pm & lab).sum() / (pm | lab).sum()

    res = pool_agreement({"s": half_labeled}, {"s": pool}, PSEUDO_MASK)
    assert res["n"] == len(expect_rows) and res["iou"] == pytest.approx(micro)
    assert res["per_store"]["s"]["n"] == len(expect_rows) and res["target"] == PSEUDO_MASK
    assert pool_agreement({"s": half_labeled}, {"s": pool}, LABEL)["iou"] == 1.0  # the labels against themselves
    assert pool_agreement({"s": half_labeled}, {"s": pool}, PSEUDO_MASK, max_records=3)["n"] == 3  # capped, spread
    assert set(labeled_rows(half_labeled)) >= set(expect_rows)


def test_the_note_warns_below_the_threshold_and_where_nothing_could_be_scored():
    good = {"n": 10, "iou": JOINT_WARN_BELOW + 0.05, "iou_per_image_mean": 0.8, "target": PSEUDO_MASK}
    text, low = agreement_note(good)
    assert not low and f"{good['iou']:.3f}" in text and "10 pool record" in text
    text, low = agreement_note({**good, "iou": JOINT_WARN_BELOW - 0.05})
    assert low and "pseudo_weight=0" in text
    text, low = agreement_note({"n": 0, "iou": None, "iou_per_image_mean": None, "target": PSEUDO_MASK})
    assert low and "none of the pool's records" in text
