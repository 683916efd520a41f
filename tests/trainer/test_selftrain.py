"""Self-training: re-labelling into pseudo_labels/<name>, provenance, selection, soft labels and their losses."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
import zarr
from click.testing import CliRunner
from medsass.trainer import checkpoint as ckpt_mod
from medsass.trainer.augment import AugmentConfig, augment_batch, augment_soft
from medsass.trainer.cli import main
from medsass.trainer.config import LossConfig, load_config, stage_section
from medsass.trainer.losses import build_loss, focal_tversky, weighted_bce
from medsass.trainer.model import build_model, model_args
from medsass.trainer.records import select_rows
from medsass.trainer.selftrain import (
    load_model,
    match_threshold,
    pool_rows,
    probabilities,
    provenance,
    relabel,
    shift,
)
from medsass.trainer.targets import PROBABILITY, target_encoding, to_mask

from medsass import manifest
from medsass.errors import ConfigError, StoreError
from medsass.testing import TINY_ENCODER, make_synthetic_store

N, SIZE, SHARD = 40, 32, 8


def make_checkpoint(path, bias: float | None = None):
    torch.manual_seed(0)
    cfg = load_config({"out_dir": "x", "stores": {"s": "x"}, "model": {"encoder": TINY_ENCODER}})
    model = build_model(cfg.model)
    if bias is not None:  # a constant output: p = sigmoid(bias) everywhere
        head = model.segmentation_head[0]
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.constant_(head.bias, bias)
    ckpt_mod.save(path, {"model": model.state_dict(), "model_args": model_args(cfg.model), "step": 7})
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "final.pt")


@pytest.fixture()
def syn(tmp_path):
    return make_synthetic_store(tmp_path / "s.zarr", n=N, size=SIZE, shard_records=SHARD)


def test_relabel_writes_a_new_array_with_provenance_and_leaves_the_rest_untouched(syn, ckpt):
    before = {name: np.asarray(zarr.open_array(str(syn / name), mode="r")[:]) for name in ("pseudo_mask", "image", "label")}
    prov = relabel(syn, ckpt, "st_r1", splits=["train", "val"], round=1)
    group = zarr.open_group(str(syn), mode="r")  # consolidated metadata includes the new array
    arr, pm = group["pseudo_labels/st_r1"], group["pseudo_mask"]
    assert arr.shape == pm.shape == (N, SIZE, SIZE) and arr.dtype == np.uint8 and arr.shards == pm.shards
    for name, old in before.items():
        assert np.array_equal(np.asarray(group[name][:]), old), name  # bit-equal, pseudo_mask included
    df = manifest.read_manifest(syn)
    test_rows = df.loc[df["split"] == "test", "row"].to_numpy()
    values = np.asarray(arr[:])
    assert len(test_rows) and values[test_rows].max() == 0  # test is never re-labelled
    pool = pool_rows(syn, ["train", "val"])["row"].to_numpy()
    model, _ = load_model(ckpt, torch.device("cpu"))
    p = probabilities(model, np.asarray(group["image"][:])[pool], device=torch.device("cpu"))
    assert np.array_equal(values[pool], (p >= 0.5).astype(np.uint8))
    side = pd.read_parquet(syn / "pseudo_labels" / "st_r1.parquet")
    assert list(side.columns) == ["sample_id", "row", "split", "fg_fraction", "mean_confidence", "degenerate"]
    assert side["row"].tolist() == sorted(pool.tolist()) and not set(side["row"]) & set(test_rows)
    assert np.allclose(side["fg_fraction"], values[side["row"]].mean(axis=(1, 2)))
    attrs = group.attrs["medsass"]["pseudo_labels"]["st_r1"]
    assert attrs == prov == provenance(syn, "st_r1")
    assert attrs["source_sha256"] == manifest.file_digest(ckpt) and attrs["source_checkpoint"] == str(ckpt.resolve())
    assert attrs["round"] == 1 and attrs["parent_target"] == "pseudo_mask" and attrs["rule"]["mode"] == "hard"
    assert attrs["rule"]["threshold"] == 0.5 and attrs["created"] and attrs["medsass_version"]
    assert attrs["n_records"] == len(pool) and attrs["sidecar"] == "pseudo_labels/st_r1.parquet"
    assert group.attrs["medsass"]["n_records"] == N  # the rest of the store's attributes is kept
    assert manifest.manifest_digest(syn) == manifest.file_digest(syn / "manifest.parquet")  # manifest not rewritten
    with pytest.raises(StoreError, match="already exists"):  # an existing name is refused
        relabel(syn, ckpt, "st_r1", splits=["train"])
    with pytest.raises(ConfigError, match="never test"):
        relabel(syn, ckpt, "st_x", splits=["train", "test"])


def test_soft_mode_stores_quantised_probabilities(syn, ckpt):
    relabel(syn, ckpt, "soft", splits=["train"], mode="soft")
    assert target_encoding(syn, "pseudo_labels/soft") == PROBABILITY and target_encoding(syn, "pseudo_mask") == "binary"
    rows = pool_rows(syn, ["train"])["row"].to_numpy()
    group = zarr.open_group(str(syn), mode="r")
    model, _ = load_model(ckpt, torch.device("cpu"))
    p = probabilities(model, np.asarray(group["image"][:])[rows], device=torch.device("cpu"))
    values = np.asarray(group["pseudo_labels/soft"][:])[rows]
    assert np.array_equal(values, np.rint(p * 255).astype(np.uint8))
    assert np.array_equal(to_mask(values, PROBABILITY), values >= 128)
    side = pd.read_parquet(syn / "pseudo_labels" / "soft.parquet")
    assert np.allclose(side["mean_confidence"], np.abs(2 * (values / 255.0) - 1).mean(axis=(1, 2)))


def test_matched_threshold_keeps_the_parent_foreground_fraction(syn, tmp_path):
    # the histogram rule and the re-centring on known values, then a hard and a soft relabel of one store
    hist = np.histogram(np.linspace(0, 1, 10001), bins=100, range=(0, 1))[0]
    assert match_threshold(hist, 0.3) == pytest.approx(0.7, abs=0.011)
    p = np.array([0.2, 0.5, 0.7, 0.9])
    assert np.allclose(shift(p, 0.7), [0.0968, 0.3, 0.5, 0.7941], atol=1e-4) and np.array_equal(shift(p, 0.5), p)
    ck = make_checkpoint(tmp_path / "c.pt")
    rows = pool_rows(syn, ["train", "val"])["row"].to_numpy()
    group = zarr.open_group(str(syn), mode="r")
    parent_fg = np.asarray(group["pseudo_mask"][:])[rows].mean()
    hard = relabel(syn, ck, "m_hard", splits=["train", "val"], threshold="match_fg")
    soft = relabel(syn, ck, "m_soft", splits=["train", "val"], mode="soft", threshold="match_fg")
    assert hard["rule"]["threshold_rule"] == "match_fg" and hard["rule"]["parent_fg_fraction"] == pytest.approx(parent_fg)
    assert soft["rule"]["threshold"] == hard["rule"]["threshold"]
    group = zarr.open_group(str(syn), mode="r")
    h = np.asarray(group["pseudo_labels/m_hard"][:])[rows]
    assert np.array_equal(to_mask(np.asarray(group["pseudo_labels/m_soft"][:])[rows], PROBABILITY), h > 0)  # same masks
    model, _ = load_model(ck, torch.device("cpu"))
    p = probabilities(model, np.asarray(group["image"][:])[rows], device=torch.device("cpu"))
    ts = np.unique(p)  # the best any threshold can do on this pool, vs what the histogram rule gave
    best = min(abs((p >= t).mean() - parent_fg) for t in ts)
    assert abs(h.mean() - parent_fg) <= best + 0.01


def test_degenerate_labels_are_flagged_and_never_selected(syn, tmp_path):
    empty = make_checkpoint(tmp_path / "empty.pt", bias=-20.0)  # predicts nothing anywhere
    prov = relabel(syn, empty, "none", splits=["train"])
    side = pd.read_parquet(syn / "pseudo_labels" / "none.parquet")
    assert side["degenerate"].all() and prov["n_degenerate"] == len(side)
    with pytest.raises(StoreError, match="degenerate"):
        select_rows(syn, splits=["train"], target="pseudo_labels/none")
    # a hand-made sidecar: its flags (not the manifest's) decide, and rows it lacks are never selected
    df = manifest.read_manifest(syn)
    train = df.loc[df["split"] == "train", "row"].to_numpy()
    side = side.assign(degenerate=[r % 3 == 0 for r in side["row"]])
    manifest.write_table(__import__("pyarrow").Table.from_pandas(side, preserve_index=False), syn / "pseudo_labels" / "none.parquet")
    got = select_rows(syn, splits=["train"], target="pseudo_labels/none")
    assert got.tolist() == [r for r in sorted(train) if r % 3]
    assert select_rows(syn, splits=["train"], target="pseudo_labels/none", exclude_degenerate=False).tolist() == sorted(train)
    with pytest.raises(StoreError, match="covered by pseudo_labels/none"):
        select_rows(syn, splits=["test"], target="pseudo_labels/none", exclude_degenerate=False)


def test_selftrain_cli_second_round_pretrains_on_round_one_labels(tmp_path):
    path = make_synthetic_store(tmp_path / "s.zarr", n=N, size=SIZE, shard_records=SHARD)
    before = np.asarray(zarr.open_array(str(path / "pseudo_mask"), mode="r")[:])
    cfg = {
        "out_dir": str(tmp_path / "out"), "stores": {"syn": str(path)}, "model": {"encoder": TINY_ENCODER, "decoder_attention_type": None},
        "loss": {"soft_labels": "weight"},
        "pretrain": {"steps": 2, "batch_size": 4, "log_every": 1, "splits": ["train", "val"]},
        "evaluate": {"batch_size": 16, "overlays": 0},
        "selftrain": {"mode": "soft", "evaluate": False},
        "runtime": {"num_workers": 0, "progress": False, "threads": 1, "tensorboard": False},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(main, ["selftrain", str(tmp_path / "cfg.yaml"), "--rounds", "2", "--name", "it"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "round 2 pseudo_labels/it_r2" in result.output
    out = tmp_path / "out" / "selftrain"
    r1 = json.loads((out / "it_r1" / "pretrain" / "done").read_text())
    assert r1["section"]["pretrain"]["target"] == "pseudo_labels/it_r1" and r1["metrics"]["step"] == 2
    assert r1["section"]["loss"]["soft_labels"] == "weight"
    prov2 = provenance(path, "it_r2")
    assert prov2["source_checkpoint"] == str((out / "it_r1" / "pretrain" / "final.pt").resolve())
    assert prov2["parent_target"] == "pseudo_labels/it_r1" and prov2["round"] == 2
    assert provenance(path, "it_r1")["source_checkpoint"] == str((tmp_path / "out" / "pretrain" / "final.pt").resolve())
    summary = json.loads((out / "it.json").read_text())
    assert [r["target"] for r in summary["rounds"]] == ["pseudo_mask", "pseudo_labels/it_r1", "pseudo_labels/it_r2"]
    assert np.array_equal(np.asarray(zarr.open_array(str(path / "pseudo_mask"), mode="r")[:]), before)
    # re-running resumes: finished rounds are skipped and their labels reused, nothing is overwritten
    again = CliRunner().invoke(main, ["selftrain", str(tmp_path / "cfg.yaml"), "--rounds", "2", "--name", "it"], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert provenance(path, "it_r2") == prov2


def test_label_only_writes_the_source_s_labels_and_trains_nothing(tmp_path, ckpt):
    path = make_synthetic_store(tmp_path / "s.zarr", n=N, size=SIZE, shard_records=SHARD)
    cfg = {
        "out_dir": str(tmp_path / "out"), "stores": {"syn": str(path)}, "model": {"encoder": TINY_ENCODER},
        "pretrain": {"steps": 2, "batch_size": 4, "splits": ["train", "val"]},
        "evaluate": {"batch_size": 16, "overlays": 0},
        "selftrain": {"evaluate": False, "threshold": 0.5},
        "runtime": {"num_workers": 0, "progress": False, "threads": 1, "tensorboard": False},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    args = ["selftrain", str(tmp_path / "cfg.yaml"), "--name", "ft", "--label-only"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0 and "selftrain.source" in refused.output  # from which model: it must be named
    too_many = CliRunner().invoke(main, [*args, "--rounds", "2", "--set", f"selftrain.source={ckpt}"])
    assert too_many.exit_code != 0 and "--rounds 2" in too_many.output
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    bad = CliRunner().invoke(main, [*args, "--set", f"selftrain.source={tmp_path / 'bad.pt'}"])
    assert bad.exit_code != 0 and "bad.pt" in bad.output  # named, and nothing left behind that blocks the re-run
    result = CliRunner().invoke(main, [*args, "--set", f"selftrain.source={ckpt}"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "round 1 pseudo_labels/ft_r1" in result.output
    prov = provenance(path, "ft_r1")
    assert prov["source_checkpoint"] == str(ckpt.resolve()) and prov["rule"]["threshold"] == 0.5
    assert not (tmp_path / "out" / "pretrain").exists() and not (tmp_path / "out" / "selftrain" / "ft_r1").exists()
    # the labels are the source's predictions, p >= 0.5, on the pool (train, val) and 0 elsewhere
    pool = pool_rows(path, ["train", "val"])["row"].to_numpy()
    model, _ = load_model(ckpt, torch.device("cpu"))
    images = np.asarray(zarr.open_array(str(path / "image"), mode="r")[:])
    labels = np.asarray(zarr.open_array(str(path / "pseudo_labels" / "ft_r1"), mode="r")[:])
    expected = (probabilities(model, images[pool], device=torch.device("cpu")) >= 0.5).astype(np.uint8)
    assert np.array_equal(labels[pool], expected)
    assert labels[np.setdiff1d(np.arange(len(labels)), pool)].sum() == 0
    again = CliRunner().invoke(main, [*args, "--set", f"selftrain.source={ckpt}"], catch_exceptions=False)
    assert again.exit_code == 0 and provenance(path, "ft_r1") == prov  # resumed: the same labels, not re-written


def test_config_checks_and_unchanged_sections():
    base = {"out_dir": "x", "stores": {"s": "x"}}
    with pytest.raises(ConfigError, match="selftrain.threshold"):
        load_config(base, ["selftrain.threshold=1.5"])
    assert load_config(base, ["selftrain.threshold=match_fg"]).selftrain.threshold == "match_fg"
    assert load_config(base, ["selftrain.threshold=0.7"]).selftrain.threshold == 0.7
    with pytest.raises(ConfigError, match="soft_labels=weight"):
        load_config(base, ["loss.name=dice", "loss.soft_labels=weight"])
    with pytest.raises(ConfigError, match="selftrain.name"):
        load_config(base, ["selftrain.name=a/b"])
    assert "soft_labels" not in stage_section(load_config(base), "pretrain")["loss"]  # older runs' sections still match
    assert stage_section(load_config(base, ["loss.soft_labels=target"]), "pretrain")["loss"]["soft_labels"] == "target"


# -- losses -------------------------------------------------------------------------------------------


def test_weighted_losses_equal_unweighted_with_unit_weights():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=g)
    target = (torch.rand(3, 1, 8, 8, generator=g) > 0.6).float()
    ones = torch.ones_like(target)
    probs = torch.sigmoid(logits)
    for per_image in (False, True):
        assert focal_tversky(probs, target, weights=ones, per_image=per_image).item() == focal_tversky(probs, target, per_image=per_image).item()
    assert weighted_bce(logits, target, ones).item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, target).item(), rel=1e-6)
    for name in ("focal_tversky", "bce", "dice", "bce_dice"):  # a {0, 1} target: the mode does not matter
        values = {mode: build_loss(LossConfig(name=name, soft_labels=mode)).__call__(logits, target).item()
                  for mode in (("threshold", "target", "weight") if name in ("focal_tversky", "bce") else ("threshold", "target"))}
        assert max(values.values()) - min(values.values()) < 1e-6, (name, values)


def test_weighted_focal_tversky_and_bce_hand_computed():
    probs = torch.tensor([0.9, 0.2, 0.6, 0.1]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    w = torch.tensor([1.0, 0.5, 0.25, 0.0]).view(1, 1, 2, 2)
    tp = 1 * 0.9 + 0.5 * 0.2
    fn = 1 * 0.1 + 0.5 * 0.8
    fp = 0.25 * 0.6 + 0 * 0.1
    expected = (1 - tp / (tp + 0.7 * fn + 0.3 * fp)) ** 0.75
    assert focal_tversky(probs, target, weights=w).item() == pytest.approx(expected, rel=1e-6)
    logits = torch.logit(probs)
    bce = [-np.log(0.9), -np.log(0.2), -np.log(0.4), -np.log(0.9)]
    expected_bce = (1 * bce[0] + 0.5 * bce[1] + 0.25 * bce[2] + 0 * bce[3]) / 1.75
    assert weighted_bce(logits, target, w).item() == pytest.approx(expected_bce, rel=1e-5)
    # through the config: p = 0.75 / 0.25 / 0.5 / 1 -> hard 1 / 0 / 1 / 1 with weights 0.5 / 0.5 / 0 / 1
    p = torch.tensor([0.75, 0.25, 0.5, 1.0]).view(1, 1, 2, 2)
    hard = torch.tensor([1.0, 0.0, 1.0, 1.0]).view(1, 1, 2, 2)
    conf = torch.tensor([0.5, 0.5, 0.0, 1.0]).view(1, 1, 2, 2)
    cfg = LossConfig(soft_labels="weight")
    assert build_loss(cfg)(logits, p).item() == pytest.approx(focal_tversky(probs, hard, weights=conf).item(), rel=1e-6)
    assert build_loss(LossConfig(soft_labels="target"))(logits, p).item() == pytest.approx(focal_tversky(probs, p).item(), rel=1e-6)
    assert build_loss(LossConfig())(logits, p).item() == pytest.approx(focal_tversky(probs, hard).item(), rel=1e-6)


def test_augment_soft_moves_probabilities_with_the_image():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 16, 16, generator=g)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centre = torch.rand(4, 2, generator=g) * 8 + 4
    dist = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
    p = torch.sigmoid((5 - dist) / 1.5)[:, None]  # smooth soft blobs
    flips = AugmentConfig(hflip=1.0, vflip=0.0, rot90=0.0, affine=0.0, brightness=0, contrast=0, gamma=0)
    xa, pa = augment_soft(x, p, flips, torch.Generator().manual_seed(3))
    assert torch.equal(xa, x.flip(-1)) and torch.equal(pa, p.flip(-1))  # p kept soft, same geometry
    cfg = AugmentConfig()
    xa, pa = augment_soft(x, p, cfg, torch.Generator().manual_seed(5))
    xb, mb = augment_batch(x, (p >= 0.5).float(), cfg, torch.Generator().manual_seed(5))
    assert torch.equal(xa, xb)  # the image is augmented exactly as without soft labels
    assert ((pa >= 0.5).float() != mb).float().mean() < 0.02  # and p follows the mask's geometry
    assert pa.min() >= 0 and pa.max() <= 1 and ((pa > 0.01) & (pa < 0.99)).any()
