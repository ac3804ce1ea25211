"""The run report: built from constructed run directories (live-run tolerance, per-source val
keys, alarms, config), from a real 2-process EP run, and rendered by a real browser."""

import base64
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from deepseek_moe.report import build_report, read_run
from deepseek_moe.train.moe_health import ExpertLoadsFile
from tests.train.helpers import REPO, TINY, run_train

IMG = re.compile(r'<img alt="plot" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def _images(page):
    """The embedded PNGs, decoded (each must be a real PNG)."""
    out = [base64.b64decode(m) for m in IMG.findall(page)]
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in out)
    return out


def _fake_run(path, *, sources=(), steps=12, cut_last_line=False, alarms=()):
    path.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        row = {"step": s, "loss": 5.0 - 0.1 * s, "lm_loss": 4.9 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0}
        row.update({"tokens_per_s": 1000.0 + s, "mfu": None, "max_memory_gb": None, "step_time_s": 0.5})
        if s % 2 == 0:
            for layer in (1, 2):
                row.update({f"moe/layer{layer}/load_imbalance": 1.2, f"moe/layer{layer}/router_entropy": 2.0})
                row.update({f"moe/layer{layer}/dropped_frac": 0.0, f"moe/layer{layer}/ranks_per_token": 1.5})
                row.update({f"moe/layer{layer}/a2a_bytes": 1e6})
        lines.append(json.dumps(row))
        if s % 6 == 0:
            val = {"step": s, "val_loss": 5.5 - 0.1 * s}
            val.update({f"val_loss/{src}": 5.4 - 0.1 * s for src in sources})
            lines.append(json.dumps(val))
    lines += [json.dumps({"step": a[0], "alarm": a[1], "message": a[2]}) for a in alarms]
    text = "\n".join(lines) + "\n"
    if cut_last_line:
        text += '{"step": 13, "loss": 3.'
    (path / "metrics.jsonl").write_text(text)
    (path / "config.yaml").write_text("trainer:\n  max_steps: 12\nrun_dir: <b>x</b>\n")
    loads = ExpertLoadsFile(path, [1, 2], 8, max_count=10**6)
    loads.truncate_after(0)
    for s in range(2, steps + 1, 2):
        loads.append(s, s - 1, 2, np.arange(16).reshape(2, 8) + s)
    loads.close()
    return path


def test_report_of_constructed_runs(tmp_path):
    a = _fake_run(
        tmp_path / "a", sources=("code", "web"), alarms=[(8, "dead_expert", "layer 1: expert(s) [3] ...")]
    )
    b = _fake_run(tmp_path / "x" / "b", steps=7, cut_last_line=True)
    run = read_run(b)
    assert run.skipped_lines == 1 and run.last_step == 7 and run.status.startswith("in progress")
    assert read_run(a).val_sources == ["code", "web"] and read_run(a).status == "finished"
    page = build_report([a, b])
    # loss, step metrics, router, one heatmap per run, all-to-all
    assert len(_images(page)) == 6
    assert "layer 1: expert(s) [3] ..." in page and "dead_expert" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page  # the config, escaped
    assert "Unreadable metrics lines skipped (a line being written): b: 1" in page
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")  # nothing external


def test_report_without_optional_files(tmp_path):
    run = tmp_path / "dense"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "lr": 1e-3}) + "\n")
    page = build_report([run])
    assert len(_images(page)) == 2  # loss, lr
    assert "No expert_loads.bin" in page and "No alarm was raised." in page and "(no config.yaml)" in page


def test_cli_writes_the_page_and_reports_a_missing_run(tmp_path):
    a = _fake_run(tmp_path / "a")
    proc = subprocess.run(
        [sys.executable, "-m", "deepseek_moe.report", str(a)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert (a / "report.html").exists() and "report: " in proc.stdout
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepseek_moe.report",
            str(a),
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "r.html"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and not (tmp_path / "r.html").exists()
    assert proc.stderr.strip().splitlines() == [
        f"Report error: run directory {tmp_path / 'nope'} does not exist; pass the run_dir of a training run "
        "(it holds metrics.jsonl)"
    ]


@pytest.fixture(scope="module")
def ep2_run(tiny_data, tmp_path_factory):
    """A real 2-process EP=2 run, 8 steps, alarms armed from step 1 with the default thresholds."""
    run_dir = tmp_path_factory.mktemp("ep2") / "run"
    overrides = TINY + tiny_data
    overrides += ["parallel.ep_size=2", "trainer.max_steps=8", "trainer.log_every=2", "trainer.eval_every=4"]
    overrides += ["checkpoint.every=0", "logger=none", "health.warmup_steps=0", "health.spike_window=3"]
    run_train(overrides + [f"run_dir={run_dir}"], nproc=2, launcher="torchrun")
    return run_dir


def test_report_from_a_real_ep2_run(ep2_run):
    run = read_run(ep2_run)
    assert run.status == "finished" and run.layers == [1]
    assert run.loads.steps.tolist() == [2, 4, 6, 8] and run.loads.ep_sizes.tolist() == [2] * 4
    assert run.has("moe/layer1/a2a_bytes") and run.has("moe/layer1/rank_imbalance")
    page = build_report([ep2_run])
    assert len(_images(page)) == 5  # loss, step metrics, router, heatmap, all-to-all
    assert "parallel:\n  ep_size: 2" in page


def test_report_renders_in_a_headless_browser(ep2_run, tmp_path):
    """Chromium (Debian's package) opens the page offline and draws the plots."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip(
            "chromium is not installed (apt-get install chromium); the page is checked without it above"
        )
    from PIL import Image

    def screenshot(html_text, name):
        page = tmp_path / f"{name}.html"
        page.write_text(html_text)
        shot = tmp_path / f"{name}.png"
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--screenshot={shot}",
            ]
            + ["--window-size=1400,3000", f"file://{page}"],
            capture_output=True,
            timeout=120,
            check=True,
        )
        pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
        assert pixels.shape == (3000, 1400, 3)
        # coloured pixels: the plots' lines and the viridis heatmap (text and tables are grey)
        return ((pixels.max(axis=2) - pixels.min(axis=2)) > 60).mean()

    page = build_report([ep2_run])
    with_plots = screenshot(page, "report")
    without = screenshot(IMG.sub("", page), "no_plots")  # the same page, its images removed
    # measured: about 1% with the plots, 0 without them, 4e-5 with broken image data
    assert with_plots > 0.003 and without < 0.0005, (with_plots, without)
