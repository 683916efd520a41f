"""``medsass-train suggest``: k-center greedy against brute force, strategy invariants, candidates, outputs."""
from __future__ import annotations

import csv
import itertools
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from medsass.trainer import checkpoint as ck
from medsass.trainer.cli import main
from medsass.trainer.config import ModelConfig
from medsass.trainer.model import build_model, model_args
from medsass.trainer.suggest import (
    CSV_COLUMNS,
    STRATEGIES,
    binary_entropy,
    candidates,
    forward_pass,
    hybrid_pool_size,
    k_center_greedy,
    select,
    suggest,
)

from medsass import manifest
from medsass.errors import StoreError
from medsass.store import open_store
from medsass.testing import TINY_ENCODER, make_synthetic_store

N, SIZE, SHARD = 80, 32, 8


def brute_force_k_center(x: np.ndarray, k: int, first: int) -> tuple[list[int], list[float]]:
    """The greedy rule spelled out: every step, each point's distance to every pick, no shortcuts."""
    picks, dists = [first], [float("nan")]
    while len(picks) < k:
        best, best_d = -1, -1.0
        for i in range(len(x)):
            if i in picks:
                continue
            d = min(float(np.sqrt(((x[i] - x[j]) ** 2).sum())) for j in picks)
            if d > best_d:
                best, best_d = i, d
        picks.append(best)
        dists.append(best_d)
    return picks, dists


def test_k_center_greedy_on_a_line_known_answer():
    x = np.array([[0.0], [1.0], [2.0], [10.0], [6.0]])
    picks, dists = k_center_greedy(x, 5, first=0)
    assert picks.tolist() == [0, 3, 4, 2, 1]  # 10 is farthest from 0; then 6 (4 from 10); then 2 (2 from 0); then 1
    np.testing.assert_allclose(dists, [np.nan, 10.0, 4.0, 2.0, 1.0])


@pytest.mark.parametrize("seed", range(5))
def test_k_center_greedy_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(60, 6))
    first = int(rng.integers(60))
    picks, dists = k_center_greedy(torch.from_numpy(x), 12, first=first)
    want, want_d = brute_force_k_center(x, 12, first)
    assert picks.tolist() == want
    np.testing.assert_allclose(dists[1:], want_d[1:], rtol=1e-9)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)  # the embeddings suggest uses: L2-normalised float32
    picks32, _ = k_center_greedy(torch.from_numpy(unit.astype(np.float32)), 12, first=first)
    assert picks32.tolist() == brute_force_k_center(unit, 12, first)[0]


def test_k_center_radius_is_within_twice_the_optimum():
    rng = np.random.default_rng(3)
    for _ in range(5):
        x, k = rng.uniform(size=(10, 2)), 3
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        optimum = min(d[:, list(c)].min(1).max() for c in itertools.combinations(range(10), k))
        picks, _ = k_center_greedy(x, k, first=int(rng.integers(10)))
        assert d[:, picks].min(1).max() <= 2 * optimum + 1e-12


def test_k_center_picks_duplicates_only_when_nothing_else_is_left():
    x = np.array([[0.0, 0.0]] * 3 + [[1.0, 0.0]] * 2)
    picks, dists = k_center_greedy(x, 5, first=0)
    assert sorted(picks.tolist()) == [0, 1, 2, 3, 4] and picks[1] == 3
    np.testing.assert_allclose(dists[1:], [1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="k-center greedy needs"):
        k_center_greedy(x, 6, first=0)


def test_binary_entropy_in_bits():
    np.testing.assert_allclose(binary_entropy(torch.tensor([0.0, 0.5, 1.0, 0.11])).numpy(), [0.0, 1.0, 0.0, 0.4999], atol=1e-3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_invariants(strategy):
    m, n = 300, 7
    rng = np.random.default_rng(0)
    emb = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(m, 16)).astype(np.float32)), dim=1)
    dis = rng.uniform(size=m)
    kw = dict(embeddings=emb, disagreement=dis, m=m)
    pos, score, dist = select(strategy, n, seed=5, **kw)
    assert len(pos) == len(score) == len(dist) == n and len(set(pos.tolist())) == n and pos.min() >= 0 and pos.max() < m
    again, _, _ = select(strategy, n, seed=5, **kw)
    assert again.tolist() == pos.tolist()  # deterministic with the seed
    other = select(strategy, n, seed=6, **kw)[0]
    if strategy == "uncertain":
        assert other.tolist() == pos.tolist() == np.argsort(-dis)[:n].tolist()
        np.testing.assert_array_equal(score, dis[pos])
    else:
        assert other.tolist() != pos.tolist()
    if strategy == "random":
        assert select(strategy, n + 5, seed=5, **kw)[0][:n].tolist() == pos.tolist()  # a larger n extends the list
        assert np.all(np.diff(score) >= 0)
    if strategy == "hybrid":
        pool = np.argsort(-dis)[: hybrid_pool_size(n)]
        assert set(pos.tolist()) <= set(pool.tolist())
    if strategy in ("diverse", "hybrid"):
        assert np.isnan(score[0]) and np.all(np.diff(score[1:]) <= 1e-6)  # greedy distances never increase


