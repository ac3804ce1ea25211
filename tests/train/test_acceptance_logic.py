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
    line = acc.table([{"case": "tiny", "experts_impl": "loop", **got}]).splitlines()[2]
    assert line.startswith(
        "| tiny | loop | 1,000 | 4 (3) | 0.5000 | 2,000 | 30.0% | 5.50 (GPU max allocated)"
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
