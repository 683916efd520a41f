"""model.encoder_weights: local weight files (bare, wrapped, whole-model, torchvision / timm checkpoints), refusals that
name the file and the encoder, the offline message naming the cache folder, and that the weights initialise only a
stage that starts from nothing (never a resume, a fine-tune from a checkpoint, evaluate or predict). Nothing downloads."""
from __future__ import annotations

import json
import socket
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from medsass.trainer import checkpoint as ck
from medsass.trainer import weights
from medsass.trainer.config import ModelConfig, load_config
from medsass.trainer.model import build_model, model_args
from medsass.trainer.run import plan_run, run_stages

from PIL import Image

from medsass import store as store_mod
from medsass.errors import ConfigError, MedsassWarning
from medsass.manifest import file_digest
from medsass.testing import make_synthetic_store

torch.set_num_threads(1)
TINY = "tu-mobilenetv3_small_100"


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty Hugging Face cache in offline mode, and no socket can connect: a download attempt fails here."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return cache


def tiny_encoder_file(path: Path, seed: int = 7, **wrap) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = build_model(ModelConfig(encoder=TINY)).encoder.state_dict()
    torch.save(state if not wrap else {k: state for k in wrap}, path)
    return state


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_bare_encoder_state_dict_initialises_the_encoder_only_when_asked(tmp_path):
    state = tiny_encoder_file(tmp_path / "enc.pt")
    cfg = ModelConfig(encoder=TINY, encoder_weights=str(tmp_path / "enc.pt"))
    torch.manual_seed(0)
    plain = build_model(cfg)  # checked (the file exists), not loaded
    torch.manual_seed(0)
    loaded = build_model(cfg, init_weights=True)
    torch.manual_seed(0)
    reference = build_model(ModelConfig(encoder=TINY))
    assert same(loaded.encoder.state_dict(), state) and not same(plain.encoder.state_dict(), state)
    assert same(plain.state_dict(), reference.state_dict())
    dec = {k: v for k, v in loaded.state_dict().items() if not k.startswith("encoder.")}
    assert same(dec, {k: v for k, v in reference.state_dict().items() if not k.startswith("encoder.")})  # RNG untouched
    assert "encoder_weights" not in model_args(cfg)  # predict / evaluate rebuild the model without them


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_whole_unet_and_wrapped_checkpoints_give_their_encoder(tmp_path, wrapper):
    torch.manual_seed(3)
    unet = build_model(ModelConfig(encoder=TINY))
    full = {f"module.{k}": v for k, v in unet.state_dict().items()}  # saved from DDP: prefixes are stripped
    torch.save({wrapper: full, "step": 12}, tmp_path / "ck.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its decoder and head are expected, not "ignored" tensors
        model = build_model(ModelConfig(encoder=TINY, encoder_weights=str(tmp_path / "ck.pt")), init_weights=True)
    assert same(model.encoder.state_dict(), unet.encoder.state_dict())


def test_torchvision_resnet_checkpoint_rgb_conv_summed_head_ignored(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(tv, tmp_path / "resnet18.pth")
    with pytest.warns(UserWarning, match=r"2 tensor\(s\) of .*resnet18.pth are a classifier head, not part of encoder "
                                         r"'resnet18'.*fc.weight, fc.bias\)$"):
        model = build_model(ModelConfig(encoder="resnet18", encoder_weights=str(tmp_path / "resnet18.pth")), init_weights=True)
    assert torch.equal(model.encoder.conv1.weight, tv["conv1.weight"].sum(1, keepdim=True))  # as smp does for imagenet
    assert torch.equal(model.encoder.layer4[1].conv2.weight, tv["layer4.1.conv2.weight"])


def test_the_log_line_and_the_identity_name_the_source(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    model = build_model(ModelConfig(encoder="resnet18"))
    with pytest.warns(UserWarning, match="classifier head"):
        report = weights.load_encoder_weights(model, model_args(ModelConfig(encoder="resnet18")), str(tmp_path / "resnet18.pth"))
    digest = file_digest(tmp_path / "resnet18.pth")
    assert report["identity"] == {"file": str(tmp_path / "resnet18.pth"), "sha256": digest}
    n = len(model.encoder.state_dict())
    assert weights.describe(report) == (f"encoder weights resnet18.pth (sha256 {digest[:12]}) -> encoder resnet18: {n} "
                                        "tensors loaded, 2 ignored (classifier head), first conv summed over its 3 RGB "
                                        "input channels")
    named = {"identity": weights.identity("imagenet"), "encoder": "resnet18", "tensors": n, "ignored": [], "adapted": []}
    assert weights.describe(named) == f"encoder weights imagenet -> encoder resnet18: {n} tensors loaded, 0 ignored"
    # a resume warns only when the recorded file now hashes differently
    assert weights.replaced_since(report["identity"], str(tmp_path / "resnet18.pth")) is None
    assert weights.replaced_since({"name": "imagenet"}, "imagenet") is None
    assert weights.replaced_since(None, str(tmp_path / "resnet18.pth")) is None
    assert weights.replaced_since(report["identity"], str(tmp_path / "gone.pth")) is None  # not needed to resume
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "resnet18.pth")
    msg = weights.replaced_since(report["identity"], str(tmp_path / "resnet18.pth"))
    assert msg and digest[:12] in msg and file_digest(tmp_path / "resnet18.pth")[:12] in msg and "resnet18.pth" in msg


def test_a_deeper_sibling_is_refused_naming_its_extra_tensors(tmp_path):
    """resnet34 holds every resnet18 tensor with the same shape: only its extra blocks tell it apart, so they refuse it."""
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(encoder="resnet18", encoder_weights=str(tmp_path / "resnet34.pth")), init_weights=True)
    msg = str(err.value)
    for words in (str(tmp_path / "resnet34.pth"), "encoder 'resnet18'", "96 tensor(s) the encoder lacks",
                  "not a classifier head", "layer1.2.conv1.weight", "Set model.encoder", "resnet34"):
        assert words in msg, (words, msg)
    assert "fc.weight" not in msg  # the head is not what is wrong
    with pytest.warns(UserWarning, match="fc.weight"):  # the right encoder: only its head is left out
        loaded = build_model(ModelConfig(encoder="resnet34", encoder_weights=str(tmp_path / "resnet34.pth")), init_weights=True)
    assert loaded.encoder.layer1[2].conv1.weight.shape == (64, 64, 3, 3)


@pytest.mark.parametrize(("key", "head"), [("fc.weight", True), ("classifier.1.bias", True), ("model.head.fc.weight", True),
                                           ("model.conv_head.weight", True), ("last_linear.weight", True),
                                           ("_fc.weight", True), ("layer4.2.conv1.weight", False),
                                           ("model.blocks.3.conv_pw.weight", False), ("headless.weight", False),
                                           ("features.norm5.weight", False), ("model.stages.3.fc.weight", False)])
def test_only_a_classifier_head_counts_as_a_head(key, head):
    assert weights.is_head(key) is head


def test_timm_checkpoint_of_a_staged_model_maps_to_the_feature_net_names(tmp_path):
    """timm's features_only wrapper names convnext's ``stages.0`` ``stages_0``: a timm checkpoint still fits."""
    torch.manual_seed(0)
    state = timm.create_model("convnext_atto", pretrained=False).state_dict()
    torch.save(state, tmp_path / "convnext_atto.pth")
    with pytest.warns(UserWarning, match=r"4 tensor\(s\) .* classifier head.*head.norm.weight"):
        model = build_model(ModelConfig(encoder="tu-convnext_atto", encoder_weights=str(tmp_path / "convnext_atto.pth")),
                            init_weights=True)
    enc = model.encoder.model
    assert torch.equal(enc.stages_3.blocks[1].conv_dw.weight, state["stages.3.blocks.1.conv_dw.weight"])
    assert torch.equal(enc.stem_0.weight, state["stem.0.weight"].sum(1, keepdim=True))


def test_timm_checkpoint_for_a_tu_encoder_as_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("mobilenetv3_small_100", pretrained=False)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / "mnv3.safetensors"))
    with pytest.warns(UserWarning, match="classifier"):
        model = build_model(ModelConfig(encoder=TINY, encoder_weights=str(tmp_path / "mnv3.safetensors")), init_weights=True)
    assert torch.equal(model.encoder.model.conv_stem.weight, state["conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(model.encoder.model.blocks[2][0].conv_pw.weight, state["blocks.2.0.conv_pw.weight"])


def test_bad_files_are_refused_naming_the_file_and_the_encoder(tmp_path):
    state = tiny_encoder_file(tmp_path / "enc.pt")
    bad = dict(state)
    key = next(k for k, v in state.items() if v.ndim == 4 and k != next(iter(state)))
    bad[key] = torch.zeros(3, 3, 3, 3)
    torch.save(bad, tmp_path / "shape.pt")
    torch.save({k: v for k, v in state.items() if "blocks.3" not in k}, tmp_path / "partial.pt")
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_module.pt")
    cases = {"shape.pt": ["shape", key, "(3, 3, 3, 3)"], "partial.pt": ["lacks", "blocks.3"],
             "other.pt": ["none of its 1 tensor names"], "pickled_module.pt": ["weights_only=True", "state_dict"]}
    for name, words in cases.items():
        cfg = ModelConfig(encoder=TINY, encoder_weights=str(tmp_path / name))
        with pytest.raises(ConfigError) as err:
            build_model(cfg, init_weights=True)
        msg = str(err.value)
        assert str(tmp_path / name) in msg and all(w in msg for w in words), msg
        if name != "pickled_module.pt":
            assert TINY in msg


def test_names_and_missing_files_are_checked_without_loading(tmp_path, no_network):
    build_model(ModelConfig(encoder="resnet18", encoder_weights="imagenet"))  # a known name: nothing fetched yet
    assert not no_network.exists()
    with pytest.raises(ConfigError, match=r"'imagenett' is not a weight name of encoder 'resnet18'.*imagenet, ssl, swsl"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights="imagenett"))
    missing = ModelConfig(encoder="resnet18", encoder_weights=str(tmp_path / "missing.pt"))
    build_model(missing)  # evaluate / predict of a run whose weights file is gone: not needed
    with pytest.raises(ConfigError, match="no such file"):
        build_model(missing, init_weights=True)
    with pytest.raises(ConfigError, match="encoder_weights is empty"):
        load_config({"out_dir": "x", "stores": {"a": "a"}, "model": {"encoder_weights": " "}})


@pytest.mark.parametrize(("encoder", "repo"), [("resnet18", "smp-hub/resnet18.imagenet"),
                                               (TINY, "timm/mobilenetv3_small_100.lamb_in1k")])
def test_offline_without_cache_names_the_folder_to_fill(no_network, encoder, repo):
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(encoder=encoder, encoder_weights="imagenet"), init_weights=True)
    msg = str(err.value)
    for words in (str(no_network), repo, "hf download", f"models--{repo.replace('/', '--')}", "local state-dict file"):
        assert words in msg, (words, msg)


