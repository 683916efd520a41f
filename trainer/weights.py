"""Encoder weights for a run's first stage: ``model.encoder_weights``.

Two kinds of value:

* an smp weight name (``imagenet``, ``ssl``, ...; see :func:`weight_names`), fetched by smp itself (or by timm for
  ``tu-*`` encoders, where ``imagenet`` means the pretrained tag in the encoder name or timm's default) into their
  cache: the Hugging Face Hub cache for smp 0.6's own encoders and for timm models with an ``hf_hub_id``, the torch
  hub folder for timm models given by URL. Offline and not cached, the error names the folder to fill;
* a local file (``.pt``/``.pth``/``.bin``/``.ckpt`` read with ``torch.load(weights_only=True)``, or ``.safetensors``)
  for machines without internet: a bare encoder state dict, a whole smp U-Net (or a medsass checkpoint) whose
  ``encoder.*`` entries are used, a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper, or a timm checkpoint of a
  ``tu-*`` encoder's model. RGB first-conv weights are summed over their 3 input channels, as smp and timm do for
  their own pretrained weights on one channel. A classifier head (``HEAD_MODULES``: fc, classifier, head, ...) is
  ignored with a warning; any other tensor the encoder lacks (a deeper sibling: resnet34 into resnet18), a missing
  tensor or a shape mismatch is refused, naming the file, the encoder and the encoder family to choose from.

What was loaded is one log line (:func:`describe`: the weight name, or the file name and its sha256 prefix, and the
tensors loaded / ignored) in the stage's ``metrics.jsonl`` and on stderr; the checkpoints record :func:`identity`
(the name, or the file and its sha256), and a resume warns when that file now hashes differently
(:func:`replaced_since`).

Nothing is read or downloaded unless the config names weights, and only when a stage starts from nothing
(:func:`medsass.trainer.model.build_model` with ``init_weights=True``): never on resume, never when a stage starts
from a checkpoint, never at evaluate / predict time (the checkpoint's ``model_args`` do not name them).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import load_file as load_safetensors

from medsass.errors import ConfigError
from medsass.manifest import file_digest

FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors")
TIMM_NAMES = ("imagenet", "timm")  # tu-* encoders: timm's pretrained tag (in the name, or timm's default)
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")  # lightning / medsass / common training scripts
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
ENCODER_PREFIX = "encoder."
TIMM_PREFIX = "model."  # smp's TimmUniversalEncoder keeps the timm model under .model
# Classifier heads of ImageNet models, which an encoder drops: their tensors are the only ones ignored. torchvision /
# timm (fc, classifier, head incl. head.fc / head.norm, conv_head + bn2 of EfficientNet / MobileNetV3, fc_norm,
# global_pool, pre_logits, and the final norm of Swin / ViT-like models, which timm's feature wrapper drops), Cadene's
# pretrainedmodels (last_linear), lukemelas' EfficientNet (_fc, _conv_head, _bn1), MobileOne (linear), MiT (head).
HEAD_MODULES = frozenset({"fc", "classifier", "head", "last_linear", "conv_head", "bn2", "fc_norm", "head_drop",
                          "global_pool", "pre_logits", "norm", "_fc", "_conv_head", "_bn1", "linear"})


def is_file(spec: str) -> bool:
    """Whether ``model.encoder_weights`` names a file (a path separator, a weights suffix, or an existing file)."""
    return "/" in spec or "\\" in spec or spec.lower().endswith(FILE_SUFFIXES) or Path(spec).is_file()


def weight_names(encoder: str) -> list[str]:
    """The weight names smp (or timm, for ``tu-*``) offers for ``encoder``."""
    if encoder.startswith("tu-"):
        return list(TIMM_NAMES) if _timm().models.is_model_pretrained(encoder[3:]) else []
    smp = _smp()
    return list(smp.encoders.encoders[encoder]["pretrained_settings"]) if encoder in smp.encoders.encoders else []


def check_weights(encoder: str, spec: str) -> None:
    """Cheap checks before anything runs: the file exists, or the name is one smp / timm has for ``encoder``."""
    if is_file(spec):
        if not Path(spec).is_file():
            raise ConfigError(f"model.encoder_weights={spec!r}: no such file. Give an existing state-dict file "
                              "(.pt/.pth/.safetensors), an smp weight name such as imagenet, or null")
        return
    names = weight_names(encoder)
    if spec not in names:
        raise ConfigError(f"model.encoder_weights={spec!r} is not a weight name of encoder {encoder!r}. "
                          f"Available options are: {', '.join(names) or 'none (it has no pretrained weights)'}; "
                          "or a local state-dict file")


def load_encoder_weights(model: torch.nn.Module, args: dict[str, Any], spec: str) -> dict[str, Any]:
    """Put ``spec``'s weights into ``model.encoder`` (a U-Net built from ``args``); returns what was loaded
    (``source``, ``identity``, ``tensors`` loaded, ``ignored`` head tensors, ``adapted`` RGB convs: :func:`describe`).

    The global RNG is left as it was, so the decoder's initialisation is the same with or without weights."""
    encoder = args["encoder_name"]
    check_weights(encoder, spec)
    target = model.encoder.state_dict()
    if is_file(spec):
        state, report = match_encoder_state(read_weights_file(Path(spec)), target, source=spec, encoder=encoder)
    else:
        state = _downloaded_encoder_state(args, spec)
        report = {"source": f"{spec} ({encoder})", "tensors": len(state), "ignored": [], "adapted": []}
    model.encoder.load_state_dict(state, strict=True)
    return {**report, "encoder": encoder, "identity": identity(spec)}


