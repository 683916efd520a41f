"""Which checkpoint predict and export take from a run folder: the one its evaluate stage scored."""
from __future__ import annotations

import json

import pytest
from medsass.trainer import checkpoint as ck

from medsass.errors import ConfigError


def _run(tmp_path, *names):
    ft = tmp_path / "run" / "finetune"
    ft.mkdir(parents=True)
    for n in names:
        (ft / n).write_bytes(n.encode() * 10)  # distinct contents: matched by sha256, not by name
    return tmp_path / "run"


def _scored(run, name):
    (run / "evaluate").mkdir()
    (run / "evaluate" / "done").write_text(json.dumps({"stage": "evaluate", "checkpoint": ck.file_id(run / "finetune" / name)}))


def test_a_run_folder_gives_the_checkpoint_its_evaluate_scored(tmp_path):
    run = _run(tmp_path, "best.pt", "final.pt")
    assert ck.resolve_model(run) == run / "finetune" / "best.pt"  # not evaluated yet: what evaluate.checkpoint auto takes
    _scored(run, "final.pt")  # evaluate.checkpoint: finetune
    assert ck.resolve_model(run) == run / "finetune" / "final.pt"
    assert ck.resolve_model(run / "finetune") == run / "finetune" / "final.pt"  # the stage folder too


def test_without_best_pt_it_is_final_pt_and_a_file_is_itself(tmp_path):
    run = _run(tmp_path, "final.pt")
    assert ck.resolve_model(run) == run / "finetune" / "final.pt"
    assert ck.resolve_model(run / "finetune" / "final.pt") == run / "finetune" / "final.pt"


def test_a_run_without_a_fine_tuned_checkpoint_says_what_to_do(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(ConfigError, match="run the finetune stage first"):
        ck.resolve_model(run)
    with pytest.raises(ConfigError, match="no checkpoint at"):
        ck.resolve_model(tmp_path / "nowhere")


def test_an_unreadable_evaluate_record_is_an_error_naming_it(tmp_path):
    run = _run(tmp_path, "best.pt", "final.pt")
    (run / "evaluate").mkdir()
    (run / "evaluate" / "done").write_text('{"stage": "evalu')  # torn
    with pytest.raises(ConfigError, match="evaluate/done cannot be read.*re-run the evaluate stage"):
        ck.resolve_model(run)