# -- through the trainer: first stage only ------------------------------------------------------


def with_prep_params(path: Path) -> Path:
    """Give a synthetic store the prep parameters `medsass-prep build-masks` records (predict repeats them)."""
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    group.attrs["medsass"] = {**group.attrs["medsass"], "params": {
        "geometry": {"size": 32, "resize": "stretch", "tile": False, "tile_overlap": 0, "max_pixels": 2**28},
        "threshold": {"method": "otsu", "polarity": "auto", "intensity": "percentile"}}}
    store_mod.consolidate(path)
    return path


def notes(stage_dir: Path) -> list[str]:
    return [r["note"] for r in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines()) if "note" in r]


def test_weights_initialise_the_first_stage_only(tmp_path, monkeypatch, no_network, capsys, run_killed_before_done):
    from medsass.trainer.predict import predict

    state = tiny_encoder_file(tmp_path / "enc.pt")
    first = file_digest(tmp_path / "enc.pt")
    store = with_prep_params(make_synthetic_store(tmp_path / "s.zarr", n=24, size=32))
    calls = []
    real = weights.load_encoder_weights

    def spy(model, args, spec):
        calls.append(spec)
        return real(model, args, spec)

    monkeypatch.setattr(weights, "load_encoder_weights", spy)

    def config(out: str, **extra):
        data = {"out_dir": str(tmp_path / out), "stores": {"syn": str(store)},
                "model": {"encoder": TINY, "encoder_weights": str(tmp_path / "enc.pt")},
                "pretrain": {"steps": 2, "batch_size": 4, "log_every": 1, "checkpoint_every": 1, "lr": 1e-9},
                "finetune": {"steps": 1, "batch_size": 4, "log_every": 1, "lr": 1e-9},
                "evaluate": {"batch_size": 16, "overlays": 0},
                "runtime": {"num_workers": 0, "progress": False, "threads": 1, "tensorboard": False}}
        return load_config({**data, **extra})

    cfg = config("run")
    run_killed_before_done(cfg)  # pretrain: loaded once, then killed before its done marker
    assert calls == [str(tmp_path / "enc.pt")]
    line = f"encoder weights enc.pt (sha256 {first[:12]}) -> encoder {TINY}: {len(state)} tensors loaded, 0 ignored"
    assert notes(tmp_path / "run" / "pretrain") == [line]  # the run's log, and stderr
    assert f"medsass: {line}\n" in capsys.readouterr().err
    recorded = {"file": str(tmp_path / "enc.pt"), "sha256": first}
    assert ck.load(tmp_path / "run" / "pretrain" / "last.pt")["encoder_weights"] == recorded
    tiny_encoder_file(tmp_path / "enc.pt", seed=8)  # replaced in place before the resume: warned, not reloaded
    second = file_digest(tmp_path / "enc.pt")
    with pytest.warns(MedsassWarning, match=rf"enc.pt changed since .*sha256 {first[:12]} then, {second[:12]} now"):
        run_stages(cfg)  # resume pretrain from last.pt, then finetune end_to_end from it, then evaluate: no second load
    assert len(calls) == 1
    assert len(notes(tmp_path / "run" / "pretrain")) == 2 and "changed since" in notes(tmp_path / "run" / "pretrain")[1]
    assert not notes(tmp_path / "run" / "finetune")  # started from the pretrain checkpoint: nothing loaded
    final = ck.load(tmp_path / "run" / "pretrain" / "final.pt")
    assert final["encoder_weights"] == recorded  # what it started from, kept across the resume
    enc = {k[len("encoder."):]: v for k, v in final["model"].items() if k.startswith("encoder.") and v.ndim == 4}
    assert max(float((enc[k] - state[k]).abs().max()) for k in enc) < 1e-6  # started from the first file (lr 1e-9)
    tuned = ck.load(tmp_path / "run" / "finetune" / "final.pt")
    assert "encoder_weights" not in tuned["model_args"] and tuned["config"]["model"]["encoder_weights"]
    assert tuned["encoder_weights"] is None
    (tmp_path / "enc.pt").unlink()  # evaluate and predict need no weights file (nor a download)
    run_stages(cfg, ["evaluate"], restart=True)
    Image.new("L", (40, 30), 90).save(tmp_path / "in.png")
    rows = predict(tmp_path / "run" / "finetune" / "final.pt", [tmp_path / "in.png"], tmp_path / "pred", device="cpu")
    assert rows[0]["status"] == "ok" and len(calls) == 1
    # finetune from scratch is a first stage: the weights initialise it
    tiny_encoder_file(tmp_path / "enc.pt")
    run_stages(config("scratch", stages=["finetune"], finetune={"steps": 1, "batch_size": 4, "init": "scratch"}))
    assert len(calls) == 2


def test_an_unknown_weight_name_fails_before_training(tmp_path):
    store = make_synthetic_store(tmp_path / "s.zarr", n=12, size=32)
    cfg = load_config({"out_dir": str(tmp_path / "run"), "stores": {"syn": str(store)},
                       "model": {"encoder": "resnet18", "encoder_weights": "imagenet21k"}})
    with pytest.raises(ConfigError, match="Available options are: imagenet"):
        plan_run(cfg, ["pretrain"])