def test_candidates_are_usable_unlabeled_train_records(tmp_path):
    path = make_synthetic_store(tmp_path / "s.zarr", n=40, size=SIZE, shard_records=SHARD, labeled_fraction=0.5, degenerate_every=4)
    df = manifest.read_table(manifest.manifest_path(path)).to_pandas()
    df.loc[df["row"] == 2, ["qc_flags", "degenerate"]] = ["constant,fg_low", True]
    manifest.write_table(pa.Table.from_pandas(df, schema=manifest.ARROW_SCHEMA, preserve_index=False), manifest.manifest_path(path))
    cand, excluded = candidates(path)
    train = df[(df["split"] == "train") & ~df["has_label"]]
    assert set(cand["row"]) == set(train.loc[~train["degenerate"], "row"]) and cand["row"].is_monotonic_increasing
    assert excluded["other_split"] == int((df["split"] != "train").sum())
    assert excluded["labeled"] == int(((df["split"] == "train") & df["has_label"]).sum())
    with_deg, excluded2 = candidates(path, include_degenerate=True)
    assert set(with_deg["row"]) == set(train["row"]) - ({2} if 2 in set(train["row"]) else set())
    assert excluded2["degenerate"] == 0 and excluded2["constant"] == int(2 in set(train["row"]))


def make_checkpoint(path, head_bias: float | None = None):
    """A tiny untrained U-Net checkpoint; ``head_bias`` makes the output constant: p = sigmoid(bias) everywhere."""
    torch.manual_seed(0)
    cfg = ModelConfig(encoder=TINY_ENCODER)
    model = build_model(cfg)
    if head_bias is not None:
        head = model.segmentation_head[0]
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.constant_(head.bias, head_bias)
    ck.save(path, {"kind": "final", "stage": "pretrain", "model": model.state_dict(), "model_args": model_args(cfg), "step": 3,
                   "config": {"runtime": {"threads": 1, "amp": "auto", "channels_last": "auto"}}})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("suggest")
    store = make_synthetic_store(root / "s.zarr", n=N, size=SIZE, shard_records=SHARD, labeled_fraction=0.3, degenerate_every=9)
    run = root / "run"
    make_checkpoint(run / "pretrain" / "final.pt", head_bias=10.0)  # predicts foreground everywhere
    return store, run


