"""Generated DICOMs with the geometry and encodings of a hospital archive, for benchmarks/prep_dicom.py.

    make_dicoms(folder, kind="dx", n=8, shape=(2048, 2048), syntax="rle")

* ``dx`` / ``cr``: a radiograph-like 12-16 bit image (body, two darker lungs, a brighter spine, bright collimator
  blades at the border, a smooth gradient and noise), DX or CR SOP class, MONOCHROME2 or MONOCHROME1 (stored
  inverted), with a window (LINEAR) or a VOI LUT sequence (a 12-bit sigmoid-like curve); ``mixed`` alternates;
* ``ct``: 512x512 int16, RescaleIntercept -1024, a soft-tissue window.

Encodings: ``raw`` (explicit VR little endian), ``rle``, ``j2k`` (JPEG 2000 lossless, pylibjpeg-openjpeg),
``jls`` (JPEG-LS lossless, pyjpegls); :func:`encodable` says which the installed encoders can write. No
patient data: the names and IDs are placeholders.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import uid as U
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence

SYNTAXES = {"raw": U.ExplicitVRLittleEndian, "rle": U.RLELossless, "j2k": U.JPEG2000Lossless, "jls": U.JPEGLSLossless}
SOP_CLASSES = {
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "CT": U.CTImageStorage,
}


def encodable() -> list[str]:
    """The encodings this environment can write."""
    out = ["raw"]
    for name in ("rle", "j2k", "jls"):
        try:
            if get_encoder(SYNTAXES[name]).is_available:
                out.append(name)
        except (NotImplementedError, ValueError):
            pass
    return out


def radiograph(rng: np.random.Generator, shape: tuple[int, int], bits: int) -> np.ndarray:
    """A chest-radiograph-like uint16 image in [0, 2**bits - 1] (MONOCHROME2 sense: bright = dense)."""
    h, w = shape
    y, x = np.ogrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j]
    y, x = y.astype(np.float32), x.astype(np.float32)
    top = 2**bits - 1
    jitter = rng.uniform(-0.05, 0.05, 6).astype(np.float32)
    img = np.full(shape, 0.08, np.float32)  # direct exposure around the body: dark
    body = (x / (0.85 + jitter[0])) ** 2 + (y / (1.1 + jitter[1])) ** 2 < 1
    img[body] = 0.55
    for side in (-1, 1):  # lungs
        lung = ((x - side * (0.38 + jitter[2])) / 0.27) ** 2 + ((y + 0.1 + jitter[3]) / 0.6) ** 2 < 1
        img[lung] = 0.3
    img[(np.abs(x - jitter[4]) < 0.07) & body] = 0.8  # spine
    img += (0.04 * y + 0.02 * x).astype(np.float32)  # heel effect
    img += rng.normal(0, 0.015, shape).astype(np.float32)  # quantum noise
    margin = int(0.04 * min(h, w))  # collimator blades: unexposed, so bright in MONOCHROME2
    img[:margin] = img[-margin:] = 0.97
    img[:, :margin] = img[:, -margin:] = 0.97
    return np.clip(img * top, 0, top).astype(np.uint16)


def ct_slice(rng: np.random.Generator, shape: tuple[int, int] = (512, 512)) -> np.ndarray:
    """A CT-like int16 slice, stored values (HU + 1024): air outside, soft tissue, lungs, bone ring."""
    h, w = shape
    y, x = np.ogrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j]
    hu = np.full(shape, -1000.0, np.float32)
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    hu[body] = 40
    for side in (-1, 1):
        hu[((x - side * 0.35) / 0.25) ** 2 + (y / 0.4) ** 2 < 1] = -800
    ring = (x / 0.8) ** 2 + (y / 0.6) ** 2
    hu[(ring > 0.85) & (ring < 0.92)] = 700
    hu += rng.normal(0, 15, shape).astype(np.float32)
    return np.clip(hu + 1024, 0, 4095).astype(np.int16)


def dataset(pixels: np.ndarray, *, modality: str, photometric: str, bits_stored: int, voi: str, syntax: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.SOPInstanceUID = U.generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = modality, "BENCH-0000", "Bench^Synthetic"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    top = 2**bits_stored - 1
    if modality == "CT":
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
    elif voi == "window":
        ds.WindowCenter, ds.WindowWidth = round(0.5 * top), round(0.8 * top)
    elif voi == "lut":
        item = Dataset()
        n = 2**bits_stored
        curve = 4095 / (1 + np.exp(-8 * (np.arange(n) / n - 0.5)))
        item.LUTDescriptor = [n if n < 65536 else 0, 0, 12]
        item.add_new(0x00283006, "OW", curve.astype("<u2").tobytes())  # LUT Data
        ds.VOILUTSequence = Sequence([item])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = U.ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.PixelData = pixels.tobytes()
    if syntax != "raw":
        ds.compress(SYNTAXES[syntax])
    return ds


def make_dicoms(folder: Path, *, kind: str = "dx", n: int = 8, shape: tuple[int, int] = (2048, 2048),
                syntax: str = "raw", bits: int = 12, voi: str = "window", seed: int = 0,
                photometric: str = "MONOCHROME2") -> list[Path]:
    """``n`` distinct files in ``folder``. ``photometric="mixed"`` alternates MONOCHROME2 and MONOCHROME1,
    ``voi="mixed"`` a window (files 0, 1, 4, 5, ...) and a VOI LUT (2, 3, 6, 7, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        pm = ("MONOCHROME2", "MONOCHROME1")[i % 2] if photometric == "mixed" else photometric
        lut = ("window", "lut")[(i // 2) % 2] if voi == "mixed" else voi
        if kind == "ct":
            px = ct_slice(rng, shape)
            ds = dataset(px, modality="CT", photometric="MONOCHROME2", bits_stored=12, voi="window", syntax=syntax)
        else:
            px = radiograph(rng, shape, bits)
            if pm == "MONOCHROME1":
                px = (2**bits - 1 - px).astype(np.uint16)
            ds = dataset(px, modality=kind.upper(), photometric=pm, bits_stored=bits, voi=lut, syntax=syntax)
        path = folder / f"{kind}{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
