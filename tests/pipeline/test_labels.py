import pytest
from medsass.pipeline.config import LabelSource
from medsass.pipeline.labels import LabelIndex

from medsass.errors import ConfigError


def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_template_regex_and_default(tmp_path):
    lab = tmp_path / "masks"
    _touch(lab / "IMD002_lesion.png")
    _touch(lab / "man_seg01.tif")
    _touch(lab / "a" / "x.png")
    _touch(lab / "b" / "x.png")
    ix = LabelIndex(LabelSource(dir=str(lab), pattern="{stem}_lesion.png"))
    assert ix.pair("/i/IMD002.png", "IMD002.png").status == "ok"
    miss = ix.pair("/i/IMD003.png", "IMD003.png")
    assert miss.status == "missing" and "IMD003_lesion.png" in miss.reason
    ix = LabelIndex(LabelSource(dir=str(lab), pattern="man_seg{id}.tif", stem_regex=r"t(?P<id>\d+)"))
    assert ix.pair("/i/t01.tif", "t01.tif").path.endswith("man_seg01.tif")
    ix = LabelIndex(LabelSource(dir=str(lab)))  # default: same stem, any extension, beside rel dir first
    assert ix.pair("/i/a/x.jpg", "a/x.jpg").path.endswith("a/x.png")
    amb = ix.pair("/i/x.jpg", "x.jpg")
    assert amb.status == "ambiguous"


def test_pairs_csv_and_errors(tmp_path):
    _touch(tmp_path / "img" / "a.png")
    _touch(tmp_path / "m" / "a_mask.png")
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,mask\nimg/a.png,m/a_mask.png\n")
    ix = LabelIndex(LabelSource(pairs=str(csv)))
    assert ix.pair(str(tmp_path / "img" / "a.png"), "a.png").path == str(tmp_path / "m" / "a_mask.png")
    assert ix.pair(str(tmp_path / "img" / "b.png"), "b.png").status == "missing"
    with pytest.raises(ConfigError, match="does not exist"):
        LabelIndex(LabelSource(dir=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="not one of"):
        LabelIndex(LabelSource(dir=str(tmp_path / "m"), pattern="{nope}.png")).pair("/x/a.png", "a.png")
