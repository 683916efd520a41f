from collections import Counter

from medsass.pipeline.config import SplitConfig
from medsass.pipeline.splits import GroupKeys, assign_splits, salted_hash


def test_groups_never_straddle_and_fractions_hold():
    groups = [f"p{i // 3}" for i in range(300)]  # 100 patients x 3 images
    cfg = SplitConfig(val=0.1, test=0.2, seed=0)
    splits = assign_splits(groups, [1] * 300, [True] * 300, cfg)
    by_group = {}
    for g, s in zip(groups, splits):
        assert by_group.setdefault(g, s) == s
    c = Counter(splits)
    assert c["test"] == 60 and c["val"] == 30 and c["train"] == 210


def test_deterministic_and_seed_dependent():
    groups = [f"g{i}" for i in range(50)]
    a = assign_splits(groups, [1] * 50, [True] * 50, SplitConfig(seed=0))
    assert a == assign_splits(groups, [1] * 50, [True] * 50, SplitConfig(seed=0))
    assert a != assign_splits(groups, [1] * 50, [True] * 50, SplitConfig(seed=1))


def test_unlabeled_groups_go_to_train_unless_asked():
    groups = [f"g{i}" for i in range(40)]
    labeled = [i < 10 for i in range(40)]
    s = assign_splits(groups, [1] * 40, labeled, SplitConfig(val=0.2, test=0.2))
    assert all(x == "train" for x, lab in zip(s, labeled) if not lab)
    assert Counter(x for x, lab in zip(s, labeled) if lab) == {"train": 6, "val": 2, "test": 2}
    s2 = assign_splits(groups, [1] * 40, labeled, SplitConfig(val=0.2, test=0.2, split_unlabeled=True))
    assert Counter(s2)["test"] == 8


def test_group_keys_are_salted_hashes(tmp_path):
    csv = tmp_path / "g.csv"
    csv.write_text("filename,patientid\na.png,P1\nb.png,P1\nc.png,P2\n")
    keys = GroupKeys(SplitConfig(groups_csv=str(csv)), salt="s")
    a, b, c = (keys.key(n) for n in ("a.png", "b.png", "c.png"))
    assert a == b != c and "P1" not in a and a == salted_hash("s", "csv:P1")
    k2 = GroupKeys(SplitConfig(group_by="regex:(pat\\d+)"), salt="s")
    assert k2.key("pat1/x.png") == k2.key("pat1/y.png") != k2.key("pat2/x.png")
    k3 = GroupKeys(SplitConfig(), "s")
    assert k3.key("x", "patienthash") == salted_hash("s", "dicom:patienthash") != "patienthash"
    assert GroupKeys(SplitConfig(group_by="dir"), "s").key("p1/a.png") == GroupKeys(SplitConfig(group_by="dir"), "s").key("p1/b.png")


def test_split_does_not_depend_on_salt():
    ids = [GroupKeys(SplitConfig(), salt).identity(f"img{i}.png", None) for i in range(30) for salt in ("a",)]
    assert ids == [GroupKeys(SplitConfig(), "b").identity(f"img{i}.png", None) for i in range(30)]
