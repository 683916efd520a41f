"""`medsass-train demo` (what `make demo` runs) on the bundled sample, with its steps shrunk through --set."""
import json

from click.testing import CliRunner
from medsass.trainer.cli import main as train

QUICK = ["--set", "pretrain.steps=2", "--set", "finetune.steps=2", "--set", "runtime.threads=1", "--set", "runtime.num_workers=0"]


def test_demo_runs_the_whole_method_on_the_sample_and_resumes(tmp_path):
    out = tmp_path / "demo_out"
    res = CliRunner().invoke(train, ["demo", "--out", str(out), "--workers", "1", "--no-progress", *QUICK])
    assert res.exit_code == 0, res.output
    assert "test: IoU" in res.output and "pseudo-mask floor IoU" in res.output, res.output
    run = out / "run"
    for f in ("pretrain/final.pt", "finetune/final.pt", "evaluate/metrics.json", "evaluate/per_image.csv"):
        assert (run / f).exists(), f
    ft = json.loads((run / "finetune" / "done").read_text())
    assert ft["metrics"]["step"] == 2 and ft["section"]["finetune"]["label_count"] == 3  # the demo's 3 labeled tiles
    assert ft["section"]["model"]["encoder"] == "tu-mobilenetv3_small_100"
    m = json.loads((run / "evaluate" / "metrics.json").read_text())["test"]
    assert m["n"] == 4 and 0 <= m["iou"] <= 1 and 0 <= m["otsu_floor"]["iou"] <= 1  # sample.yaml: test 0.25 of 16

    again = CliRunner().invoke(train, ["demo", "--out", str(out), "--workers", "1", "--no-progress", *QUICK])
    assert again.exit_code == 0, again.output
    assert json.loads((run / "finetune" / "done").read_text()) == ft  # finished stages are skipped, not redone

    bad = CliRunner().invoke(train, ["demo", "--out", str(tmp_path / "bad"), "--no-progress", "--set", "pretrain.stepz=2"])
    assert bad.exit_code == 2 and "stepz" in bad.output, bad.output
    assert not (tmp_path / "bad").exists()  # refused before the prep step
