"""Find input files and tell their format by content (magic bytes), never by extension."""
from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from medsass.errors import InputError, SkipInput

FORMATS = ("dicom", "png", "jpeg", "tiff", "gif", "bmp", "nifti")
# Extensions that promise a format we read. A file named so whose content is none of FORMATS (a corrupt or cut-off
# download, a text or HTML file renamed .jpg) is a failure to report; any other file we cannot read is skipped on
# purpose (notes.txt, README). A file whose content is another format we read (a PNG named .jpg) is read by content.
EXTENSION_FORMATS = {
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff", ".bmp": "bmp", ".gif": "gif",
    ".dcm": "dicom", ".dicom": "dicom", ".nii": "nifti", ".nii.gz": "nifti",
}
_FORMAT_NAMES = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "bmp": "BMP", "gif": "GIF", "dicom": "DICOM file",
                 "nifti": "NIfTI volume"}

SNIFF_BYTES = 1024
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}  # BITMAPCOREHEADER .. BITMAPV5HEADER
# VRs valid in an explicit-VR DICOM element header
_DICOM_VRS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD",
    b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
    b"UL", b"UN", b"UR", b"US", b"UT", b"UV",
}


def _looks_like_dicom_without_preamble(head: bytes) -> bool:
    """A little-endian (0002,xxxx) or (0008,xxxx) element header at offset 0, explicit or implicit VR."""
    if len(head) < 8:
        return False
    group, element = struct.unpack_from("<HH", head)
    if group not in (0x0002, 0x0008) or element > 0x2000:
        return False
    if head[4:6] in _DICOM_VRS:  # explicit VR: the rest of the header is a length
        return True
    # implicit VR: a 4-byte length; group-length and charset elements are short
    (length,) = struct.unpack_from("<I", head, 4)
    return length < 0x10000 or length == 0xFFFFFFFF


def _looks_like_nifti(head: bytes) -> bool:
    """A single-file NIfTI-1 (``sizeof_hdr`` 348, magic ``n+1``) or NIfTI-2 (540, ``n+2``) header, either byte order.
    Header/image pairs (``ni1``, ``.hdr`` + ``.img``) and Analyze are not read."""
    if len(head) >= 348 and head[344:348] == b"n+1\x00":
        return struct.unpack_from("<i", head)[0] == 348 or struct.unpack_from(">i", head)[0] == 348
    if len(head) >= 12 and head[4:12] == b"n+2\x00\r\n\x1a\n":
        return struct.unpack_from("<i", head)[0] == 540 or struct.unpack_from(">i", head)[0] == 540
    return False


def _gunzip_head(head: bytes, n: int = 544) -> bytes:
    """The first ``n`` decompressed bytes of a gzip stream that starts with ``head`` (b'' when it is not one)."""
    if not head.startswith(b"\x1f\x8b"):
        return b""
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, n)
    except zlib.error:
        return b""


def sniff_bytes(head: bytes) -> str | None:
    """Format of a file from its first bytes (at least 132 for DICOM with preamble, 348 for NIfTI), or None.
    A gzip stream is NIfTI when what it starts with is (``.nii.gz``); other gzip files are None."""
    if head[128:132] == b"DICM":  # checked first: DICOM/TIFF dual files start with 'II*\0'
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM" and len(head) >= 18 and struct.unpack_from("<I", head, 14)[0] in _BMP_DIB_SIZES:
        return "bmp"
    if _looks_like_nifti(head) or _looks_like_nifti(_gunzip_head(head)):
        return "nifti"
    if _looks_like_dicom_without_preamble(head):
        return "dicom"
    return None


def sniff(path: Path) -> str | None:
    """Format of ``path`` by content; reads at most 1 KiB. None for anything we do not read."""
    with open(path, "rb") as f:
        return sniff_bytes(f.read(SNIFF_BYTES))


