"""The U-Net: smp.Unet with a named encoder, one gray input channel, one output logit.

smp (≈3 s to import) is imported inside the functions, so the CLI's ``--help`` stays fast.
smp builds every U-Net with ``encoder_weights=None``: nothing is downloaded unless the config's
``model.encoder_weights`` names weights, and those are loaded (``medsass.trainer.weights``) only
into a stage that starts from nothing (``build_model(..., init_weights=True)``). ``model_args``
never names them, so evaluate and predict rebuild a checkpoint's model without any download.
"""
from __future__ import annotations

from typing import Any

import torch
from medsass.trainer import weights
from medsass.trainer.config import ModelConfig

from medsass.errors import ConfigError

ARCH = "Unet"
ENCODER_PREFIX = "encoder."


def model_args(cfg: ModelConfig) -> dict[str, Any]:
    """What rebuilds the model; stored in every checkpoint and compared before loading one."""
    return {
        "arch": ARCH,
        "encoder_name": cfg.encoder,
        "decoder_attention_type": cfg.decoder_attention_type,
        "in_channels": 1,
        "classes": 1,
    }


def check_encoder(name: str) -> None:
    """Raise ConfigError listing the valid names when smp (or timm, for ``tu-*``) lacks ``name``."""
    import segmentation_models_pytorch as smp  # lazy: 2.9 s to import (-X importtime, after torch); --help needs none

    if name.startswith("tu-"):
        import timm  # lazy: already imported by smp above; kept beside its only use

        base = name[3:].split(".")[0]  # tu-<model>[.<pretrained tag>]
        if not timm.is_model(base):
            close = timm.list_models(f"*{base.split('_')[0]}*")[:20]
            raise ConfigError(
                f"model.encoder={name!r}: timm has no model {base!r}. "
                f"Similar timm models: {', '.join(close) or 'none'} (see timm.list_models())"
            )
        return
    names = smp.encoders.get_encoder_names()
    if name not in names:
        raise ConfigError(
            f"model.encoder={name!r} is not an smp encoder. Available options are: {', '.join(names)}; "
            "or tu-<timm model name> (e.g. tu-mobilenetv3_small_100)"
        )


def build_model(cfg: ModelConfig | dict[str, Any], *, init_weights: bool = False):
    """A freshly initialised U-Net (from a ModelConfig or stored ``model_args``).

    ``init_weights``: also load the ModelConfig's ``encoder_weights`` into the encoder (a stage that starts from
    nothing). Without it a weight name is only checked against the encoder's (a file is not needed then)."""
    args = model_args(cfg) if isinstance(cfg, ModelConfig) else dict(cfg)
    spec = cfg.encoder_weights if isinstance(cfg, ModelConfig) else None
    model = _unet(args)
    if spec is not None and init_weights:
        init_encoder(model, cfg)
    elif spec is not None and not weights.is_file(spec):
        weights.check_weights(args["encoder_name"], spec)
    return model


def init_encoder(model, cfg: ModelConfig) -> dict[str, Any] | None:
    """Load ``cfg.encoder_weights`` into the encoder of ``model`` (built from ``cfg``); what was loaded, or None.

    The report's ``identity`` goes into checkpoints and ``weights.describe(report)`` is the log line."""
    if cfg.encoder_weights is None:
        return None
    return weights.load_encoder_weights(model, model_args(cfg), cfg.encoder_weights)


def _unet(args: dict[str, Any]):
    import segmentation_models_pytorch as smp  # lazy: 2.9 s to import (-X importtime, after torch); --help needs none

    if args.get("arch", ARCH) != ARCH:
        raise ConfigError(f"model arch {args['arch']!r} is not supported (only {ARCH})")
    check_encoder(args["encoder_name"])
    try:
        return smp.Unet(
            encoder_name=args["encoder_name"],
            encoder_weights=None,
            decoder_attention_type=args["decoder_attention_type"],
            in_channels=args["in_channels"],
            classes=args["classes"],
        )
    except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(
            f"model.encoder={args['encoder_name']!r} cannot build a U-Net ({exc}); plain ViTs lack multi-scale "
            "features: use mit_b0, tu-pvt_v2_b0 or tu-swin_tiny_patch4_window7_224"
        ) from None


def check_compatible(stored: dict[str, Any], current: dict[str, Any], *, what: str, parts: str = "all") -> None:
    """Compare stored model args with the current ones before any ``load_state_dict``.

    ``parts="encoder"`` compares only what the encoder's weights depend on.
    """
    keys = ["arch", "encoder_name", "in_channels"] if parts == "encoder" else sorted(set(stored) | set(current))
    diff = [k for k in keys if stored.get(k) != current.get(k)]
    if diff:
        have = ", ".join(f"{k}={stored.get(k)!r}" for k in diff)
        want = ", ".join(f"{k}={current.get(k)!r}" for k in diff)
        raise ConfigError(f"{what} was trained with {have} but this config builds {want}; use a matching model config")


def encoder_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The encoder's entries of a U-Net state dict."""
    return {k: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}


def load_weights(model, state_dict: dict[str, Any], *, parts: str) -> None:
    """Load ``parts`` ("all" or "encoder") of a U-Net state dict into ``model``, strictly."""
    if parts == "all":
        model.load_state_dict(state_dict, strict=True)
        return
    enc = encoder_state(state_dict)
    missing, unexpected = model.load_state_dict(enc, strict=False)
    missing_enc = [k for k in missing if k.startswith(ENCODER_PREFIX)]
    if missing_enc or unexpected or not enc:
        raise ConfigError(
            f"encoder weights do not fit this model (missing {missing_enc[:3]}, unexpected {unexpected[:3]})"
        )


def unwrap(model):
    """The plain module under DDP / torch.compile wrappers (whose state_dict has clean keys)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and model.__class__.__name__ == "DistributedDataParallel":
            model = model.module
        else:
            return model


def freeze_unused(model, size: int) -> list[str]:
    """Stop training parameters the forward pass never uses; returns their names.

    smp's Unet with ``decoder_attention_type="scse"`` builds an attention block for the skip
    connection of its last decoder block, which has none: DDP then fails ("parameters that were
    not used in producing loss"). One eval-mode forward/backward on a blank (1, 1, size, size)
    image finds such parameters; nothing else (running stats, RNG) changes.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    model(torch.zeros(1, 1, size, size, device=param.device)).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    model.train(was_training)
    return unused
