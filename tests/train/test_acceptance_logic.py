"""The GPU acceptance script's bookkeeping, on synthetic metrics (the script itself runs end to
end on CPU with `bash bench/gpu/acceptance.sh OUT --cpu`; too slow for the suite)."""

import importlib.util
import json

import pytest

from tests.train.helpers import REPO


def _acceptance():
    spec = importlib.util.spec_from_file_location("acceptance", REPO / "bench" / "gpu" / "acceptance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_and_table_from_metrics(tmp_path):
    acc = _acceptance()
    rows = [
        {
            "step": s,
            "loss": 5.0 - s,
            "lm_loss": 4.0 - s / 2,
            "step_time_s": t,
            "tokens_per_s": 1000 / t,
            "mfu": 0.1 * s,
            "max_memory_gb": 1.5 + s,
        }
        for s, t in [(1, 9.0), (2, 0.5), (3, 0.25), (4, 0.5)]
    ]
    rows.insert(2, {"step": 2, "val_loss": 3.0})  # eval lines are not steps
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = acc.summarize(path, warmup=1, max_rss_gb=0.7)
    assert got["steps"] == 4 and got["timed_steps"] == 3 and got["tokens_per_step"] == 1000
    assert got["step_s"] == 0.5 and got["tokens_per_s"] == 2000  # median over steps 2-4
    assert got["mfu"] == pytest.approx(0.3) and got["peak_mem_gb"] == 5.5
    assert (got["loss_first"], got["loss_last"]) == (3.5, 2.0)
    row = {"case": "tiny", "experts_impl": "auto", "experts_impl_resolved": "grouped_mm", "status": "passed"}
    line = acc.table([{**row, **got}]).splitlines()[2]
    assert line.startswith(
        "| tiny | auto (grouped_mm) | passed | 1,000 | 4 (3) | 0.5000 | 2,000 | 30.0% | 5.50 (GPU max allocated)"
    )
    # without GPU numbers: the host's max RSS, and no MFU
    cpu = [{k: (None if k in ("mfu", "max_memory_gb") else v) for k, v in r.items()} for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in cpu))
    got = acc.summarize(path, warmup=1, max_rss_gb=0.7)
    assert got["mfu"] is None and (got["peak_mem_gb"], got["peak_mem_kind"]) == (0.7, "host max RSS")


def test_experts_impls_start_with_the_default():
    from deepseek_moe.config.model import MoEConfig

    impls = _acceptance().experts_impls()
    assert impls[0] == MoEConfig.__dataclass_fields__["experts_impl"].default
    assert impls[-1] == "loop" and len(impls) == len(set(impls))


def test_failed_and_skipped_cases_keep_their_row_and_fail_the_run(tmp_path):
    """A failed case does not stop the others or lose the table; the exit status says it failed."""
    import argparse

    acc = _acceptance()
    rows = [
        {"case": "tiny", "experts_impl": "auto", "status": "FAILED: exit 1: ConfigError: bad"},
        {"case": "16b-shaped", "experts_impl": "loop", "status": "skipped: time budget of 330 s used"},
    ]
    lines = acc.table(rows).splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "FAILED: exit 1: ConfigError: bad" in lines[2] and "skipped" in lines[3]
    args = argparse.Namespace(out=tmp_path, cpu=True, warmup=1, budget_s=330.0, tests_rc=0)
    assert acc.write_report(args, 4, rows, 1.0) is False
    assert "FAILED" in (tmp_path / "acceptance.md").read_text().splitlines()[0]
    assert json.loads((tmp_path / "acceptance.json").read_text())["passed"] is False


def test_cases_run_the_default_implementation_first():
    acc = _acceptance()
    plan = acc.plan_cases(cpu=True)
    impls = [impl for _, impl, _ in plan]
    default = acc.experts_impls()[0]
    assert impls[: len(acc.CASES)] == [default] * len(acc.CASES)
    assert {name for name, _, _ in plan} == set(acc.CASES)


def _wheel(folder, name, version, requires=()):
    import zipfile

    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_wheel_check_against_installed_and_carried_packages(tmp_path):
    spec = importlib.util.spec_from_file_location("check_wheels", REPO / "bench" / "gpu" / "check_wheels.py")
    cw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cw)
    installed = {"pyarrow": "19.0.0", "fsspec": "2026.11.0", "huggingface-hub": "1.33.0"}.get
    wheels = [
        _wheel(
            tmp_path,
            "datasets",
            "5.2.0",
            [
                "pyarrow>=24.0.0",
                "fsspec<=2026.9.0",
                "dill<0.4.2",
                "huggingface-hub<3.0,>=1.31.0",
                "pytest; extra == 'dev'",
            ],
        ),
        _wheel(tmp_path, "dill", "0.4.1"),
        _wheel(tmp_path, "hydra_core", "1.3.8", ["omegaconf<2.4,>=2.2", "antlr4-python3-runtime==4.9.*"]),
        _wheel(tmp_path, "omegaconf", "2.3.1"),
    ]
    fatal, ranges = cw.problems(wheels, installed=installed)
    # antlr4 is neither carried nor installed; the extra's pytest is not needed
    assert fatal == [
        "hydra_core 1.3.8 needs antlr4-python3-runtime==4.9.*: not installed and not carried; add its wheel"
    ]
    assert sorted(r.split(":")[0] for r in ranges) == [
        "datasets 5.2.0 needs fsspec<=2026.9.0",
        "datasets 5.2.0 needs pyarrow>=24.0.0",
    ]
    # two versions of one package in the folder
    wheels.append(_wheel(tmp_path, "omegaconf", "2.3.0"))
    fatal, _ = cw.problems(wheels, installed=installed)
    assert any("omegaconf: two wheels" in line for line in fatal)
