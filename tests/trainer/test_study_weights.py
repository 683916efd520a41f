"""The study's optional init_weights arms (issue 15): ``weights`` (fine-tuned from given encoder weights) and
``weights_end_to_end`` (those weights pretrained end to end on the pseudo-masks, then fine-tuned), on a tiny synthetic
study with a local weights file (never a download); the other arms' keys do not change."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from click.testing import CliRunner
from matplotlib.colors import to_hex
from medsass.trainer import checkpoint as ck
from medsass.trainer.cli import main
from medsass.trainer.config import ModelConfig
from medsass.trainer.model import build_model
from medsass.trainer.study import ledger

from medsass.manifest import file_digest
from medsass.testing import make_synthetic_store

torch.set_num_threads(1)
TINY = "tu-mobilenetv3_small_100"


def encoder_file(path: Path, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = build_model(ModelConfig(encoder=TINY)).encoder.state_dict()
    torch.save(state, path)
    return state


def write_study(tmp_path: Path, arms: list[str], init_weights: str | None = "weights/enc.pt") -> Path:
    if not (tmp_path / "main.zarr").exists():
        make_synthetic_store(tmp_path / "main.zarr", n=32, size=32, seed=0)
        make_synthetic_store(tmp_path / "site.zarr", n=8, size=32, seed=5)
    data = {
        "name": "tiny_weights", "out_dir": str(tmp_path / "out"), "results_dir": str(tmp_path / "results"), "seeds": [0],
        "budgets": ["1", "3"], "arms": arms, "init_weights": init_weights, "jobs": 1, "bootstrap": 200, "convergence": None,
        "datasets": [{"name": "synth", "store": str(tmp_path / "main.zarr"), "targets": ["store"],
                      "sites": [{"name": "other", "store": str(tmp_path / "site.zarr")}]}],
        "train": {
            "base": "cpu_small", "model": {"encoder": TINY},
            # lr 1e-9: the weights a run starts from are still there at its end (Adam moves each weight by ~lr per step)
            "pretrain": {"steps": 2, "batch_size": 4, "log_every": 1, "eval_every": 0, "lr": 1e-9},
            "finetune": {"steps": 2, "batch_size": 4, "log_every": 1, "eval_every": 1, "label_fraction": None, "lr": 1e-9},
            "evaluate": {"overlays": 0, "batch_size": 16, "checkpoint": "best"},
            "runtime": {"device": "cpu", "num_workers": 0, "threads": 1, "progress": False, "tensorboard": False},
        },
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def keys(output: str) -> dict[str, str]:
    """label -> key of the dry-run lines."""
    out = {}
    for line in output.splitlines():
        if line.startswith(("todo", "done")):
            _, key, rest = line.split(maxsplit=2)
            out[rest.split("  -> ")[0]] = key
    return out


def close_to(state: dict[str, torch.Tensor], encoder: dict[str, torch.Tensor]) -> bool:
    convs = [k for k, v in encoder.items() if v.ndim == 4]
    return bool(convs) and all(float((state[k] - encoder[k]).abs().max()) < 1e-6 for k in convs)


def test_weight_arms_run_report_and_leave_other_keys_alone(tmp_path, monkeypatch):
    (tmp_path / "weights").mkdir()
    enc = encoder_file(tmp_path / "weights" / "enc.pt", seed=7)
    runner = CliRunner()
    plain = runner.invoke(main, ["study", str(write_study(tmp_path, ["scratch", "end_to_end"], None)), "--dry-run"])
    assert plain.exit_code == 0, plain.output
    path = write_study(tmp_path, ["scratch", "end_to_end", "weights", "weights_end_to_end"])
    dry = runner.invoke(main, ["study", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    before, with_weights = keys(plain.output), keys(dry.output)
    assert all(with_weights[label] == key for label, key in before.items())  # the existing arms' keys are unchanged
    assert len(with_weights) == len(before) + 5  # weights x 2 budgets, its pretraining, weights_end_to_end x 2

    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))  # keep what the plot drew
    res = runner.invoke(main, ["study", str(path)])
    assert res.exit_code == 0, res.output
    rows = list(ledger.read_ledger(tmp_path / "results").values())
    arms = sorted((r["kind"], r["arm"], r["n_labels"]) for r in rows)
    assert arms == sorted([("pretrain", "pretrain", 0), ("pretrain", "weights_pretrain", 0)]
                          + [("finetune", a, n) for a in ("scratch", "end_to_end", "weights", "weights_end_to_end")
                             for n in (1, 3)])
    digest = {"sha256": file_digest(tmp_path / "weights" / "enc.pt")}
    assert all(r.get("init_weights") == (digest if "weights" in r["arm"] else None) for r in rows)
    # pretrainings are also scored on val (the keep_start arm's start)
    assert all(set(r["evals"]) == {"test", "site:other"} | ({"val"} if r["kind"] == "pretrain" else set()) for r in rows)
    by_seed = {}
    for r in rows:
        if r["kind"] == "finetune":
            by_seed.setdefault(r["n_labels"], set()).add(tuple(r["labeled_ids"]))
    assert all(len(v) == 1 for v in by_seed.values())  # paired: the same labeled images in every arm

    root = tmp_path / "out" / "runs" / "synth" / f"weights-enc-{digest['sha256'][:8]}"
    cfg = yaml.safe_load((root / "seed0" / "n001" / "config.yaml").read_text())
    assert cfg["model"]["encoder_weights"] == str(tmp_path / "weights" / "enc.pt") and cfg["finetune"]["init"] == "scratch"
    tuned = ck.load(root / "seed0" / "n001" / "finetune" / "best.pt")
    assert close_to({k[8:]: v for k, v in tuned["model"].items() if k.startswith("encoder.")}, enc)
    pre = ck.load(root / "store" / "seed0" / "pretrain" / "final.pt")
    assert close_to({k[8:]: v for k, v in pre["model"].items() if k.startswith("encoder.")}, enc)
    e2e = yaml.safe_load((root / "store" / "seed0" / "n001" / "end_to_end" / "config.yaml").read_text())
    assert e2e["finetune"]["init"] == "end_to_end" and e2e["model"]["encoder_weights"] is None
    assert e2e["finetune"]["pretrained"] == str(root / "store" / "seed0" / "pretrain" / "final.pt")
    scratch = ck.load(tmp_path / "out" / "runs" / "synth" / "scratch" / "seed0" / "n001" / "finetune" / "best.pt")
    assert not close_to({k[8:]: v for k, v in scratch["model"].items() if k.startswith("encoder.")}, enc)

    assert (tmp_path / "results" / "synth.png").stat().st_size > 1000
    (fig,) = [f for f in figures if f is not None and f.axes and f.axes[0].get_title().startswith("synth")]
    for ax in fig.axes:  # test and site panels: every arm its own colour and marker, the weights' zero-shot dashed
        drawn = {line.get_label(): (to_hex(line.get_color()), line.get_marker(), line.get_linestyle())
                 for line in ax.get_lines()}
        assert drawn["init weights"] == (to_hex("tab:olive"), "P", "-")
        assert drawn["init weights + end-to-end"] == (to_hex("tab:cyan"), "X", "-")
        assert drawn["init weights + pretrain, zero-shot (no labels)"][::2] == (to_hex("tab:brown"), "--")
        solid = [style[:2] for style in drawn.values() if style[2] == "-"]
        assert len(solid) == 4 and len(set(solid)) == 4 and len({c for c, _ in solid}) == 4, drawn
    table = (tmp_path / "results" / "table.md").read_text()
    for text in ("Init weights of the arms", "`enc.pt`", "| init weights |", "init weights + end-to-end",
                 "init weights + pretrain, zero-shot (no labels)", "init weights − scratch",
                 "init weights + end-to-end − init weights", "init weights + end-to-end − end-to-end",
                 "Every arm of a (dataset, seed, labels) used the same labeled images"):
        assert text in table, text

    # other weights: new keys and folders for the weight arms only; the finished runs stay done
    encoder_file(tmp_path / "weights" / "enc.pt", seed=8)
    again = runner.invoke(main, ["study", str(path), "--dry-run"])
    todo = [line for line in again.output.splitlines() if line.startswith("todo")]
    assert len(todo) == 5 and all(" weights" in line for line in todo), again.output


def test_weight_arms_need_init_weights_and_it_needs_them(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["study", str(write_study(tmp_path, ["scratch", "weights"], None)), "--dry-run"])
    assert res.exit_code == 2 and "need init_weights" in res.output, res.output
    res = runner.invoke(main, ["study", str(write_study(tmp_path, ["scratch"], "imagenet")), "--dry-run"])
    assert res.exit_code == 2 and "add one to arms" in res.output, res.output
    res = runner.invoke(main, ["study", str(write_study(tmp_path, ["weights"], "weights/missing.pt")), "--dry-run"])
    assert res.exit_code == 2 and "no such file" in res.output and "missing.pt" in res.output, res.output
    res = runner.invoke(main, ["study", str(write_study(tmp_path, ["scratch", "weights"], "imagenet")), "--dry-run"])
    assert res.exit_code == 0 and "synth/weights-imagenet/seed0/n001" in res.output, res.output  # a name: nothing fetched


def test_every_arm_has_its_own_plot_style():
    from medsass.trainer.study.plot import FALLBACK, LINE_COLORS, STYLE
    from medsass.trainer.study.spec import ARMS, WEIGHT_ARMS

    styles = [STYLE[a] for a in ARMS + WEIGHT_ARMS]
    assert FALLBACK not in styles and len({c for c, _ in styles} | {FALLBACK[0]}) == len(styles) + 1
    assert len({m for _, m in styles}) == len(styles)
    assert not {c for c, _ in styles} & set(LINE_COLORS.values()) and len(set(LINE_COLORS.values())) == len(LINE_COLORS)
