"""build-masks' config from a command line: dataset file, --set overrides, inputs, label flags and flags, merged."""
from __future__ import annotations

import pytest
from medsass.pipeline.config import IncompleteCommand, command_line_config

from medsass.errors import ConfigError

NO_LABELS = {"dir": None, "pattern": None, "stem_regex": None, "pairs": None}


def dataset_file(tmp_path, text: str):
    folder = tmp_path / "manifests"
    folder.mkdir()
    path = folder / "ds.yaml"
    path.write_text(text)
    return path


def test_inputs_and_flags_on_their_own_relative_to_the_current_folder(tmp_path):
    cfg = command_line_config(inputs=["a", "/abs/b"], labels={**NO_LABELS, "dir": "masks", "pattern": "{stem}_m.png"},
                              flags={"out": "s.zarr", "geometry.size": 64, "split.seed": None}, cwd=tmp_path)
    assert [s.path for s in cfg.sources] == [str(tmp_path / "a"), "/abs/b"]
    assert all(s.labels.dir == str(tmp_path / "masks") and s.labels.pattern == "{stem}_m.png" for s in cfg.sources)
    assert cfg.sources[0].labels is not cfg.sources[1].labels
    assert (cfg.out, cfg.geometry.size, cfg.split.seed) == ("s.zarr", 64, 0)  # a flag not given (None) keeps the default


def test_flags_beat_set_overrides_which_beat_the_dataset_file(tmp_path):
    path = dataset_file(tmp_path, "sources: [{path: imgs, labels: {dir: masks}}]\ngeometry: {size: 128, resize: pad}\n"
                                  "threshold: {method: otsu}\n")
    cfg = command_line_config(dataset=path, overrides=["geometry.size=96", "threshold.method=li"],
                              flags={"threshold.method": "yen", "geometry.resize": None}, cwd=tmp_path)
    assert (cfg.geometry.size, cfg.geometry.resize, cfg.threshold.method) == (96, "pad", "yen")
    assert cfg.sources[0].path == str(path.parent / "imgs")  # the file's paths: relative to its folder
    assert cfg.sources[0].labels.dir == str(path.parent / "masks")
    assert (cfg.name, cfg.out) == ("ds", "ds.zarr")


def test_label_flags_apply_to_every_source_of_the_file_and_inputs_replace_its_sources(tmp_path):
    path = dataset_file(tmp_path, "sources: [{path: a, labels: {dir: m1}}, {path: b}]\n")
    cfg = command_line_config(dataset=path, labels={**NO_LABELS, "pattern": "{stem}_seg.*"}, cwd=tmp_path)
    assert [s.labels.pattern for s in cfg.sources] == ["{stem}_seg.*"] * 2
    assert [s.labels.dir for s in cfg.sources] == [str(path.parent / "m1"), None]
    cfg = command_line_config(inputs=["c"], dataset=path, cwd=tmp_path)
    assert [s.path for s in cfg.sources] == [str(tmp_path / "c")] and cfg.sources[0].labels.dir is None


def test_a_command_line_without_inputs_or_store_is_incomplete(tmp_path):
    with pytest.raises(IncompleteCommand, match="give INPUT files/folders or --dataset FILE"):
        command_line_config(flags={"out": "s.zarr"})
    with pytest.raises(IncompleteCommand, match="--out STORE.zarr is required"):
        command_line_config(inputs=["a"], flags={"out": None})
    assert command_line_config(inputs=["a"], overrides=["out=t.zarr"], cwd=tmp_path).out == "t.zarr"


def test_unknown_keys_and_bad_values_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="geometry.sise"):
        command_line_config(inputs=["a"], flags={"out": "s.zarr"}, overrides=["geometry.sise=64"])
    with pytest.raises(ConfigError, match="'otsuu' is not a method prep knows; choose one of otsu, "):
        command_line_config(inputs=["a"], flags={"out": "s.zarr", "threshold.method": "otsuu"})
    with pytest.raises(ConfigError, match="'geometry' is not a section"):
        command_line_config(inputs=["a"], flags={"out": "s.zarr", "geometry.size": 64}, overrides=["geometry=5"])
