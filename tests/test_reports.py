"""HTML reports: ``medsass-prep report`` (a store) and ``medsass-train report`` (a run folder).

Builder tests read the HTML as text; the browser test opens both pages in real headless Chromium
(installed by .ci/services/chromium.sh when possible) and checks that they load offline with no
console error, that every image decodes, and that the rendered page is not blank.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from medsass.pipeline.report import build_store_report
from medsass.trainer.report import build_run_report

from medsass import html_report as H
from medsass import manifest
from medsass.testing import make_synthetic_store

FAILED = [("decode_error", "cannot decode JPEG 2000: truncated data"), ("decode_error", "cannot decode: bad marker"),
          ("missing_plugin", "install pylibjpeg-libjpeg to decode JPEG")]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """40 records (about half labeled, every 5th degenerate) plus 3 failed inputs and 1 skipped one."""
    path = make_synthetic_store(tmp_path_factory.mktemp("rep") / "s.zarr", n=40, size=32, labeled_fraction=0.5,
                                degenerate_every=5, seed=1)
    rows = manifest.read_table(manifest.manifest_path(path)).to_pylist()
    rows += [manifest.empty_row(sample_id=f"bad/{i}.dcm", source=f"/data/bad/{i}.dcm", status="failed", reason_code=c, reason=r)
             for i, (c, r) in enumerate(FAILED)]
    rows.append(manifest.empty_row(sample_id="notes.txt", source="/data/notes.txt", status="skipped", reason_code="not_an_image",
                                   reason="not a DICOM, PNG, JPEG, TIFF, GIF or BMP file (by content)"))
    manifest.write_table(manifest.rows_to_table(rows), manifest.manifest_path(path))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder laid out as run_stages writes it (curves, done markers, evaluate outputs, overlays)."""
    run = tmp_path_factory.mktemp("run") / "run"
    for stage, n in (("pretrain", 30), ("finetune", 20)):
        (run / stage).mkdir(parents=True)
        lines = [{"step": s, "loss": 1.0 / s, "lr": 3e-4, "samples_per_s": 10.0} for s in range(1, n + 1)]
        lines += [{"step": s, "val_iou": 0.5 + s / 100, "best_val_iou": 0.5 + s / 100} for s in (10, 20)]
        (run / stage / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 9')  # torn last line
        (run / stage / "done").write_text(json.dumps({"stage": stage, "metrics": {"step": n, "best_val_iou": 0.7}, "init": "end_to_end"}))
    ev = run / "evaluate"
    (ev / "overlays").mkdir(parents=True)
    metrics = {"test": {"iou": 0.6621, "dice": 0.7967, "iou_per_image_mean": 0.7204, "dice_per_image_mean": 0.8025, "n": 4,
                        "otsu_floor": {"iou": 0.7842, "iou_per_image_mean": 0.7833, "dice": 0.879}}}
    (ev / "metrics.json").write_text(json.dumps(metrics))
    csv_rows = ["split,store,sample_id,row,iou,dice,pseudo_iou,tp,fp,fn,tn"]
    rng = np.random.default_rng(0)
    for i, row in enumerate((3, 5)):
        csv_rows.append(f"test,main,case_{row}.png,{row},0.{5 + i},0.7,0.6,1,1,1,1")
        img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        (ev / "overlays" / f"test_best{i + 1}_main_row{row}_iou0.{5 + i}00.png").write_bytes(H.png_bytes(img))
        (ev / "overlays" / f"test_worst{i + 1}_main_row{row}_iou0.{5 + i}00.png").write_bytes(H.png_bytes(img))
    (ev / "per_image.csv").write_text("\n".join(csv_rows) + "\n")
    (run / "config.yaml").write_text("out_dir: runs/x\nstores:\n  main: data/<store>.zarr\nmodel:\n  encoder: resnet18\n")
    return run


def images(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', html)


def test_store_report_counts_failures_thumbnails_and_no_external_urls(store):
    html = build_store_report(store, n_samples=12, seed=0)
    assert "http" not in html and "<script" not in html and "<link" not in html
    assert all(src.startswith("data:image/png;base64,") for src in images(html))
    assert re.search(r"<td>stored \(ok\)</td><td class=\"num\">40</td>", html)
    assert re.search(r"<td>failed</td><td class=\"num\">3</td>", html) and re.search(r"<td>skipped</td><td class=\"num\">1</td>", html)
    assert "failed: decode_error (2)" in html and "failed: missing_plugin (1)" in html and "skipped: not_an_image (1)" in html
    for _, reason in FAILED:
        assert H.esc(reason) in html
    sample = html.split("Sample of records")[1].split("<h2>")[0]
    assert sample.count("<figure>") == 12
    flagged = html.split("QC-flagged and degenerate records")[1].split("<h2>")[0]
    assert "synthetic/00004.png" in flagged and "fg_low" in flagged
    assert "per-image IoU, pseudo-mask vs real mask" not in html  # that is inside the PNG, not the text
    assert "mean IoU" in html and "Lowest" in html


def test_store_report_sample_is_seeded_and_capped(store):
    from medsass.pipeline.report import sample_records

    ok = manifest.read_manifest(store).query("status == 'ok'")
    assert list(sample_records(ok, 5, 0).row) == list(sample_records(ok, 5, 0).row) != list(sample_records(ok, 5, 1).row)
    assert len(sample_records(ok, 500, 0)) == 40 and sample_records(ok, 0, 0).empty
    part = build_store_report(store, n_samples=5, seed=1).split("Sample of records")[1].split("<h2>")[0]
    assert re.findall(r"<figcaption>(synthetic/\d+\.png)", part) == list(sample_records(ok, 5, 1).sample_id)


def test_store_without_labels_says_iou_cannot_be_scored(tmp_path):
    html = build_store_report(make_synthetic_store(tmp_path / "u.zarr", n=6, size=32, labeled_fraction=0.0), n_samples=3)
    assert "cannot be scored" in html and "No failed inputs" in html


def test_prep_report_cli(store, tmp_path):
    from medsass.pipeline.cli import main

    res = CliRunner().invoke(main, ["report", str(store), "--out", str(tmp_path / "r.html"), "--n-samples", "4", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.html").read_text().count("<figure>") >= 4


def test_run_report_curves_metrics_overlays_config(run_dir):
    html = build_run_report(run_dir)
    assert "http" not in html and "<script" not in html
    assert all(src.startswith("data:image/png;base64,") for src in images(html))
    assert "pretrain: training curves" in html and "finetune: training curves" in html
    assert "pseudo-mask floor IoU" in html and "0.7842" in html and "0.6621" in html
    assert html.count("<figure>") == 4 and "case_3.png" in html and "test: worst" in html
    assert "encoder: resnet18" in html and "data/&lt;store&gt;.zarr" in html  # config shown, escaped


def test_train_report_cli_default_path_and_bad_folder(run_dir, tmp_path):
    from medsass.trainer.cli import main

    res = CliRunner().invoke(main, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert (run_dir / "report.html").exists() and res.output.strip().endswith("report.html")
    bad = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "not a medsass run folder" in bad.output


# -- real headless Chromium ------------------------------------------------------------------

CHECK = """<script>
window.__errors = [];
const __ce = console.error;
console.error = function (...a) { window.__errors.push(a.join(" ")); __ce.apply(console, a); };
window.addEventListener("error", e => window.__errors.push(e.message || ("failed to load " + String((e.target && (e.target.src || e.target.href)) || "?").slice(0, 60))), true);
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const out = document.createElement("pre");
  out.id = "medsass-check";
  out.textContent = JSON.stringify({images: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length,
                                    errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("headless Chromium is not installed (run `bash .ci/services/chromium.sh start` as root to install Debian's chromium)")
    return exe


def open_in_chromium(html_path: Path, tmp_path: Path) -> tuple[dict, Path, str]:
    """Load a copy of the page with a check script added; return its result, a screenshot and the browser log."""
    probe = tmp_path / f"{html_path.stem}_check.html"
    probe.write_text(html_path.read_text().replace("<head>", "<head>" + CHECK, 1))
    shot = tmp_path / f"{html_path.stem}.png"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
           "--virtual-time-budget=10000", "--window-size=1200,1600", f"--screenshot={shot}", "--dump-dom", probe.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r'<pre id="medsass-check">(.*?)</pre>', res.stdout, re.DOTALL)
    assert found, f"no check result from chromium (exit {res.returncode}): {res.stderr[-2000:]}"
    import html as _html

    return json.loads(_html.unescape(found.group(1))), shot, res.stderr


@pytest.mark.parametrize("kind", ["store", "run"])
def test_reports_render_in_headless_chromium(kind, store, run_dir, tmp_path):
    from PIL import Image

    chromium()
    page = tmp_path / f"{kind}_report.html"
    page.write_text(build_store_report(store, n_samples=8) if kind == "store" else build_run_report(run_dir))
    result, shot, log = open_in_chromium(page, tmp_path)
    assert result["errors"] == [] and result["broken"] == 0, result
    assert result["images"] >= (10 if kind == "store" else 6)
    console = [ln for ln in log.splitlines() if ":CONSOLE" in ln]
    assert console == [], console
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1600, 1200) and pixels.std() > 10 and (pixels < 200).mean() > 0.01  # not blank