def read_picks(out) -> tuple[list[str], list[dict[str, str]]]:
    with (out / "picks.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_suggest_writes_picks_gallery_and_parameters(setup, tmp_path, strategy):
    store, run = setup
    res = suggest(run, store, 6, tmp_path / "a", strategy=strategy, seed=2, batch_size=5)
    cols, rows = read_picks(tmp_path / "a")
    assert tuple(cols) == CSV_COLUMNS and cols[:6] == ["rank", "sample_id", "source_rel", "strategy", "score", "reason"]
    cand, _ = candidates(store)
    assert len(rows) == 6 and len({r["sample_id"] for r in rows}) == 6 and [int(r["rank"]) for r in rows] == list(range(1, 7))
    assert {r["sample_id"] for r in rows} <= set(cand["sample_id"])  # unlabeled, train, pseudo-mask passed QC
    assert all(r["strategy"] == strategy and r["reason"] and not r["source_rel"].startswith("/") for r in rows)
    group, _ = open_store(store)
    for r in rows:  # constant prediction p ~ 1: zero-shot IoU = the pseudo-mask's foreground fraction
        fg = float(np.asarray(group["pseudo_mask"][int(r["row"])]).mean())
        assert float(r["zero_shot_iou"]) == pytest.approx(fg, abs=1e-6) and float(r["disagreement"]) == pytest.approx(1 - fg, abs=1e-6)
        assert float(r["entropy"]) < 1e-3
    if strategy == "uncertain":  # known answer: the candidates with the least pseudo-mask foreground
        fg_all = np.asarray(group["pseudo_mask"].oindex[cand["row"].to_numpy()]).mean(axis=(1, 2))
        want = cand["row"].to_numpy()[np.lexsort((cand["row"].to_numpy(), fg_all))[:6]]
        assert [int(r["row"]) for r in rows] == want.tolist()
        assert "zero-shot vs pseudo-mask IoU" in rows[0]["reason"]
    if strategy in ("diverse", "hybrid"):
        assert rows[0]["score"] == "" and "drawn at random (seed 2)" in rows[0]["reason"]
        assert re.search(r"most distant from picks so far \(d=\d\.\d\d\)", rows[1]["reason"])
    page = (tmp_path / "a" / "gallery.html").read_text()
    assert page.count('class="pick"') == 6 and page.count("<img") == 18 and page.count("data:image/png;base64,") == 18
    assert "http://" not in page and "https://" not in page and "<script" not in page
    params = json.loads((tmp_path / "a" / "suggest.json").read_text())
    assert params["strategy"] == strategy and params["n"] == 6 and params["seed"] == 2 and params == res
    assert params["checkpoint"]["path"].endswith("pretrain/final.pt") and params["checkpoint"]["step"] == 3
    assert params["candidates"] == len(cand) and params["threads"] == 1
    suggest(run, store, 6, tmp_path / "b", strategy=strategy, seed=2, batch_size=32)
    again = read_picks(tmp_path / "b")[1]  # same seed, other batch size: same picks and reasons
    assert [(r["sample_id"], r["reason"]) for r in again] == [(r["sample_id"], r["reason"]) for r in rows]


def test_encoder_only_pass_gives_the_same_normalised_embeddings(setup):
    store, run = setup
    state = ck.load(run / "pretrain" / "final.pt")
    model = build_model(state["model_args"])
    model.load_state_dict(state["model"])
    rows = candidates(store)[0]["row"].to_numpy()[:9]
    both = forward_pass(model, store, rows, batch_size=4, device=torch.device("cpu"))
    enc = forward_pass(model, store, rows, batch_size=4, device=torch.device("cpu"), scores=False)
    np.testing.assert_array_equal(both["row"], rows)
    torch.testing.assert_close(both["embedding"], enc["embedding"])
    torch.testing.assert_close(both["embedding"].norm(dim=1), torch.ones(9))
    group, _ = open_store(store)
    x = torch.from_numpy(np.asarray(group["image"].oindex[rows]))[:, None].float() / 255
    with torch.no_grad():
        gap = model.eval().encoder(x)[-1].mean(dim=(2, 3))
    torch.testing.assert_close(both["embedding"], torch.nn.functional.normalize(gap, dim=1))


def test_cli_default_is_random_and_errors_are_one_line(setup, tmp_path):
    store, run = setup
    help_text = CliRunner().invoke(main, ["suggest", "--help"]).output
    assert "[default: random]" in help_text and "no strategy beat it" in " ".join(help_text.split())
    res = CliRunner().invoke(main, ["suggest", str(run), "--store", str(store), "--n", "3", "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 0, res.output
    _, rows = read_picks(tmp_path / "o")
    assert [r["strategy"] for r in rows] == ["random"] * 3 and "random pick (seed 0)" in rows[0]["reason"]
    too_many = CliRunner().invoke(main, ["suggest", str(run), "--store", str(store), "--n", "999", "--out", str(tmp_path / "x")])
    assert too_many.exit_code == 2 and "lower --n" in too_many.output and "candidate records" in too_many.output
    with pytest.raises(StoreError, match="lower --n"):
        suggest(run, store, 999, tmp_path / "y")
    assert not (tmp_path / "x").exists()
    nothing = CliRunner().invoke(main, ["suggest", str(tmp_path), "--store", str(store), "--n", "1", "--out", str(tmp_path / "z")])
    assert nothing.exit_code == 2 and "no checkpoint at" in nothing.output


def test_candidates_frame_has_manifest_columns(setup):
    store, _ = setup
    cand, excluded = candidates(store)
    assert isinstance(cand, pd.DataFrame) and {"row", "sample_id", "source_rel"} <= set(cand.columns)
    assert excluded["degenerate"] > 0 and not cand["has_label"].any() and (cand["split"] == "train").all()
