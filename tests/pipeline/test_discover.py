"""Discovery and content sniffing."""
import io
import os
import zipfile
from pathlib import Path

import medsass.pipeline.discover as disc
import numpy as np
import pytest
import tifffile
from medsass.pipeline.discover import FORMATS, Candidate, discover, sniff
from PIL import Image
from pydicom.data import get_testdata_file

from medsass.errors import InputError


def _pil_bytes(fmt: str, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 6), 7).save(buf, fmt)
    return buf.getvalue()


def _tiff_bytes(**kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((4, 4), np.uint16), **kw)
    return buf.getvalue()


def _dicom_bytes() -> bytes:
    return Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (_pil_bytes("PNG"), "png"),
        (_pil_bytes("JPEG"), "jpeg"),
        (_pil_bytes("GIF"), "gif"),
        (_pil_bytes("BMP"), "bmp"),
        (_pil_bytes("BMP", "RGB"), "bmp"),
        (_tiff_bytes(), "tiff"),
        (_tiff_bytes(bigtiff=True), "tiff"),
        (_tiff_bytes(byteorder=">"), "tiff"),
        (_dicom_bytes(), "dicom"),
        (_dicom_bytes()[132:], "dicom"),  # no preamble: starts with (0002,0000) UL
        (b"", None),
        (b"hello world, plain text\n" * 10, None),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", None),
        (b"BM this is a text file that starts with BM", None),
        (b"\x00" * 200, None),
    ],
)
def test_sniff_by_content(tmp_path, data, fmt):
    path = tmp_path / "file.dcm"  # extension never matters
    path.write_bytes(data)
    assert sniff(path) == fmt
    assert fmt is None or fmt in FORMATS


def test_sniff_zip_and_dicom_tiff_dual(tmp_path):
    z = tmp_path / "a.png"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("x.txt", "x")
    assert sniff(z) is None
    # pydicom's MR_small_implicit.dcm has a TIFF header in its preamble and DICM at 128
    dual = Path(get_testdata_file("MR_small_implicit.dcm", download=False))
    assert dual.read_bytes()[:4] == b"II*\x00"
    assert sniff(dual) == "dicom"


def test_sniff_dicom_without_preamble_or_meta():
    # rtstruct.dcm: no preamble, no file meta, implicit VR, starts at (0008,0005)
    assert sniff(Path(get_testdata_file("rtstruct.dcm", download=False))) == "dicom"
    # explicit VR, no meta: starts with (0008,0005) CS
    assert sniff(Path(get_testdata_file("ExplVR_LitEndNoMeta.dcm", download=False))) == "dicom"


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    (root / "b" / "c").mkdir(parents=True)
    (root / ".hidden_dir").mkdir()
    (root / "a.png").write_bytes(_pil_bytes("PNG"))
    (root / "b" / "scan").write_bytes(_dicom_bytes())  # no extension
    (root / "b" / "c" / "x.tif").write_bytes(_tiff_bytes())
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "b" / "empty.png").write_bytes(b"")
    (root / ".hidden.png").write_bytes(_pil_bytes("PNG"))
    (root / ".hidden_dir" / "y.png").write_bytes(_pil_bytes("PNG"))
    return root


def test_discover_tree(tmp_path):
    root = _tree(tmp_path)
    found = discover([root])
    assert [c.rel for c in found] == ["a.png", "b/c/x.tif", "b/empty.png", "b/notes.txt", "b/scan"]
    by_rel = {c.rel: c for c in found}
    assert by_rel["a.png"].format == "png"
    assert by_rel["b/scan"].format == "dicom"
    assert by_rel["b/c/x.tif"].format == "tiff"
    assert by_rel["b/notes.txt"].format is None
    assert by_rel["b/empty.png"].format is None and by_rel["b/empty.png"].size == 0
    for c in found:
        assert isinstance(c, Candidate)
        assert c.root == root.resolve() and c.path.is_absolute()
        assert c.path == (root / c.rel).resolve()
        assert c.size == c.path.stat().st_size