def identity(spec: str) -> dict[str, str]:
    """What names these weights in a checkpoint: ``{"name": spec}``, or a file's ``{"file", "sha256"}``."""
    return {"file": spec, "sha256": file_digest(spec)} if is_file(spec) else {"name": spec}


def describe(report: dict[str, Any]) -> str:
    """One log line: where the encoder weights came from and how many tensors were loaded / ignored."""
    ident = report["identity"]
    source = ident["name"] if "name" in ident else f"{Path(ident['file']).name} (sha256 {ident['sha256'][:12]})"
    ignored = report["ignored"]
    parts = [f"{report['tensors']} tensors loaded", f"{len(ignored)} ignored" + (" (classifier head)" * bool(ignored))]
    if report["adapted"]:
        parts.append("first conv summed over its 3 RGB input channels")
    return f"encoder weights {source} -> encoder {report['encoder']}: {', '.join(parts)}"


def replaced_since(recorded: dict[str, Any] | None, spec: str | None) -> str | None:
    """A warning when the weights file a checkpoint recorded now hashes differently (replaced in place), else None.

    Resuming never reloads the weights (the checkpoint holds the trained encoder), so this is a warning: the run goes
    on, but its config no longer names the file it started from."""
    if not recorded or "sha256" not in recorded or spec is None or not is_file(spec) or not Path(spec).is_file():
        return None
    now = file_digest(spec)
    if now == recorded["sha256"]:
        return None
    return (f"model.encoder_weights: {spec} changed since this stage started from it (sha256 {recorded['sha256'][:12]} "
            f"then, {now[:12]} now). The resumed run goes on from its checkpoint, which holds the weights it started "
            "from; a fresh run (--restart) would start from the new file")


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (``weights_only=True``: no pickled code runs), unwrapped from common containers."""
    try:
        if path.suffix.lower() == ".safetensors":
            obj: Any = load_safetensors(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, a zip error, safetensors' own: one message
        raise ConfigError(f"model.encoder_weights: {path} cannot be read as a state dict with weights_only=True "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Save `module.state_dict()` with "
                          "torch.save (a whole pickled model is refused: loading it would run its code)") from None
    for _ in range(3):  # {"state_dict": {...}}, {"model": {...}} (a medsass checkpoint), nested once or twice
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None or not any(torch.is_tensor(v) for v in inner.values()):
            break
        obj = inner
    tensors = {str(k): v for k, v in obj.items() if torch.is_tensor(v)} if isinstance(obj, dict) else {}
    if not tensors:
        raise ConfigError(f"model.encoder_weights: {path} holds no tensors (expected a state dict: name -> tensor)")
    return tensors


def match_encoder_state(raw: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, source: str,
                        encoder: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``raw``'s tensors renamed, checked and adapted to the encoder state dict ``target``; refuses what does not fit."""
    flat = {_strip(k): v for k, v in raw.items()}
    dropped: list[str] = []
    if any(k.startswith(ENCODER_PREFIX) for k in flat):  # a whole smp model: its encoder
        dropped = [k for k in flat if not k.startswith(ENCODER_PREFIX)]
        flat = {k[len(ENCODER_PREFIX):]: v for k, v in flat.items() if k.startswith(ENCODER_PREFIX)}
    candidates = [flat, {TIMM_PREFIX + k: v for k, v in flat.items()},
                  {k[len(TIMM_PREFIX):]: v for k, v in flat.items() if k.startswith(TIMM_PREFIX)}]
    named = max((_feature_net_names(c, target) for c in candidates), key=lambda c: len(c.keys() & target.keys()))
    where = f"model.encoder_weights: {source} does not fit encoder {encoder!r}"
    if not named.keys() & target.keys():
        raise ConfigError(f"{where}: none of its {len(flat)} tensor names is one of the encoder's (file: "
                          f"{', '.join(list(flat)[:3])}, ...; encoder: {', '.join(list(target)[:3])}, ...). "
                          "Was it saved from another encoder? Set model.encoder to the one it was saved from"
                          f"{_family(encoder)}")
    extra = [k for k in named if k not in target]  # a whole model's decoder and head (``dropped``) are expected
    unexpected = [k for k in extra if not is_head(k)]
    # a deeper sibling (resnet34 into resnet18): every tensor of the encoder fits, its extra blocks would be lost
    if unexpected:
        raise ConfigError(f"{where}: it holds {len(unexpected)} tensor(s) the encoder lacks that are not a classifier "
                          f"head ({_few(unexpected)}), so it was saved from another (deeper or wider) model. Set "
                          f"model.encoder to the encoder it was saved from{_family(encoder)}")
    missing = [k for k in target if k not in named and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(f"{where}: it lacks {len(missing)} of the encoder's {len(target)} tensors "
                          f"({_few(missing)}); a partial load would leave them random. Use a complete state dict of "
                          f"this encoder, or set model.encoder to the one it was saved from{_family(encoder)}")
    state, adapted, wrong = {}, [], []
    stem = next((k for k, v in target.items() if v.ndim == 4), None)  # the first conv: the only one fed the image
    for key, want in target.items():
        have = named.get(key, want)  # a missing BatchNorm counter keeps the model's own
        if key == stem and _rgb_to_gray(have, want):
            have, adapted = have.sum(1, keepdim=True), [*adapted, key]  # as smp.patch_first_conv / timm.adapt_input_conv
        if have.shape != want.shape:
            wrong.append(f"{key} {tuple(have.shape)} != {tuple(want.shape)}")
        state[key] = have.to(want.dtype)
    if wrong:
        raise ConfigError(f"{where}: {len(wrong)} tensor shape(s) differ (file != model: {'; '.join(wrong[:3])}). "
                          f"Set model.encoder to the encoder the file was saved from{_family(encoder)}")
    if extra:
        warnings.warn(f"model.encoder_weights: {len(extra)} tensor(s) of {source} are a classifier head, not part "
                      f"of encoder {encoder!r}, and were ignored ({_few(extra)})", stacklevel=3)
    return state, {"source": source, "tensors": sum(k in named for k in target), "ignored": extra, "adapted": adapted,
                   "not_encoder": len(dropped)}


def is_head(key: str) -> bool:
    """Whether ``key`` belongs to a classification head, which a U-Net's encoder drops (its first module is one)."""
    key = key[len(TIMM_PREFIX):] if key.startswith(TIMM_PREFIX) else key
    return key.split(".", 1)[0] in HEAD_MODULES


def cache_hint(encoder: str, spec: str) -> str:
    """Where smp / timm look for ``spec`` weights of ``encoder``, and how to put them there without internet."""
    hub = hf_constants.HF_HUB_CACHE  # read now: HF_HUB_CACHE / HF_HOME as huggingface_hub resolved them
    if encoder.startswith("tu-"):
        cfg = _timm().models.get_pretrained_cfg(encoder[3:])
        repo, rev = getattr(cfg, "hf_hub_id", None), None
        if not repo:
            url = getattr(cfg, "url", "") or "?"
            folder = Path(torch.hub.get_dir()) / "checkpoints"
            return (f"timm downloads {url} into the torch hub folder {folder} (TORCH_HOME). Put that file there (from "
                    "a machine with internet), or set model.encoder_weights to a local state-dict file")
    else:
        settings = _smp().encoders.encoders[encoder]["pretrained_settings"][spec]
        repo, rev = settings["repo_id"], settings.get("revision")
    rev_opt = f" --revision {rev}" if rev else ""
    return (f"{'timm' if encoder.startswith('tu-') else 'smp'} downloads the Hugging Face Hub repo {repo} into the "
            f"cache folder {hub} (set by HF_HUB_CACHE or HF_HOME). On a machine with internet run `hf download "
            f"{repo}{rev_opt}`, then copy the folder models--{repo.replace('/', '--')} of its cache into {hub} here "
            "(or point HF_HUB_CACHE at a copy of that cache; HF_HUB_OFFLINE=1 then skips the network retries); or set "
            "model.encoder_weights to a local state-dict file")


def _downloaded_encoder_state(args: dict[str, Any], spec: str) -> dict[str, torch.Tensor]:
    """smp's (or timm's) own weights for the encoder: the same U-Net built by smp with ``encoder_weights``."""
    smp = _smp()
    encoder = args["encoder_name"]
    try:
        with torch.random.fork_rng(devices=[]):  # building the second U-Net must not move the run's RNG
            unet = smp.Unet(encoder_name=encoder, encoder_weights=True if encoder.startswith("tu-") else spec,
                            decoder_attention_type=args["decoder_attention_type"], in_channels=args["in_channels"],
                            classes=args["classes"])
    except Exception as exc:  # noqa: BLE001 - offline, not cached, HTTP errors: all end here, with the way out
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"model.encoder_weights={spec!r}: the weights of encoder {encoder!r} could not be loaded "
                          f"({type(exc).__name__}: {first}). {cache_hint(encoder, spec)}") from None
    return unet.encoder.state_dict()


