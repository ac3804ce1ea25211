"""The README's first export command ("After training") works on the run the README makes just
before it: the default preset (device-limited routing), trained by train.py."""

from __future__ import annotations

import json
import shlex

import pytest

from deepseek_moe.export.__main__ import main
from tests.train.helpers import REPO, compose_config, run_train


def _readme_command() -> list[str]:
    """The "After training" command for `runs/default`, as the README prints it."""
    section = (REPO / "README.md").read_text().split("## After training", 1)[1]
    line = next(
        line for line in section.splitlines() if line.startswith("python -m deepseek_moe.export runs/default")
    )
    return shlex.split(line.split("#", 1)[0])


def test_readme_export_command_works_on_a_default_run(tiny_data, tmp_path, capsys):
    moe = compose_config([]).model.moe
    assert moe.topk_groups < moe.n_groups  # the premise: the default preset limits groups
    run_dir = tmp_path / "runs" / "default"
    run_train(
        tiny_data  # the default preset: no model.* override
        + ["logger=none", f"run_dir={run_dir}", "trainer.max_steps=1", "trainer.eval_every=0"]
        + ["trainer.seq_len=64", "trainer.global_batch_size=2", "trainer.micro_batch_size=2"]
    )
    cmd = _readme_command()
    assert cmd[:3] == ["python", "-m", "deepseek_moe.export"]
    args = [str(run_dir) if a == "runs/default" else a for a in cmd[3:]]
    out = tmp_path / args[args.index("--out") + 1]
    args[args.index("--out") + 1] = str(out)

    main(args)
    printed = capsys.readouterr().out
    assert "accepted change: device-limited routing" in printed and "becomes plain top-4" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek" and config["num_experts_per_tok"] == moe.top_k
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()

    # without the flag the README names, the same command is refused and names it
    without = [a for a in args if a != "--drop-group-limit"] + ["--force"]
    with pytest.raises(SystemExit) as exit_:
        main(without)
    assert exit_.value.code == 1
    assert "[--drop-group-limit accepts]" in capsys.readouterr().err
