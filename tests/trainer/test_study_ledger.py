"""The study ledger's on-disk format: repeated lists stored once as blob lines, old inline lines still read, compaction
keeps every run line, and appends from parallel processes (and a compaction among them) lose nothing."""
from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from medsass.errors import MedsassError
from medsass.trainer.study import ledger

TEST_IDS = [f"images/case_{i:04d}.png" for i in range(40)]
FLOOR = [[100 + i, 7, 3] for i in range(40)]


def _row(key: str, seed: int, labeled: int, counts_shift: int = 0) -> dict:
    return {"key": key, "kind": "finetune", "seed": seed,
            "labeled_ids": [f"images/train_{seed}_{i:04d}.png" for i in range(labeled)],
            "evals": {"test": {"ids": list(TEST_IDS), "counts": [[90 + counts_shift, i, 5] for i in range(40)],
                               "floor_counts": [list(x) for x in FLOOR]}}}


def _raw(tmp_path) -> list[dict]:
    return [json.loads(x) for x in ledger.ledger_path(tmp_path).read_text().splitlines()]


def test_repeated_lists_are_stored_once_and_read_back_whole(tmp_path):
    rows = [_row("a", 0, 30), _row("b", 0, 30, 1), _row("c", 1, 30, 2), _row("d", 1, 1, 3)]
    for r in rows:
        ledger.append(tmp_path, r)
    assert ledger.read_lines(tmp_path) == rows
    assert ledger.read_ledger(tmp_path) == {r["key"]: r for r in rows}
    raw = _raw(tmp_path)
    blobs = [x for x in raw if "blob" in x]
    # test ids, floor counts, seed 0's and seed 1's 30 labeled ids; a single labeled id stays inline
    assert len(blobs) == 4 and len({b["blob"] for b in blobs}) == 4
    d = next(x for x in raw if x.get("key") == "d")
    ids_blob = next(b["blob"] for b in blobs if b["value"] == TEST_IDS)
    assert d["labeled_ids"] == ["images/train_1_0000.png"] and d["evals"]["test"]["ids"] == {"$blob": ids_blob}
    assert isinstance(d["evals"]["test"]["counts"], list)  # per-run figures stay on the run's line
    # each blob line comes before the first line that uses it
    first_use = [i for i, x in enumerate(raw) if "key" in x][0]
    assert all(raw.index(b) < first_use for b in blobs[:3])
    # rows read back are independent copies: changing one does not change another
    got = ledger.read_lines(tmp_path)
    got[0]["evals"]["test"]["floor_counts"][0][0] = -1
    got[0]["evals"]["test"]["ids"].append("x")
    assert got[1]["evals"]["test"]["floor_counts"][0][0] == 100 and len(got[1]["evals"]["test"]["ids"]) == 40


def test_old_inline_lines_read_and_compact_keeps_every_line(tmp_path):
    rows = [_row("a", 0, 30), _row("b", 0, 30, 1), _row("a", 0, 30, 5)]  # a key twice: the later line wins
    ledger.ledger_path(tmp_path).write_text("".join(json.dumps(r) + "\n" for r in rows))  # as older medsass wrote it
    ledger.append(tmp_path, _row("c", 2, 30))
    before = ledger.read_lines(tmp_path)
    assert before == rows + [_row("c", 2, 30)] and ledger.read_ledger(tmp_path)["a"] == rows[2]
    size_before, size_after = ledger.compact(tmp_path)
    assert size_after < size_before / 2 and size_after == ledger.ledger_path(tmp_path).stat().st_size
    assert ledger.read_lines(tmp_path) == before
    assert sum("blob" in x for x in _raw(tmp_path)) == 4  # test ids, floor, seed 0 and seed 2 labeled ids
    assert ledger.compact(tmp_path)[1] == size_after  # compacting again changes nothing
    with pytest.raises(MedsassError, match="no ledger"):
        ledger.compact(tmp_path / "none")


def test_missing_blob_and_torn_lines(tmp_path):
    ledger.append(tmp_path, _row("a", 0, 30))
    path = ledger.ledger_path(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(x for x in lines if '"blob"' not in x or TEST_IDS[0] not in x) + "\n")
    with pytest.raises(MedsassError, match="refer to blob"):
        ledger.read_ledger(tmp_path)
    path.write_text('{"seed": 1}\n')
    with pytest.raises(MedsassError, match="line 1 is neither a run"):
        ledger.read_ledger(tmp_path)

    # a kill while writing a run's lines: its blob lines stay (harmless), the torn run line is cut, blobs reused
    path.unlink()
    ledger.append(tmp_path, _row("a", 0, 30))
    with path.open("ab") as fh:
        fh.write(b'{"blob":"0123","value":["x"]}\n{"key": "b", "evals": ')
    with pytest.warns(UserWarning, match="torn last line"):
        assert set(ledger.read_ledger(tmp_path)) == {"a"}
    with pytest.warns(UserWarning):
        ledger.append(tmp_path, _row("b", 0, 30, 1))
    assert set(ledger.read_ledger(tmp_path)) == {"a", "b"}
    assert sum("blob" in x for x in _raw(tmp_path)) == 4  # the 3 of run a, the stray one; b wrote none


def _append_many(results_dir, worker: int, n: int) -> None:
    for i in range(n):
        ledger.append(results_dir, _row(f"w{worker}_{i}", worker, 20 + i % 3, i))


def _compact_twice(results_dir) -> None:
    for _ in range(2):
        ledger.compact(results_dir)


def test_parallel_appends_and_a_compaction_lose_nothing(tmp_path):
    ctx = mp.get_context("fork")
    ledger.ledger_path(tmp_path).write_text("".join(json.dumps(_row(f"old{i}", 9, 30)) + "\n" for i in range(5)))
    procs = [ctx.Process(target=_append_many, args=(tmp_path, w, 15)) for w in range(3)]
    procs.append(ctx.Process(target=_compact_twice, args=(tmp_path,)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = ledger.read_ledger(tmp_path)
    assert set(rows) == {f"old{i}" for i in range(5)} | {f"w{w}_{i}" for w in range(3) for i in range(15)}
    assert rows["w2_14"] == _row("w2_14", 2, 20 + 14 % 3, 14)
