"""Readers: every real file in ../shared/data decodes as documented (DICOM and the other formats)."""
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from medsass.pipeline.discover import sniff
from medsass.pipeline.readers import Probe, probe, read
from readers_helpers import assert_phi_free

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA}")


# --- real files ------------------------------------------------------------------------------------
DICOM_TABLE = {  # from ../shared/data/dicom/SOURCE.md: modality, photometric, (rows, cols), frames
    "RG3_J2KR.dcm": ("CR", "MONOCHROME1", (1760, 1760), 1),
    "RG1_J2KI.dcm": ("CR", "MONOCHROME1", (1955, 1841), 1),
    "693_J2KR.dcm": ("CT", "MONOCHROME2", (512, 512), 1),
    "693_UNCR.dcm": ("CT", "MONOCHROME2", (512, 512), 1),
    "MR2_J2KR.dcm": ("MR", "MONOCHROME2", (1024, 1024), 1),
    "JPEG-LL.dcm": ("NM", "MONOCHROME2", (1024, 256), 1),
    "JPEG-lossy.dcm": ("NM", "MONOCHROME2", (1024, 256), 1),
    "JPGLosslessP14SV1_1s_1f_8b.dcm": ("US", "MONOCHROME2", (768, 1024), 1),
    "JLSL_16_15_1_1F.dcm": (None, "MONOCHROME2", (128, 128), 1),
    "MR_small_jpeg_ls_lossless.dcm": ("MR", "MONOCHROME2", (64, 64), 1),
    "MR_small_RLE.dcm": ("MR", "MONOCHROME2", (64, 64), 1),
    "CT_small.dcm": ("CT", "MONOCHROME2", (128, 128), 1),
    "emri_small_jpeg_2k_lossless.dcm": ("MR", "MONOCHROME2", (64, 64), 10),
}


@pytest.fixture(scope="module")
def real_dicom():
    """name -> (probe, frames), each file decoded once."""
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA}")
    folder = DATA / "dicom"
    assert sorted(p.name for p in folder.glob("*.dcm")) == sorted(DICOM_TABLE)
    return {name: (probe(folder / name, "dicom", salt="s"), read(folder / name, "dicom")) for name in DICOM_TABLE}


@needs_data
@pytest.mark.parametrize("name", sorted(DICOM_TABLE))
def test_real_dicom_decodes_as_documented(real_dicom, name):
    modality, photometric, shape, n = DICOM_TABLE[name]
    pr, frames = real_dicom[name]
    assert isinstance(pr, Probe) and pr.format == "dicom"
    assert (pr.meta["modality"], pr.meta["photometric"], pr.shape, pr.n_frames) == (modality, photometric, shape, n)
    assert [f.index for f in frames] == list(range(n))
    for f in frames:
        assert f.pixels.shape == shape and f.pixels.ndim == 2
        assert np.isfinite(f.pixels).all() and f.pixels.max() > f.pixels.min()
        assert f.meta["inverted"] is (photometric == "MONOCHROME1")
    ds = pydicom.dcmread(DATA / "dicom" / name)
    secrets = [str(ds.get(k)) for k in ("PatientID", "PatientName") if len(str(ds.get(k) or "")) >= 3]
    for text in (repr(pr), *(json.dumps(f.meta) for f in frames)):
        for secret in secrets:
            assert secret not in text
    assert_phi_free(pr.meta, secrets)
    for f in frames:
        assert_phi_free(f.meta, secrets)


@needs_data
def test_real_monochrome1_is_inverted(real_dicom):
    for name in ("RG3_J2KR.dcm", "RG1_J2KI.dcm"):
        raw = pydicom.dcmread(DATA / "dicom" / name).pixel_array.astype(np.float64)
        out = real_dicom[name][1][0].pixels.astype(np.float64)
        sub = (slice(None, None, 7), slice(None, None, 7))
        assert np.corrcoef(raw[sub].ravel(), out[sub].ravel())[0, 1] < -0.9


@needs_data
def test_real_lossless_pairs_agree(real_dicom):
    j2k, unc = real_dicom["693_J2KR.dcm"][1][0].pixels, real_dicom["693_UNCR.dcm"][1][0].pixels
    np.testing.assert_array_equal(j2k, unc)
    np.testing.assert_array_equal(real_dicom["MR_small_RLE.dcm"][1][0].pixels,
                                  real_dicom["MR_small_jpeg_ls_lossless.dcm"][1][0].pixels)
    lossless = real_dicom["JPEG-LL.dcm"][1][0].pixels.astype(float)
    lossy = real_dicom["JPEG-lossy.dcm"][1][0].pixels.astype(float)  # 12-bit JPEG via imagecodecs
    assert np.corrcoef(lossless.ravel(), lossy.ravel())[0, 1] > 0.95
    emri = read(DATA / "dicom" / "emri_small_jpeg_2k_lossless.dcm", "dicom", frames=[7])
    np.testing.assert_array_equal(emri[0].pixels, real_dicom["emri_small_jpeg_2k_lossless.dcm"][1][7].pixels)


