"""The command line: JSON on stdout and one summary line; user errors are one line, exit 1
(like `python -m deepseek_moe.export`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from deepseek_moe.evaluate.__main__ import main
from tests.evaluate.conftest import STEPS, cli_env
from tests.train.helpers import REPO


def test_json_on_stdout_and_one_summary_line(ep2_run, capsys):
    main([str(ep2_run["run"]), "--sequences", "4", "--routing-stats"])
    out, err = capsys.readouterr()
    result = json.loads(out)
    for key in ("val_loss", "perplexity", "sequences", "tokens", "step", "disable_top_experts", "routing"):
        assert key in result
    assert result["routing"][0]["layer"] == 1 and len(result["routing"][0]["load"]) == 4
    (line,) = [line for line in err.splitlines() if "val_loss" in line]
    assert line.startswith(f"{ep2_run['run']} step {STEPS}: val_loss ") and "on 4 x 64 tokens of" in line


def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 1
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line.lower()]
    assert len(lines) == 1, err
    return lines[0]


def test_user_errors_are_one_line(ep2_run, tmp_path, capsys):
    line = _one_line_error(capsys, [str(tmp_path / "missing")])
    assert line.startswith("Evaluate error:") and "does not exist" in line
    line = _one_line_error(capsys, [str(ep2_run["hf"])])
    assert "holds no data" in line and "data.out_dir=" in line
    line = _one_line_error(capsys, [str(ep2_run["run"]), "--disable-top-experts", "3"])
    assert "--disable-top-experts" in line and "use at most 2" in line
    line = _one_line_error(capsys, [str(ep2_run["run"]), "model.hidden_size=8"])
    assert "cannot override 'model.hidden_size=8'" in line
    line = _one_line_error(capsys, [str(ep2_run["run"]), "data.no_such_key=1"])
    assert line.startswith("Config error:") and "data.no_such_key" in line
    # a model whose vocabulary is smaller than the prepared tokenizer's
    small = tmp_path / "small_vocab"
    shutil.copytree(ep2_run["hf"], small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
    line = _one_line_error(capsys, [str(small), f"data.out_dir={ep2_run['data']}"])
    assert line.startswith("Config error: model.vocab_size=256 is smaller than the tokenizer vocab 512")


def test_the_module_command_exits_1_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "deepseek_moe.evaluate", str(tmp_path / "missing")],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("Evaluate error:")


def test_the_module_command_writes_only_json_to_stdout(ep2_run):
    """DeepSpeed logs to stdout when imported; the command sends that to stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "deepseek_moe.evaluate", str(ep2_run["run"]), "--sequences", "4"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["sequences"] == 4
    assert "val_loss" in proc.stderr.strip().splitlines()[-1]
