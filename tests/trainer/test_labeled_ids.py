"""``finetune.labeled_ids``: fine-tune on exactly the records of a picks.csv or an id list; errors name the ids."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from medsass.pipeline.add_labels import add_labels
from medsass.trainer.cli import main
from medsass.trainer.config import load_config, stage_section
from medsass.trainer.data import check_sample_ids, read_sample_ids, select_rows
from medsass.trainer.run import plan_run
from PIL import Image

from medsass import manifest
from medsass.errors import ConfigError
from medsass.testing import TINY_ENCODER, make_synthetic_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """40 records, shards of 8: train rows 0-23, val 24-31, test 32-39; about half of them labeled."""
    return make_synthetic_store(tmp_path_factory.mktemp("ids") / "s.zarr", n=40, size=32, shard_records=8,
                                labeled_fraction=0.5, seed=3)


def ids_of(store, **where):
    df = manifest.read_manifest(store)
    for k, v in where.items():
        df = df[df[k] == v]
    return list(df.sample_id), list(df.row)


def test_read_sample_ids_from_a_picks_csv_or_a_text_file(tmp_path):
    picks = tmp_path / "picks.csv"
    picks.write_text("\ufeffrank,sample_id,source,strategy,score,reason\n1,a/1.png,/x/1.png,diverse,0.9,\"far, away\"\n"
                     "2,b/2.png,/x/2.png,diverse,0.8,x\n3,a/1.png,/x/1.png,diverse,0.7,again\n")
    assert read_sample_ids(picks) == ["a/1.png", "b/2.png"]  # BOM, quoted commas, repeats
    text = tmp_path / "ids.txt"
    text.write_text("# picked by Dr X\na/1.png\n\n  b/2.png  \n")
    assert read_sample_ids(text) == ["a/1.png", "b/2.png"]
    (tmp_path / "empty.csv").write_text("rank,sample_id\n")
    with pytest.raises(ConfigError, match="lists no sample ids"):
        read_sample_ids(tmp_path / "empty.csv")
    with pytest.raises(ConfigError, match="finetune.labeled_ids: .*nope.csv does not exist"):
        read_sample_ids(tmp_path / "nope.csv")


def test_select_rows_keeps_exactly_the_listed_labeled_records(store):
    ids, rows = ids_of(store, split="train", has_label=True)
    got = select_rows(store, splits=["train"], target="label", sample_ids=ids[:3] + ["not/there.png"])
    assert list(got) == sorted(rows[:3])
    with pytest.raises(ConfigError, match="not both"):
        select_rows(store, splits=["train"], target="label", sample_ids=ids[:3], label_count=2)


def test_ids_that_select_nothing_are_named_with_what_to_do(store):
    labeled, _ = ids_of(store, split="train", has_label=True)
    unlabeled, _ = ids_of(store, split="train", has_label=False)
    in_test, _ = ids_of(store, split="test", has_label=True)
    ids = [labeled[0], unlabeled[0], in_test[0], "nope/0.png"]
    with pytest.raises(ConfigError) as err:
        check_sample_ids({"syn": store}, ids, splits=["train"], source="picks.csv")
    text = str(err.value)
    assert "\n" not in text and "3 of the 4 ids in picks.csv" in text
    assert f"no label yet in store 'syn' (add the masks with `medsass-prep add-labels {store}" in text
    assert f"{unlabeled[0]}" in text and f"in split 'test' of store 'syn', not in finetune.splits ['train']: {in_test[0]}" in text
    assert "not a sample_id of store(s) ['syn'] (was the file made for them?): nope/0.png" in text
    check_sample_ids({"syn": store}, labeled[:2], splits=["train"], source="picks.csv")  # all good: no error
    other = make_synthetic_store(store.parent / "other.zarr", n=8, size=32, shard_records=8, seed=9)  # ids 0-7
    beyond = [i for i, r in zip(*ids_of(store, split="train", has_label=True)) if r >= 8][:2]
    with pytest.raises(ConfigError, match=r"lists no record of finetune store\(s\) \['other'\]; give them weight 0"):
        check_sample_ids({"syn": store, "other": other}, beyond, splits=["train"], source="picks.csv")


def test_config_takes_labeled_ids_or_a_budget_not_both(tmp_path, store):
    base = {"out_dir": str(tmp_path / "out"), "stores": {"syn": str(store)}, "model": {"encoder": TINY_ENCODER}}
    with pytest.raises(ConfigError, match="replaces label_fraction / label_count"):
        load_config(base, ["finetune.labeled_ids=picks.csv", "finetune.label_count=2"])
    labeled, rows = ids_of(store, split="train", has_label=True)
    picks = tmp_path / "picks.txt"
    picks.write_text("\n".join(labeled[:4]) + "\n")
    cfg = load_config(base, [f"finetune.labeled_ids={picks}", "finetune.init=scratch"])
    (plan,) = plan_run(cfg, ["finetune"])
    assert list(plan.rows["syn"]) == sorted(rows[:4])
    before = stage_section(cfg, "finetune")["labeled_ids_sha256"]
    picks.write_text("\n".join(labeled[1:5]) + "\n")
    assert stage_section(cfg, "finetune")["labeled_ids_sha256"] != before  # the ids count, not the file name
    assert "labeled_ids_sha256" not in stage_section(load_config(base), "finetune")  # older runs' sections unchanged


def test_add_labels_then_finetune_on_exactly_those_records(tmp_path):
    """Steps 5-7 of the user's loop: an expert's masks for 4 picked train records, then fine-tune + evaluate."""
    path = make_synthetic_store(tmp_path / "s.zarr", n=40, size=32, shard_records=8, labeled_fraction=0.0, seed=4)
    df = manifest.read_manifest(path)
    picked = df[df.split == "train"].sample_id.iloc[[1, 5, 9, 17]].tolist()
    masks = tmp_path / "expert"
    rng = np.random.default_rng(0)
    for sid in picked + df[df.split != "train"].sample_id.tolist():  # and the val/test masks, to evaluate
        masks.mkdir(exist_ok=True)
        Image.fromarray((rng.random((32, 32)) > 0.5).astype(np.uint8) * 255).save(masks / sid.split("/")[-1])
    assert add_labels(path, labels_dir=str(masks)).exit_code == 0
    picks = tmp_path / "picks.csv"
    picks.write_text("rank,sample_id,score\n" + "".join(f"{i},{s},0.5\n" for i, s in enumerate(picked, 1)))
    cfg = {
        "out_dir": str(tmp_path / "out"), "stores": {"syn": str(path)}, "model": {"encoder": TINY_ENCODER},
        "pretrain": {"steps": 2, "batch_size": 4}, "finetune": {"steps": 2, "batch_size": 4, "labeled_ids": str(picks)},
        "evaluate": {"batch_size": 16, "overlays": 0},
        "runtime": {"num_workers": 0, "progress": False, "threads": 1, "tensorboard": False},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(main, ["run", str(cfg_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (plan,) = plan_run(load_config(cfg), ["finetune"])
    assert list(plan.rows["syn"]) == sorted(df.set_index("sample_id").loc[picked, "row"])

    picks.write_text("sample_id\n" + "\n".join(picked[:3]) + "\n")  # other picks: the finished finetune is refused
    again = CliRunner().invoke(main, ["run", str(cfg_path)], catch_exceptions=False)
    assert again.exit_code == 2 and "labeled_ids_sha256" in again.output
