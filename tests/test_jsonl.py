"""Append-only JSON Lines files: a torn last line (a kill mid-append) is dropped with a warning; damage elsewhere is an error."""
from __future__ import annotations

import json

import pytest

from medsass.errors import CorruptFileError, MedsassWarning
from medsass.jsonl import append_jsonl, read_jsonl

TORN = b'{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"step": 3, "loss": 0.'


def test_torn_last_line_is_dropped_with_a_warning_and_cut_off_on_repair(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(TORN)
    with pytest.warns(MedsassWarning, match=r"metrics\.jsonl.*torn last line.*line 3"):
        assert read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    assert path.read_bytes() == TORN  # reading alone changes nothing
    with pytest.warns(MedsassWarning):
        read_jsonl(path, repair=True)
    assert path.read_bytes() == TORN[: TORN.rindex(b"\n") + 1]


def test_append_after_a_torn_line_starts_on_a_clean_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_bytes(TORN)
    with pytest.warns(MedsassWarning, match="torn"):
        append_jsonl(path, {"step": 4})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 4]
    append_jsonl(tmp_path / "new.jsonl", {"a": 1})
    assert (tmp_path / "new.jsonl").read_text() == '{"a": 1}\n'


def test_whole_last_line_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}')
    assert read_jsonl(path, repair=True) == [{"step": 1}, {"step": 2}]
    append_jsonl(path, {"step": 3})
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_damage_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(CorruptFileError, match=r"metrics\.jsonl, line 2: not valid JSON.*delete the line"):
        read_jsonl(path, remedy="delete the line and re-run")
    path.write_bytes(b'{"step": 1}\n\xff\xfe\n{"step": 3}\n')
    with pytest.raises(CorruptFileError, match="line 2"):
        read_jsonl(path)
