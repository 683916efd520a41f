"""The U-Net factory: encoders by name, no downloads, architecture checks, encoder-only transfer."""
from __future__ import annotations

import pytest
import torch
from medsass.trainer.config import ModelConfig
from medsass.trainer.model import (
    build_model,
    check_compatible,
    check_encoder,
    encoder_state,
    load_weights,
    model_args,
    unwrap,
)

from medsass.errors import ConfigError

TINY = ModelConfig(encoder="tu-mobilenetv3_small_100")


def test_unet_has_one_gray_input_one_logit_and_scse():
    model = build_model(TINY)
    assert type(model).__name__ == "Unet"
    out = model(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 1, 32, 32)
    assert any("attention" in name and "cSE" in name for name, _ in model.named_modules())


def test_default_is_paper_resnet50():
    args = model_args(ModelConfig())
    assert args == {"arch": "Unet", "encoder_name": "resnet50", "decoder_attention_type": "scse", "in_channels": 1, "classes": 1}


def test_unknown_encoder_lists_valid_ones():
    with pytest.raises(ConfigError, match="Available options are: .*resnet50"):
        check_encoder("resnet5000")
    with pytest.raises(ConfigError, match="timm has no model 'not_a_model'"):
        check_encoder("tu-not_a_model")
    check_encoder("tu-mobilenetv3_small_100")
    check_encoder("mit_b0")


def test_plain_vit_is_a_clear_error():
    with pytest.raises(ConfigError, match="cannot build a U-Net"):
        build_model(ModelConfig(encoder="tu-vit_tiny_patch16_224"))


def test_transformer_encoder_mit_b0_builds_and_runs():
    model = build_model(ModelConfig(encoder="mit_b0"))
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.slow
def test_swin_encoder_builds_and_runs():
    model = build_model(ModelConfig(encoder="tu-swin_tiny_patch4_window7_224"))
    assert model(torch.rand(1, 1, 224, 224)).shape == (1, 1, 224, 224)


def test_check_compatible_names_both_architectures():
    a, b = model_args(TINY), model_args(ModelConfig(encoder="resnet18"))
    with pytest.raises(ConfigError, match="encoder_name='tu-mobilenetv3_small_100'.*encoder_name='resnet18'"):
        check_compatible(a, b, what="checkpoint x.pt")
    c = dict(a, decoder_attention_type=None)
    check_compatible(a, c, what="x", parts="encoder")  # the encoder alone does not care about the decoder
    with pytest.raises(ConfigError, match="decoder_attention_type"):
        check_compatible(a, c, what="x")


def test_encoder_only_transfer_keeps_fresh_decoder():
    torch.manual_seed(0)
    source = build_model(TINY)
    torch.manual_seed(1)
    target = build_model(TINY)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    load_weights(target, source.state_dict(), parts="encoder")
    src, now = source.state_dict(), target.state_dict()
    enc = encoder_state(src)
    assert enc and all(torch.equal(now[k], v) for k, v in enc.items())
    decoder_keys = [k for k in now if not k.startswith("encoder.") and now[k].is_floating_point()]
    assert decoder_keys and all(torch.equal(now[k], fresh[k]) for k in decoder_keys)
    assert any(not torch.equal(now[k], src[k]) for k in decoder_keys)
    load_weights(target, src, parts="all")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in src.items())


def test_unwrap_compiled_module():
    model = build_model(TINY)
    assert unwrap(torch.compile(model)) is model