def _rgb_to_gray(have: torch.Tensor, want: torch.Tensor) -> bool:
    """A first conv saved for RGB input (out, 3, k, k) where the model has one channel (out, 1, k, k)."""
    return have.ndim == 4 and have.shape[1] == 3 and want.shape[1] == 1 and have.shape[0] == want.shape[0] \
        and have.shape[2:] == want.shape[2:]


def _strip(key: str) -> str:
    for prefix in STRIP_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _feature_net_names(named: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``named`` with timm's feature-net names where the encoder uses them: timm's ``features_only`` wrapper (smp's
    ``tu-*`` encoders) flattens a top-level Sequential, so a model's ``stages.0.x`` is the encoder's ``stages_0.x``."""
    out = {}
    for key, value in named.items():
        if key not in target:
            first = 1 if key.startswith(TIMM_PREFIX) else 0
            parts = key.split(".")
            if len(parts) > first + 2:
                joined = ".".join([*parts[:first], f"{parts[first]}_{parts[first + 1]}", *parts[first + 2:]])
                key = joined if joined in target and joined not in named else key
        out[key] = value
    return out


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _family(encoder: str) -> str:
    """`` (one of ...)``: smp's encoders of ``encoder``'s family, the likely ones a file of the wrong size fits."""
    if encoder.startswith("tu-"):
        return f" (tu-<the timm model>, e.g. a larger or smaller one than {encoder[3:]})"
    smp = _smp()
    stem = encoder.rstrip("0123456789").split("_")[0].split("-")[0]
    names = [n for n in smp.encoders.get_encoder_names() if n.startswith(stem) and n != encoder]
    return f" (same family: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else ""


def _smp():
    import segmentation_models_pytorch as smp  # lazy: 2.9 s to import (-X importtime, after torch); few paths need it

    return smp


def _timm():
    import timm  # lazy: 2.2-2.5 s (python -X importtime, after torch); only tu-* encoders and their names need it

    return timm