REAL_IMAGES = [  # (relative path, format, (H, W), dtype, frames)
    ("tiff/stardist_img3d_synthetic.tif", "tiff", (61, 57), np.uint16, 31),
    ("tiff/stardist_mask3d_synthetic.tif", "tiff", (61, 57), np.uint16, 31),
    ("tiff/skimage_multipage.tif", "tiff", (15, 10), np.uint8, 2),
    ("tiff/skimage_multipage_rgb.tif", "tiff", (10, 10), np.float32, 2),
    ("nuclei_sample/N2DL-HeLa/images/t13.tif", "tiff", (700, 1100), np.uint16, 1),
    ("nuclei_sample/N2DL-HeLa/masks/man_seg13.tif", "tiff", (700, 1100), np.uint16, 1),
    ("nuclei_sample/N2DH-GOWT1/images/t01.tif", "tiff", (1024, 1024), np.uint8, 1),
    ("nuclei_sample/N2DH-GOWT1/masks/man_seg01.tif", "tiff", (1024, 1024), np.uint16, 1),
    ("nuclei_sample/NIH3T3/images/dna-0.png", "png", (1024, 1344), np.uint8, 1),
    ("nuclei_sample/NIH3T3/masks/0.png", "png", (1024, 1344), np.uint8, 1),
    ("retina_vessels/DRIVE/images/21_training.tif", "tiff", (584, 565), np.float32, 1),
    ("retina_vessels/DRIVE/masks/21_manual1.gif", "gif", (584, 565), np.uint8, 1),
    ("retina_vessels/CHASE_DB1/images/Image_01L.jpg", "jpeg", (960, 999), np.float32, 1),
    ("retina_vessels/CHASE_DB1/masks/Image_01L_1stHO.png", "png", (960, 999), np.uint8, 1),
    ("ph2_dermoscopy/images/IMD002.png", "png", (286, 382), np.float32, 1),
    ("ph2_dermoscopy/masks/IMD002_lesion.png", "png", (286, 382), np.uint8, 1),
    ("isic_sample/images/ISIC_0024311.jpg", "jpeg", (450, 600), np.float32, 1),
    ("isic_sample/masks/ISIC_0024311.png", "png", (450, 600), np.uint8, 1),
    ("cxr_lungs/images/pneumocystis-pneumonia-2-PA.png", "png", (954, 955), np.float32, 1),  # RGBA
    ("cxr_lungs/masks/pneumocystis-pneumonia-2-PA.png", "png", (954, 955), np.uint8, 1),
    ("cxr_lungs/images/kjr-21-e25-g001-l-a.jpg", "jpeg", (437, 424), np.uint8, 1),  # L JPEG
    ("cxr_lungs/images/kjr-21-e24-g002-l-a.jpg", "jpeg", (294, 298), np.float32, 1),  # RGB JPEG
    ("cxr_lungs/masks/kjr-21-e24-g002-l-a.png", "png", (294, 298), np.uint8, 1),
]
MASK_VALUES = {"png": {0, 255}, "gif": {0, 255}}


@needs_data
@pytest.mark.parametrize(("rel", "fmt", "shape", "dtype", "n"), REAL_IMAGES)
def test_real_images_decode_as_documented(rel, fmt, shape, dtype, n):
    path = DATA / rel
    assert sniff(path) == fmt
    pr = probe(path, fmt)
    assert (pr.format, pr.shape, pr.n_frames, pr.group) == (fmt, shape, n, None)
    frames = read(path, fmt)
    assert len(frames) == n
    for f in frames:
        assert f.pixels.shape == shape and f.pixels.dtype == dtype
        assert {"orig_dtype", "channels", "photometric"} <= set(f.meta)
        assert_phi_free(f.meta)
    if "/masks/" in rel and fmt in MASK_VALUES:
        assert set(np.unique(frames[0].pixels).tolist()) == MASK_VALUES[fmt]
    if "man_seg" in rel:  # instance labels 0..N
        assert frames[0].pixels.min() == 0 and frames[0].pixels.max() > 5
    if "HeLa/images" in rel:
        assert 30000 < frames[0].pixels.min() and frames[0].pixels.max() < 40000
    if fmt == "tiff" and "retina" not in rel and "rgb" not in rel:  # gray TIFF is bit-exact
        np.testing.assert_array_equal(np.stack([f.pixels for f in frames]).squeeze(), tifffile.imread(path))


@needs_data
def test_real_image_mask_shapes_agree():
    for folder in ("ph2_dermoscopy", "isic_sample", "cxr_lungs"):
        images = sorted((DATA / folder / "images").iterdir())[:3]
        masks = sorted((DATA / folder / "masks").iterdir())[:3]
        for image, mask in zip(images, masks):
            assert probe(image, sniff(image)).shape == probe(mask, sniff(mask)).shape