def test_discover_file_args_dedup_and_sort(tmp_path):
    root = _tree(tmp_path)
    found = discover([root / "b" / "scan", root, str(root / "a.png")])
    paths = [c.path for c in found]
    assert len(paths) == len(set(paths)) == 5
    # sorted by (root, rel): the file argument's root is its parent folder
    assert [(str(c.root), c.rel) for c in found] == sorted((str(c.root), c.rel) for c in found)
    # the first occurrence in sorted order wins: found under the folder argument, not the file one
    scan = next(c for c in found if c.path.name == "scan")
    assert scan.root == root.resolve() and scan.rel == "b/scan"
    [alone] = discover([root / "b" / "scan"])
    assert alone.root == (root / "b").resolve() and alone.rel == "scan"
    # an explicitly named hidden file is used
    assert [c.rel for c in discover([root / ".hidden.png"])] == [".hidden.png"]


def test_discover_missing_input(tmp_path):
    with pytest.raises(InputError) as err:
        discover([tmp_path / "nope"])
    assert err.value.code == "not_found"


def test_discover_symlinks(tmp_path):
    root = _tree(tmp_path)
    (root / "b" / "link.png").symlink_to(root / "a.png")  # duplicate of a.png
    (root / "loop").symlink_to(root, target_is_directory=True)  # a cycle
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.png").write_bytes(_pil_bytes("PNG"))
    (root / "ext").symlink_to(outside, target_is_directory=True)
    plain = discover([root])
    assert [c.rel for c in plain] == ["a.png", "b/c/x.tif", "b/empty.png", "b/notes.txt", "b/scan"]
    followed = discover([root], follow_symlinks=True)  # terminates despite the loop
    assert "ext/o.png" in [c.rel for c in followed]
    assert len({c.path for c in followed}) == len(followed) == 6


def test_discover_reads_at_most_1kib(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    big.write_bytes(_pil_bytes("PNG") + b"\0" * 5_000_000)
    reads = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

        def fileno(self):
            return self.f.fileno()

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(disc, "open", lambda p, m="r": Spy(real_open(p, m)), raising=False)
    [cand] = discover([tmp_path])
    assert cand.format == "png" and cand.size == big.stat().st_size
    assert reads and all(0 <= n <= 1024 for n in reads)


def test_discover_many_files_is_fast(tmp_path):
    root = tmp_path / "many"
    for d in range(20):
        (root / f"d{d:02d}").mkdir(parents=True)
        for i in range(100):
            (root / f"d{d:02d}" / f"{i:03d}.txt").write_bytes(b"x")
    import time

    t = time.perf_counter()
    found = discover([root])
    assert len(found) == 2000
    assert time.perf_counter() - t < 5
    assert os.path.basename(found[0].rel) == "000.txt"


@pytest.mark.parametrize(("name", "content", "kind"), [
    ("noise.tif", bytes.fromhex("3f8a1c00d2") + b"\x00" * 200, "TIFF"),
    ("img.jpg", b"this is not a photo\n", "JPEG"),
    ("scan.DCM", b"<html>login required</html>", "DICOM file"),
    ("x.png", b"GIF8", "PNG"),
])
def test_image_extension_with_other_content_is_a_failure_naming_the_first_bytes(tmp_path, name, content, kind):
    (tmp_path / name).write_bytes(content)
    err = disc.unreadable_content(tmp_path / name, name)
    assert type(err) is InputError and err.code == "not_an_image"
    ext = os.path.splitext(name)[1]
    assert err.reason.startswith(f"extension {ext} but the content is not a {kind} (first bytes {content[:8].hex(' ')})")


@pytest.mark.parametrize("name", ["notes.txt", "README", "archive.zip", "data.csv"])
def test_other_unreadable_files_are_still_skipped(tmp_path, name):
    from medsass.errors import SkipInput

    (tmp_path / name).write_bytes(os.urandom(64))
    err = disc.unreadable_content(tmp_path / name, name)
    assert isinstance(err, SkipInput) and err.code == "not_an_image"


def test_the_extension_is_the_name_the_file_was_found_under(tmp_path):
    """A symlink named img.png to a hash-named blob (git-annex, DVC, HF caches): the link's name counts."""
    (tmp_path / "blob-3f8a").write_bytes(b"not an image")
    (tmp_path / "img.png").symlink_to(tmp_path / "blob-3f8a")
    (c,) = discover([tmp_path / "img.png"])
    assert c.format is None and type(disc.unreadable_content(c.path, c.rel)) is InputError