def unreadable_content(path: str | Path, name: str) -> InputError:
    """Why a file whose content is none of FORMATS is left out: failed (InputError) when ``name``, the name it was
    found under, has an extension of EXTENSION_FORMATS; skipped (SkipInput) otherwise. Prep and predict both use it."""
    ext = ".nii.gz" if str(name).lower().endswith(".nii.gz") else Path(name).suffix
    fmt = EXTENSION_FORMATS.get(ext.lower())
    if fmt is None:
        return SkipInput(path, "not_an_image", "not a DICOM, PNG, JPEG, TIFF, GIF or BMP file (by content)")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        return InputError(path, "unreadable", f"cannot read the file ({exc.strerror or exc}); check that it exists and is readable")
    return InputError(
        path, "not_an_image",
        f"extension {ext} but the content is not a {_FORMAT_NAMES[fmt]} (first bytes {head.hex(' ')}): a corrupt or "
        "incomplete file, or another kind of file renamed; export or download it again, or remove it from the input",
    )


@dataclass(frozen=True)
class Candidate:
    path: Path  # absolute, resolved
    root: Path  # the input argument it was found under (a dir, or the file's parent for a file)
    rel: str  # posix path relative to root (for a file argument: its name)
    format: str | None  # from sniff; None = not an image we read (unreadable files too)
    size: int  # bytes


def _walk(top: str, follow_symlinks: bool) -> Iterator[tuple[str, str, bool]]:
    """Yield (relative posix path, path, is_linked) for every non-hidden file under ``top``.

    ``top`` must be resolved; ``is_linked`` says the path goes through a symlink (so it needs
    resolving). Iterative, one scandir per folder, no per-file stat.
    """
    stack = [("", top, False)]
    visited = {top}  # real folders seen, so symlinked folders cannot loop
    while stack:
        prefix, folder, linked = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # unreadable folder: nothing to list (permission, vanished)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            try:
                is_link = entry.is_symlink()
                if entry.is_dir(follow_symlinks=follow_symlinks):
                    real = os.path.realpath(entry.path) if linked or is_link else entry.path
                    if real not in visited:
                        visited.add(real)
                        stack.append((rel + "/", entry.path, linked or is_link))
                elif entry.is_file():  # follows links: symlinked files always count, broken links not
                    yield rel, entry.path, linked or is_link
            except OSError:
                continue


def _candidate(path: str, root: Path, rel: str) -> Candidate:
    """Stat and sniff one (resolved) file; a broken link or unreadable file gets format None."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            fmt = sniff_bytes(f.read(SNIFF_BYTES))
    except OSError:
        size, fmt = 0, None
    return Candidate(path=Path(path), root=root, rel=rel, format=fmt, size=size)


def check_inputs_exist(inputs: Sequence[str | Path]) -> None:
    """InputError ('not_found') naming the first input path that does not exist."""
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise InputError(p, "not_found", f"input path does not exist: {p}; check the spelling")


def discover(inputs: Sequence[str | Path], *, follow_symlinks: bool = False) -> list[Candidate]:
    """Files under ``inputs`` (files or folders, recursive), sorted by (root, rel), de-duplicated.

    Hidden files and folders (dot-names) below an input are ignored; an input named explicitly is
    always used. ``follow_symlinks`` controls descending into symlinked *folders* (off by default to
    avoid cycles and escaping the tree); symlinked files are always included. Duplicates (same
    resolved path) keep the first occurrence in sorted order. A missing input raises InputError
    ('not_found').
    """
    check_inputs_exist(inputs)
    found: list[tuple[str, str, str, bool, Path]] = []  # (root key, rel, path, is_linked, root)
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            root = p.resolve()
            found.extend((str(root), rel, path, linked, root) for rel, path, linked in _walk(str(root), follow_symlinks))
        else:
            root = p.absolute().parent.resolve()
            found.append((str(root), p.name, str(root / p.name), True, root))
    found.sort(key=lambda t: (t[0], t[1]))
    seen: set[str] = set()
    out: list[Candidate] = []
    for _, rel, path, linked, root in found:
        if linked:
            path = os.path.realpath(path)
        if path in seen:
            continue
        seen.add(path)
        out.append(_candidate(path, root, rel))
    return out
