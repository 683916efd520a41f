"""``medsass-train export``: a trained checkpoint as a standalone network plus the preprocessing predict applies.

::

    OUT/model.onnx               --format onnx (ONNX opset 18, torch.onnx.export's torch.export-based exporter)
    OUT/model.torchscript.pt     --format torchscript (torch.jit.trace; load with torch.jit.load, or libtorch)
    OUT/preprocessing.json       what turns an image into the network's input and its output into a mask

The network takes ``image``: float32 (N, 1, S, S) = the uint8 S x S canvas / 255, N free (dynamic batch axis), and
returns ``logits`` (N, 1, S, S); probability = sigmoid(logits), mask = probability >= threshold. How the canvas is made
from an image and how the probabilities go back to the image's pixels is ``preprocessing`` in the JSON: predict's own
:class:`~medsass.trainer.predict.PrepParams`, read from the checkpoint by ``prep_from_checkpoint`` (``steps`` says it in
words). For NIfTI volumes, ``volume`` gives the slice axis and the window with its numbers, and the first two steps
say how a volume is cut into slices and windowed. :func:`apply_exported` is the reference: an export folder and an
image in, masks out, with onnxruntime (or torch.jit) in place of medsass's model; its masks equal predict's
(``tests/trainer/test_export.py``).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from medsass.pipeline import geometry
from medsass.pipeline.discover import sniff
from medsass.pipeline.readers import read
from medsass.pipeline.readers.nifti import SLICE_AXES
from medsass.pipeline.window import PERCENTILE, VOLUME_PERCENTILES, parse_window
from medsass.trainer import checkpoint as ck
from medsass.trainer.predict import PrepParams, frame_canvases, load_model, prep_from_checkpoint

import medsass
from medsass.errors import ConfigError, InputError
from medsass.manifest import file_digest, read_json, write_json

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
OPSET = 18  # onnxruntime >= 1.14 runs it; the torch.export-based exporter's own default in torch 2.x
JSON_NAME = "preprocessing.json"
INPUT, OUTPUT = "image", "logits"
JIT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"
VIEWS = {"axial": "rows anterior -> posterior, columns the patient's right -> left",  # a displayed slice (nifti.py)
         "coronal": "rows superior -> inferior, columns the patient's right -> left",
         "sagittal": "rows superior -> inferior, columns anterior -> posterior"}
CHECK_TOLERANCE = 1e-3  # max |logit difference| / max(1, max |logit|), export vs checkpoint, on the check batch
STEPS = [  # of every input; a volume's own steps (volume_steps) come first
    "read the image as 2-D grayscale frames (colour: its luma; a multi-frame file: one mask per frame; a NIfTI volume: "
    "one frame per slice, as below)",
    "intensity: uint8 frames stay as they are; other types map linearly from the 0.5th..99.5th percentile "
    "('percentile') or min..max ('minmax') of the frame to 0..255, clipped, rounded (medsass.pipeline.intensity)",
    "mode stretch: resize the frame to size x size (PIL bilinear, reducing_gap=1); pad: resize its longer side to size "
    "keeping the aspect ratio, centred on a zero size x size canvas; tile: cut size x size tiles at native resolution "
    "(step size - tile_overlap, the last tile shifted inwards; frames smaller than a tile zero-padded bottom/right)",
    "network input: canvas / 255 as float32, shape (N, 1, size, size); output: logits of the same shape",
    "probability = sigmoid(logits); map the canvas region back to the frame's pixels (PIL bilinear on float32); "
    "average overlapping tiles",
    "mask = probability >= threshold",
]


def export(checkpoint: str | Path, out: str | Path, *, fmt: str = "onnx", threshold: float = 0.5,
           store: str | None = None) -> dict[str, Any]:
    """Export ``checkpoint`` (a .pt, or a run folder: the fine-tuned checkpoint its evaluate scored, see
    :func:`checkpoint.resolve_model`) into ``out``; returns the JSON written."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {threshold}")
    path = ck.resolve_model(checkpoint)
    state = ck.load(path)
    prep = prep_from_checkpoint(state, where=f"checkpoint {path}", store=store)
    model = load_model(state, torch.device("cpu"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / FORMATS[fmt]
    check = torch.from_numpy(np.random.default_rng(0).random((2, 1, prep.size, prep.size), dtype=np.float32))
    if fmt == "onnx":
        _to_onnx(model, check, target)
    else:
        _to_torchscript(model, check, target)
    with torch.no_grad():
        expected = model(check).numpy()
    diff = float(np.abs(_runner.__wrapped__(str(target), fmt)(check.numpy()) - expected).max())  # a fresh load
    scale = max(1.0, float(np.abs(expected).max()))
    if not diff <= CHECK_TOLERANCE * scale:
        raise ConfigError(f"the exported {fmt} model differs from checkpoint {path} by {diff:.2e} in the logits "
                          f"(more than {CHECK_TOLERANCE} x {scale:.1f}, the largest logit); try the other --format")
    meta = {
        "format": fmt, "file": target.name, "opset": OPSET if fmt == "onnx" else None,
        "input": {"name": INPUT, "shape": ["batch", 1, prep.size, prep.size], "dtype": "float32", "value": "canvas / 255"},
        "output": {"name": OUTPUT, "shape": ["batch", 1, prep.size, prep.size], "dtype": "float32",
                   "value": "logits: probability = sigmoid(logits)"},
        "preprocessing": dataclasses.asdict(prep), "volume": volume_description(prep), "threshold": threshold,
        "steps": volume_steps(prep) + STEPS,
        "checkpoint": {"name": path.name, "stage": state.get("stage"), "step": state.get("step"),
                       "sha256": file_digest(path), "model_args": state["model_args"]},
        "check": {"max_abs_logit_difference": diff, "batch": list(check.shape)},
        "versions": {"medsass": medsass.__version__, "torch": torch.__version__},
    }
    write_json(meta, out / JSON_NAME)
    return meta


def apply_exported(folder: str | Path, image: str | Path, *, threshold: float | None = None) -> list[np.ndarray]:
    """Masks of ``image`` (uint8 {0, 255}, one per frame, at the frame's size) from an export folder alone.

    The reference for using an export: the JSON's preprocessing (medsass's readers and predict's canvases), the
    exported network (onnxruntime or torch.jit), the way back to the frame's pixels. A NIfTI volume gives one mask per
    slice, cut and windowed as the JSON's ``volume`` says (frame k = RAS+ slice k along its slice_axis, as displayed);
    ``medsass.trainer.nifti_output.write_volume(image, slice_axis, masks, out)`` puts them back on its voxel grid."""
    folder = Path(folder)
    meta = read_json(folder / JSON_NAME)
    prep = PrepParams(**meta["preprocessing"])
    model_file = folder / meta["file"]
    st = model_file.stat()
    net = _runner(str(model_file), meta["format"], (st.st_mtime_ns, st.st_size))
    threshold = meta["threshold"] if threshold is None else threshold
    fmt = sniff(Path(image))
    if fmt is None:
        raise InputError(Path(image), "unknown_format", "not an image medsass reads (by content)")
    masks = []
    frames = read(Path(image), fmt, None, max_pixels=prep.max_pixels, slice_axis=prep.slice_axis, window=prep.window)
    for frame in frames:
        places, canvases = frame_canvases(frame.pixels, str(frame.meta.get("orig_dtype", "")), prep)
        x = np.stack(list(canvases))[:, None].astype(np.float32) / np.float32(255)
        probs = 1.0 / (1.0 + np.exp(-net(x)[:, 0]))
        acc = np.zeros(frame.pixels.shape, np.float32)
        cnt = np.zeros(frame.pixels.shape, np.uint16)
        for p, prob in zip(places, probs):
            region = (slice(p.crop_y, p.crop_y + p.crop_height), slice(p.crop_x, p.crop_x + p.crop_width))
            acc[region] += geometry.to_source(prob, p, order=1)
            cnt[region] += 1
        masks.append(((acc / cnt) >= threshold).astype(np.uint8) * np.uint8(255))
    return masks


def volume_description(prep: PrepParams) -> dict[str, Any]:
    """How a NIfTI volume becomes frames: the slice axis and the window with its numbers (``None``: no window)."""
    win = parse_window(prep.window)
    if win is None:
        window = None
    elif win.fixed:
        low, high = win.bounds()
        window = {"spec": win.spec, "center": win.center, "width": win.width, "low": low, "high": high}
    else:
        window = {"spec": PERCENTILE, "percentiles": list(VOLUME_PERCENTILES)}
    return {"slice_axis": prep.slice_axis, "canonical_axis": SLICE_AXES[prep.slice_axis], "window": window}


def volume_steps(prep: PrepParams) -> list[str]:
    """The steps in words that turn a NIfTI volume into 2-D frames (pipeline/readers/nifti.py, pipeline/window.py)."""
    vol = volume_description(prep)
    axis, name = vol["canonical_axis"], prep.slice_axis
    cut = (f"NIfTI volume: values are nibabel's scaled values (scl_slope/scl_inter); permute and flip (never resample) "
           f"the voxel axes to RAS+ (nibabel.io_orientation, as nibabel.as_closest_canonical), then cut it {name}ly, "
           f"across canonical axis {axis} ({'RAS'[axis]}): frame k is canonical slice k; each slice is shown as a "
           f"viewer shows it: slice = canonical volume indexed [{', '.join([':'] * axis + ['k'])}], then [::-1, ::-1].T "
           f"({VIEWS[name]})")
    win = vol["window"]
    if win is None:
        how = ("no window: each slice goes through the intensity step below on its own, as a 2-D image of its dtype "
               "(float32 when scaled)")
    elif "low" in win:
        how = (f"window {win['spec']} (centre {win['center']:g}, width {win['width']:g}): every slice maps source "
               f"values linearly from low = {win['low']:g} to high = {win['high']:g} onto 0..255, clipped, rounded half "
               "up (float32); the uint8 slice then skips the intensity step")
    else:
        how = (f"window {PERCENTILE}: low, high = the {VOLUME_PERCENTILES[0]}th and {VOLUME_PERCENTILES[1]}th "
               "percentiles of the volume's finite scaled values (numpy.percentile, linear), sampled at most 2^20 "
               "evenly strided over the stored array's memory order; one mapping for every slice of the volume: "
               "linearly low..high onto 0..255, clipped, rounded half up (float32); the uint8 slice then skips the "
               "intensity step")
    return [cut, how]



def _to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own progress notes
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT], opset_version=OPSET,
                          dynamo=True, dynamic_shapes=({0: batch},), external_data=False, verbose=False)
    import onnx  # lazy: 0.49 s to import (-X importtime, after torch); torchscript exports never need it

    onnx.checker.check_model(str(path))


def _to_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_DEPRECATED)  # deprecated in torch 2.x; still loads, also in libtorch
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path))


@functools.lru_cache(maxsize=4)
def _runner(path: str, fmt: str, version: tuple[int, int] = (0, 0)):
    """numpy (N, 1, S, S) float32 -> logits, with the exported file only (kept while the file is unchanged)."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run([OUTPUT], {INPUT: x})[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_DEPRECATED)
        net = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()

    return run

