from dataclasses import dataclass, field
from typing import Literal

import pytest

from medsass import configio
from medsass.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    steps: int = 10
    path: str | None = None
    weights: dict[str, float] = field(default_factory=dict)


def test_load_with_overrides_and_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ninner:\n  lr: 0.5\n")
    cfg = configio.load(Outer, p, ["inner.mode=b", "steps=3", "inner.tags=[u, v]", "weights.s1=2"])
    assert cfg == Outer(name="x", inner=Inner(lr=0.5, mode="b", tags=["u", "v"]), steps=3, weights={"s1": 2.0})
    assert configio.to_dict(cfg)["inner"]["tags"] == ["u", "v"]


def test_int_promotes_to_float_but_not_bool():
    assert configio.load(Outer, {"name": "x", "inner": {"lr": 1}}).inner.lr == 1.0
    with pytest.raises(ConfigError, match="inner.lr"):
        configio.load(Outer, {"name": "x", "inner": {"lr": True}})


@pytest.mark.parametrize(
    "data, overrides, match",
    [
        ({"name": "x", "inner": {"lrr": 1}}, [], r"unknown key\(s\) inner.lrr.*valid keys under inner: lr, mode, tags"),
        ({}, [], "missing required key name"),
        ({"name": "x"}, ["inner.mode=c"], r"inner.mode: 'c' is not one of 'a', 'b'"),
        ({"name": "x"}, ["steps=ten"], "steps: expected an integer"),
        ({"name": "x"}, ["bogus.key=1"], "unknown key"),
        ({"name": "x"}, ["steps"], "key.path=value"),
    ],
)
def test_errors_name_the_key(data, overrides, match):
    with pytest.raises(ConfigError, match=match):
        configio.load(Outer, data, overrides)


def test_optional_and_null():
    assert configio.load(Outer, {"name": "x"}, ["path=null"]).path is None
    assert configio.load(Outer, {"name": "x"}, ["path=/a/b"]).path == "/a/b"


@pytest.mark.parametrize("content", [b"name: caf\xe9\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"], ids=["latin1", "binary"])
def test_non_utf8_config_file_is_a_one_line_config_error_naming_it(tmp_path, content):
    """A binary or non-UTF-8 file given as a config: ConfigError (exit 2 in both CLIs), not a UnicodeDecodeError."""
    from click.testing import CliRunner
    from medsass.pipeline.cli import main as prep
    from medsass.trainer.cli import main as train

    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"config\.yaml is not UTF-8 text"):
        configio.read_yaml(path)
    for cli, args in ((prep, ["build-masks", "--dataset", str(path)]), (train, ["run", str(path)])):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and "UTF-8" in lines[0], result.output


def test_diff_names_each_changed_leaf_by_its_dotted_key_with_both_values():
    old = {"a": 1, "b": {"c": 2, "d": [1, 2]}, "gone": "x", "e": {"f": 1}}
    new = {"a": 1, "b": {"c": 3, "d": [1, 2]}, "added": None, "new": True, "e": 5}
    assert configio.diff(old, new) == {"b.c": (2, 3), "e": ({"f": 1}, 5), "gone": ("x", None), "new": (None, True)}
    assert configio.diff(old, old) == {}
    assert configio.diff(None, {"a": 1}) == {"<root>": (None, {"a": 1})}  # e.g. a marker written without a section


def test_set_values_sets_typed_values_at_dotted_keys_on_a_copy():
    data = {"a": {"b": 1}, "c": None}
    out = configio.set_values(data, {"a.b": "yes", "c.d": 2, "e": [1]})
    assert out == {"a": {"b": "yes"}, "c": {"d": 2}, "e": [1]} and data == {"a": {"b": 1}, "c": None}
    with pytest.raises(ConfigError, match="'b' is not a section"):
        configio.set_values(data, {"a.b.x": 1})
