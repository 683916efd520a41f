"""A study resumed from its ledger alone (another machine, a cleaned out_dir): a pretraining whose checkpoint is gone
is run again before the runs that start from it, must reproduce its ledger row, and is not appended twice."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from medsass.trainer.cli import main
from medsass.trainer.study import ledger
from medsass.trainer.study.execute import lost_starts, reproduces
from medsass.trainer.study.jobs import Job, adopt_reruns, select
from medsass.trainer.study.report import Index, runs_from_ledger

from medsass.testing import make_synthetic_store, tiny_study_train

torch.set_num_threads(1)


def _study(tmp_path: Path, budgets: list[str]) -> Path:
    store = tmp_path / "main.zarr"
    if not store.exists():
        make_synthetic_store(store, n=30, size=32, seed=0)
    data = {
        "name": "tiny", "out_dir": str(tmp_path / "out"), "results_dir": str(tmp_path / "results"), "seeds": [0],
        "budgets": budgets, "arms": ["scratch", "end_to_end", "ssl"], "jobs": 1, "bootstrap": 100, "convergence": None,
        "ssl": {"steps": 2, "batch_size": 4},
        "datasets": [{"name": "synth", "store": str(store), "targets": ["store"]}],
        "train": tiny_study_train(),
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _lines(tmp_path: Path) -> list[dict]:
    return ledger.read_lines(tmp_path / "results")


def test_lost_checkpoints_are_rerun_checked_and_not_appended_twice(tmp_path):
    res = CliRunner().invoke(main, ["study", str(_study(tmp_path, ["1"]))])
    assert res.exit_code == 0, res.output
    first = _lines(tmp_path)
    assert sorted(r["kind"] for r in first) == ["finetune"] * 3 + ["pretrain", "ssl"]

    # a new machine: the ledger is committed, out_dir (stores aside) is gone; one more budget to run
    shutil.rmtree(tmp_path / "out" / "runs")
    path = _study(tmp_path, ["1", "2"])
    res = CliRunner().invoke(main, ["study", str(path), "--dry-run"])
    assert res.output.count("rerun ") == 2 and "its checkpoint is gone" in res.output, res.output
    res = CliRunner().invoke(main, ["study", str(path)])
    assert res.exit_code == 0, res.output
    assert "2 in the ledger run again first" in res.output and res.output.count("rerun reproduces its ledger row") == 2
    second = _lines(tmp_path)
    assert second[:len(first)] == first  # nothing rewritten, no second line for the reruns
    assert sorted((r["kind"], r["arm"]) for r in second[len(first):]) == [
        ("finetune", "end_to_end"), ("finetune", "scratch"), ("finetune", "ssl")]

    # a rerun that does not reproduce its row (here: the ledger's counts altered) fails with its dependents only
    shutil.rmtree(tmp_path / "out" / "runs")
    rows = _lines(tmp_path)
    pre = next(r for r in rows if r["kind"] == "pretrain")
    pre["evals"]["test"]["counts"][0][0] += 1
    ledger.ledger_path(tmp_path / "results").write_text("".join(json.dumps(r) + "\n" for r in rows))  # lists inline
    res = CliRunner().invoke(main, ["study", str(path), "--compact-ledger"])
    assert res.exit_code == 0 and "every run line kept" in res.output, res.output
    assert _lines(tmp_path) == rows  # the lists are too short to move here; test_study_ledger.py covers that
    res = CliRunner().invoke(main, ["study", str(_study(tmp_path, ["1", "2", "3"]))])
    assert res.exit_code == 3
    assert "does not reproduce its ledger row (zero-shot IoU on test" in res.output, res.output
    assert "the run it starts from failed" in res.output
    new = [(r["arm"], r["n_labels"]) for r in _lines(tmp_path)[len(rows):]]
    assert sorted(new) == [("scratch", 3), ("ssl", 3)]  # scratch needs no start; SimCLR's rerun reproduced

    # the rerun's checkpoint stays, marked: the next call does not start from it (nor reruns it)
    marker = tmp_path / "out/runs/synth/store/seed0/unreproduced.json"
    assert marker.exists() and (tmp_path / "out/runs/synth/store/seed0/pretrain/final.pt").exists()
    path = _study(tmp_path, ["1", "2", "3"])
    res = CliRunner().invoke(main, ["study", str(path), "--dry-run"])
    states = [line.split()[0] for line in res.output.splitlines() if "  -> " in line]
    assert states.count("unreproduced") == 1 and "rerun" not in states, res.output
    res = CliRunner().invoke(main, ["study", str(path)])
    assert res.exit_code == 3 and "not started from synth store pretrain seed0" in res.output, res.output
    assert "the run it starts from failed" in res.output and "run again first" not in res.output
    # or adopt the rerun: a new ledger line (new key), and the runs to do start from it under new keys
    before = _lines(tmp_path)
    res = CliRunner().invoke(main, ["study", str(path), "--adopt-reruns", "--dry-run"])
    assert res.exit_code == 0 and "unreproduced " in res.output, res.output
    adopt_dir = tmp_path / "adopt"
    shutil.copytree(tmp_path / "out", adopt_dir / "out")
    shutil.copytree(tmp_path / "results", adopt_dir / "results")
    adopt_path = adopt_dir / "study.yaml"
    adopt_path.write_text(path.read_text().replace(str(tmp_path / "out"), str(adopt_dir / "out"))
                          .replace(str(tmp_path / "results"), str(adopt_dir / "results")))
    res = CliRunner().invoke(main, ["study", str(adopt_path), "--adopt-reruns"])
    assert res.exit_code == 0 and "adopted as rerun 1" in res.output, res.output
    after = _lines(adopt_dir)
    assert after[:len(before)] == before
    rerun, e2e = after[len(before):]
    assert rerun["rerun_of"] == pre["key"] and rerun["realization"] == 1 and rerun["key"] != pre["key"]
    assert (e2e["arm"], e2e["n_labels"]) == ("end_to_end", 3)
    assert not (adopt_dir / "out/runs/synth/store/seed0/unreproduced.json").exists()
    table = (adopt_dir / "results" / "table.md").read_text()
    assert "Adopted reruns" in table and "synth store pretrain seed0 (rerun 1)" in table and "started from it: 1 runs" in table
    res = CliRunner().invoke(main, ["study", str(adopt_path)])  # and the next call finds it all done
    assert res.exit_code == 0 and "0 to run" in res.output, res.output

    # the user's way out: drop the pretraining's line; it is redone from the kept checkpoint, unmarked, and used
    rows = [r for r in _lines(tmp_path) if r["kind"] != "pretrain"]
    ledger.ledger_path(tmp_path / "results").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(main, ["study", str(path)])
    assert res.exit_code == 0, res.output
    assert not marker.exists() and ("finetune", "end_to_end", 3) in {
        (r["kind"], r["arm"], r["n_labels"]) for r in _lines(tmp_path)}


def test_only_starts_a_run_to_do_needs_are_rerun(tmp_path):
    def job(name, kind, needs=None):
        return Job(kind, "d", "t", "a", 0, str(tmp_path / name), {}, {"name": name}, needs=needs.key if needs else None)

    pre, pre2 = job("p", "pretrain"), job("q", "pretrain")
    fine, fine2 = job("f", "finetune", pre), job("g", "finetune", pre2)
    (tmp_path / "q" / "pretrain").mkdir(parents=True)
    (tmp_path / "q" / "pretrain" / "final.pt").write_bytes(b"x")
    jobs = [pre, pre2, fine, fine2]
    assert lost_starts(jobs, {pre.key, pre2.key}) == [pre]  # q's checkpoint is there
    assert lost_starts(jobs, {pre.key, pre2.key, fine.key}) == []  # nothing to do starts from p
    assert lost_starts(jobs, {pre2.key}) == []  # p is not in the ledger: it runs as any other job


def test_reproduces_compares_every_split_and_the_ssl_loss():
    ev = {"ids": ["a", "b"], "counts": [[1, 2, 3], [4, 5, 6]], "floor_counts": []}
    row = {"kind": "pretrain", "evals": {"test": ev, "val": ev}}
    assert reproduces(row, row) is None
    other = {"kind": "pretrain", "evals": {"test": ev, "val": {**ev, "counts": [[1, 2, 3], [4, 5, 7]]}}}
    assert "on val" in reproduces(row, other)
    assert "on test" in reproduces({"kind": "pretrain", "evals": {}}, row)
    ssl = {"kind": "ssl", "ssl": {"loss_last": 0.5}}
    assert reproduces(ssl, ssl) is None and "SimCLR loss" in reproduces(ssl, {"kind": "ssl", "ssl": {"loss_last": 0.6}})


def test_adopt_reruns_moves_only_the_runs_to_do_and_is_idempotent(tmp_path):
    def job(name, kind, needs=None):
        return Job(kind, "d", "t", "a", 0, str(tmp_path / name), {}, {"name": name, "source": needs.key if needs else None},
                   needs=needs.key if needs else None)

    pre = job("p", "pretrain")
    done_run, todo_run, other = job("f", "finetune", pre), job("g", "finetune", pre), job("h", "finetune")
    jobs = [pre, done_run, todo_run, other]
    rows = {pre.key: {}, done_run.key: {}}
    assert adopt_reruns(jobs, rows) == jobs  # nothing adopted
    rerun = replace(pre, realization=1)
    rows[rerun.key] = {"rerun_of": pre.key, "realization": 1}
    out = adopt_reruns(jobs, rows)
    assert [j.key for j in out[:2]] == [pre.key, done_run.key] and out[3] == other  # the ledger's runs keep their start
    assert out[2].needs == rerun.key and out[2].key != todo_run.key and out[4].key == rerun.key
    assert [j.key for j in adopt_reruns(out, rows)] == [j.key for j in out]
    assert "(rerun 1)" in out[4].label


def test_a_variant_moved_to_a_rerun_brings_its_partner_in_a_folder_of_its_own(tmp_path):
    def job(name, needs=None, **kw):
        out = str(tmp_path / name)
        return Job("finetune" if needs else "pretrain", "d", "t", "end_to_end" if needs else "pretrain", 0, out,
                   {"out_dir": out, "finetune": {"labeled_ids": f"{out}/suggest/picks.csv", "pretrained": "/p/final.pt"}},
                   {"name": name, "source": needs.key if needs else None}, needs=needs.key if needs else None,
                   budgets=kw.pop("budgets", ["5"]), **kw)

    pre = job("p")
    base5, base10 = job("e5", pre), job("e10", pre, budgets=["10"])  # in the ledger, from the original start
    picked = job("u5", pre, strategy="uncertain")  # to do: moves to the rerun
    jobs = [pre, base5, base10, picked]
    rerun = replace(pre, realization=1)
    rows = {pre.key: {}, base5.key: {}, base10.key: {}, rerun.key: {"rerun_of": pre.key, "realization": 1}}
    out = adopt_reruns(jobs, rows)
    moved = next(j for j in out if j.strategy)
    partner = next(j for j in out if j.partner_of)
    assert moved.needs == partner.needs == rerun.key and partner.partner_of == (moved.key,)
    assert partner.key not in rows and partner.budgets == ["5"]  # base10 pairs with nothing moved: not run again
    assert sum(1 for j in out if j.budgets == ["10"]) == 1
    # own folders: nothing the original start's runs left in theirs is resumed as these runs
    assert partner.dir == str(tmp_path / "e5@rerun1") and partner.config["out_dir"] == partner.dir
    assert moved.config["finetune"] == {"labeled_ids": str(tmp_path / "u5@rerun1/suggest/picks.csv"),
                                        "pretrained": "/p/final.pt"}
    assert [j.key for j in adopt_reruns(out, rows)] == [j.key for j in out]  # idempotent
    # choosing the strategy's runs keeps what they pair with (and the start they need)
    chosen = {j.key for j in select(out, strategies=["uncertain"])}
    assert chosen == {moved.key, partner.key, rerun.key}


def _job(tmp_path: Path, name: str, needs: Job | None = None, **kw) -> Job:
    """A pretraining (no ``needs``) or an end-to-end fine-tune from ``needs``, in its own folder under tmp_path."""
    out = str(tmp_path / name)
    return Job("finetune" if needs else "pretrain", "d", "t", "end_to_end" if needs else "pretrain", 0, out,
               {"out_dir": out}, {"name": name, "source": needs.key if needs else None},
               needs=needs.key if needs else None, budgets=kw.pop("budgets", ["5"]), **kw)


def test_a_start_adopted_twice_keeps_the_runs_done_from_its_first_rerun(tmp_path):
    """A start adopted again on a later machine (its first rerun's checkpoint was gone too): the runs done from the
    first rerun stay in the plan as done (the report pairs them) and are not moved to the second rerun and run again;
    only the runs still to do move, with their partner."""
    job = partial(_job, tmp_path)

    pre = job("p")
    base5, base10 = job("e5", pre), job("e10", pre, budgets=["10"])  # in the ledger from the original start
    u5, u10 = job("u5", pre, strategy="uncertain"), job("u10", pre, budgets=["10"], strategy="uncertain")
    jobs = [pre, base5, base10, u5, u10]
    r1, r2 = replace(pre, realization=1), replace(pre, realization=2)
    rows = {pre.key: {}, base5.key: {}, base10.key: {}, r1.key: {"rerun_of": pre.key, "realization": 1}}
    first = adopt_reruns(jobs, rows)
    u5_r1 = next(j for j in first if j.strategy and j.budgets == ["5"])
    partner_r1 = next(j for j in first if j.partner_of == (u5_r1.key,))
    rows |= {u5_r1.key: {}, partner_r1.key: {}}  # the first machine ran u5 and its partner from rerun 1, not u10
    rows[r2.key] = {"rerun_of": pre.key, "realization": 2}  # the next machine adopted the start again
    out = adopt_reruns(jobs, rows)
    keys = [j.key for j in out]
    assert len(keys) == len(set(keys))
    # done from rerun 1: still in the plan, under their keys, from rerun 1; the original u5 key is gone (never to do)
    assert u5_r1.key in keys and partner_r1.key in keys and u5.key not in keys
    assert next(j for j in out if j.key == u5_r1.key).needs == r1.key
    # to do: u10 moves to rerun 2 and brings base10 from rerun 2 as its partner; u5 is not run a second time
    moved = [j for j in out if j.key not in rows and j.kind == "finetune"]
    assert {(j.strategy, tuple(j.budgets), j.needs) for j in moved} == {("uncertain", ("10",), r2.key), (None, ("10",), r2.key)}
    assert {r1.key, r2.key} <= set(keys)  # both reruns are listed (the report reads which runs came from a rerun)
    assert [j.key for j in adopt_reruns(out, rows)] == keys  # idempotent


def test_pairs_take_the_runs_with_the_same_start():
    def run(arm, seed, start, value, rerun=False, base=None):
        return {"dataset": "d", "eval": "test", "target": "t", "arm": arm, "n_labels": 5, "steps_factor": 1, "seed": seed,
                "start": start, "start_base": "P" if rerun else (base or start), "from_rerun": rerun, "ids": ["a", "b"],
                "counts": np.array([[value, 10 - value, 0], [value, 10 - value, 0]])}

    key = lambda arm: ("d", "test", "t", arm, 5, 1)  # noqa: E731
    runs = [run("scratch", s, None, 4) for s in (0, 1, 2)]
    runs += [run("end_to_end", s, "P", 6) for s in (0, 1, 2)]  # seeds 1-2 from the original start ...
    runs += [run("end_to_end", s, "R", 5, rerun=True) for s in (1, 2)]  # ... and again from their rerun (partners)
    runs += [run("strategy:uncertain", 0, "P", 8)] + [run("strategy:uncertain", s, "R", 7, rerun=True) for s in (1, 2)]
    idx = Index(runs)
    assert all(float(c[0, 0]) == 6 for c in idx.counts[key("end_to_end")].values())  # tables: the original's runs
    assert idx.diff(key("end_to_end"), key("scratch"), reps=50).mean == pytest.approx(0.6 - 0.4)
    d = idx.diff(key("strategy:uncertain"), key("end_to_end"), reps=50)  # 0.8-0.6 on seed 0, 0.7-0.5 on seeds 1-2
    assert d.n_seeds == 3 and d.mean == pytest.approx(0.2)
    assert {s: float(c[0, 0]) for s, c in idx.partners(key("strategy:uncertain"), key("end_to_end")).items()} == {1: 5, 2: 5}
    # without the partners, seeds 1-2 have no same-start pair
    lone = Index([r for r in runs if not (r["arm"] == "end_to_end" and r["start"] == "R")])
    assert lone.diff(key("strategy:uncertain"), key("end_to_end"), reps=50).n_seeds == 1
    # arms that start from different pretrainings (SimCLR's, end-to-end's) pair by seed, from the original start or
    # a rerun of either: the seed fixes their labels, init and batch order, and no start is theirs to share
    ssl = [run("ssl", s, "S", 3) for s in (0, 1)] + [run("ssl", 2, "S2", 3, base="S")]
    d = Index(runs + ssl).diff(key("end_to_end"), key("ssl"), reps=50)
    assert d is not None and d.n_seeds == 3 and d.mean == pytest.approx(0.6 - 0.3)


def test_adopting_a_rerun_in_one_call_runs_the_moved_strategy_and_its_partner(tmp_path):
    path = _study(tmp_path, ["2"])
    assert CliRunner().invoke(main, ["study", str(path)]).exit_code == 0
    # a new machine, whose pretraining will not reproduce (the ledger's counts altered), and a strategy to run
    shutil.rmtree(tmp_path / "out" / "runs")
    rows = _lines(tmp_path)
    pre = next(r for r in rows if r["kind"] == "pretrain")
    pre["evals"]["test"]["counts"][0][0] += 1
    ledger.ledger_path(tmp_path / "results").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = yaml.safe_load(path.read_text())
    data["strategies"] = {"names": ["uncertain"], "budgets": ["2"]}
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["study", str(path), "--adopt-reruns", "--strategies", "uncertain"])
    assert res.exit_code == 0 and "1 of those run again from it" in res.output, res.output
    new = _lines(tmp_path)[len(rows):]
    rerun = new[0]
    assert rerun["rerun_of"] == pre["key"]
    assert sorted((r["arm"], r.get("strategy", "random")) for r in new[1:]) == [("end_to_end", "random"), ("end_to_end", "uncertain")]
    assert (tmp_path / "out/runs/synth/store/seed0/n002/end_to_end@rerun1/finetune/best.pt").exists()
    table = (tmp_path / "results" / "table.md").read_text()
    assert "started from it: 2 runs" in table
    assert re.search(r"\| 2 \| [0-9.]+ \(1\) \| [0-9.]+ \(1\) \| [-+][0-9.]+ \[", table), table  # uncertain − random: paired
    assert "Random picks run again from an adopted rerun" in table and "2 labels, seed 0: " in table
    res = CliRunner().invoke(main, ["study", str(path), "--adopt-reruns", "--dry-run"])
    assert "todo " not in res.output, res.output  # the moved run and its partner are both done


def _pre_row(base: str | None, realization: int, counts: list[list[int]]) -> dict:
    ev = {"ids": ["a", "b"], "counts": counts, "floor_counts": []}
    row = {"kind": "pretrain", "evals": {"test": ev, "val": ev}}
    return {**row, "rerun_of": base, "realization": realization} if base else row


def test_a_rerun_that_reproduces_an_earlier_realization_is_its_twin():
    """Training is deterministic per CPU type: a machine of the type that made an earlier realization makes it again."""
    a, b, c = [[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 7]], [[9, 2, 3], [4, 5, 7]]
    rows = {"P": _pre_row(None, 0, a), "R1": _pre_row("P", 1, b), "R2": _pre_row("P", 2, a), "R3": _pre_row("P", 3, b),
            "R4": _pre_row("P", 4, c), "Q": {"kind": "pretrain"}, "S1": {"kind": "pretrain", "rerun_of": "Q",
                                                                         "realization": 1}}
    rows["R5"] = {**rows["R3"], "realization": 5}  # the twin of a twin: the earliest one
    assert ledger.same_realizations(rows) == {"R2": "P", "R3": "R1", "R5": "R1"}  # rows without figures match nothing
    ssl = {"kind": "ssl", "ssl": {"loss_last": 0.5}}
    rows = {"S": ssl, "T1": {**ssl, "rerun_of": "S", "realization": 1}, "T2": {"kind": "ssl", "ssl": {"loss_last": 0.6},
                                                                            "rerun_of": "S", "realization": 2}}
    assert ledger.same_realizations(rows) == {"T1": "S"}


def test_a_variant_moved_to_a_twin_rerun_needs_no_partner_and_pairs_with_the_twins_run(tmp_path):
    """Start P adopted as rerun 1 (another CPU type), then as rerun 2, which reproduced rerun 1 exactly: the moved
    strategy run pairs with the random picks done from rerun 1, so no partner is run; a rerun that reproduced the
    original pairs with the original's runs. A partner already run stays in the plan."""
    job = partial(_job, tmp_path)

    pre = job("p")
    e5, u5, h5 = job("e5", pre), job("u5", pre, strategy="uncertain"), job("h5", pre, strategy="hybrid")
    jobs = [pre, e5, u5, h5]
    r1, r2 = replace(pre, realization=1), replace(pre, realization=2)
    a, b = [[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 7]]
    rows = {pre.key: _pre_row(None, 0, a), e5.key: {}, r1.key: _pre_row(pre.key, 1, b)}
    first = adopt_reruns(jobs, rows)
    u5_r1 = next(j for j in first if j.strategy == "uncertain")
    e5_r1 = next(j for j in first if j.partner_of)
    rows |= {u5_r1.key: {}, e5_r1.key: {}}  # the first machine ran uncertain and its partner from rerun 1
    rows[r2.key] = _pre_row(pre.key, 2, b)  # the next machine, of rerun 1's type: the same checkpoint
    out = adopt_reruns(jobs, rows)
    todo = [j for j in out if j.key not in rows and j.kind == "finetune"]
    assert [(j.strategy, j.needs) for j in todo] == [("hybrid", r2.key)]  # no partner: e5 from rerun 1 is its twin's
    assert e5_r1.key in {j.key for j in out}
    # the report pairs hybrid (from rerun 2) with e5 from rerun 1: one start
    rows[todo[0].key] = {}
    scored = {"test": {"ids": ["a", "b"], "counts": [[6, 4, 0], [6, 4, 0]], "floor_counts": []}}
    runs_rows = {k: {"evals": scored, **v, "seconds": {}} for k, v in rows.items()}
    runs = runs_from_ledger(runs_rows, out)
    starts = {(r["arm"], r["key"]): r["start"] for r in runs if r["arm"] != "zero_shot"}
    assert starts[("strategy:hybrid", todo[0].key)] == starts[("end_to_end", e5_r1.key)] == r1.key
    n = todo[0].n_labels
    pair = Index(runs).pair(("d", "test", "t", "strategy:hybrid", n, 1), ("d", "test", "t", "end_to_end", n, 1), 0)
    assert pair is not None
    # a rerun that reproduced the original: no partner either (the original's run is the pair)
    rows2 = {pre.key: _pre_row(None, 0, a), e5.key: {}, r1.key: _pre_row(pre.key, 1, a)}
    out2 = adopt_reruns(jobs, rows2)
    assert sorted((j.strategy or "random", j.needs) for j in out2 if j.key not in rows2 and j.kind == "finetune") == [
        ("hybrid", r1.key), ("uncertain", r1.key)]
    # without the twin (rerun 2 made on a third CPU type), the partner is run again from rerun 2
    rows[r2.key] = _pre_row(pre.key, 2, [[7, 2, 3], [4, 5, 7]])
    del rows[todo[0].key]
    again = [j for j in adopt_reruns(jobs, rows) if j.key not in rows and j.kind == "finetune"]
    assert sorted(j.strategy or "random" for j in again) == ["hybrid", "random"]
