"""GPU acceptance trainings: short bf16 runs of the real trainer, and a table of what they did.

    python bench/gpu/acceptance.py --out DIR           # on a GPU (bench/gpu/acceptance.sh calls it)
    python bench/gpu/acceptance.py --out DIR --cpu     # the same logic on CPU with tiny sizes

Cases (one fresh process each, one device, bf16, ZeRO-1, 2 micro-batches per step so the fp32
gradient accumulation runs):
- `tiny`: the default preset (conf/model/deepseek_moe_tiny.yaml);
- `16b-shaped`: conf/model/deepseek_moe_16b.yaml at full width (hidden 2048, 64 routed experts
  of width 1408, top-6, 2 shared) but 3 layers (1 dense + 2 MoE), sequences of 2048 tokens.
Each case runs with the configured experts implementation and, when `model.moe.experts_impl`
exists and its default is not "loop", again with `experts_impl=loop` for comparison.

The data is the python_stdlib corpus, prepared once (4096-token vocab). Runs write no checkpoint
(a 16B-shaped save would be tens of GB of disk for nothing). For each run the table gives the
median optimizer-step time over the steps after the first `--warmup`, tokens/s from it, the
trainer's MFU (null where the device's peak is not in deepseek_moe/train/metrics.py), the peak
memory (GPU: torch's max allocated; CPU: the process's max RSS) and the LM loss of the first
and last step. DIR gets acceptance.md (the table with the versions and the command) and
acceptance.json; run directories go to a temporary folder.

Every case gets a row, whatever happens: passed, FAILED (with the last line of its output, the
full output in DIR/acceptance.log) or skipped (the data preparation failed, or `--budget-s` ran
out: the default-implementation cases run first, the "loop" comparisons last). The table is
always written; the exit status is 0 only when the GPU tests and every case passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DATA = [
    "data.max_documents=300",
    "data.vocab_size=4096",
    "data.val_fraction=0.05",
    "data.tokenizer_sentences=50000",
    "data.num_proc=4",
]
COMMON = [
    "logger=none",
    "trainer.eval_every=0",
    "checkpoint.every=0",
    "trainer.log_every=1000",
    "optim.warmup_steps=1",
    "trainer.precision=bf16",
    "parallel.zero_stage=1",
]

# name -> (GPU overrides, CPU dry-run overrides: the same structure at tiny sizes)
CASES = {
    "tiny": (
        ["model=deepseek_moe_tiny", "trainer.micro_batch_size=8", "trainer.global_batch_size=16"],
        [
            "model=deepseek_moe_tiny",
            "trainer.seq_len=64",
            "trainer.micro_batch_size=2",
            "trainer.global_batch_size=4",
        ],
    ),
    "16b-shaped": (
        [
            "model=deepseek_moe_16b",
            "model.num_layers=3",
            "trainer.seq_len=2048",
            "trainer.micro_batch_size=4",
            "trainer.global_batch_size=8",
        ],
        [
            "model=deepseek_moe_16b",
            "model.num_layers=3",
            "model.hidden_size=64",
            "model.num_heads=2",
            "model.num_kv_heads=2",
            "model.head_dim=32",
            "model.intermediate_size=128",
            "model.moe.n_routed_experts=8",
            "model.moe.moe_intermediate_size=32",
            "model.moe.top_k=2",
            "trainer.seq_len=64",
            "trainer.micro_batch_size=2",
            "trainer.global_batch_size=4",
        ],
    ),
}


def experts_impls() -> list[str]:
    """The configured experts implementation, plus "loop" when the key exists and differs."""
    from deepseek_moe.config.model import MoEConfig

    fields = {f.name: f for f in dataclasses.fields(MoEConfig)}
    if "experts_impl" not in fields:
        return [""]
    default = fields["experts_impl"].default
    return [default] + (["loop"] if default != "loop" else [])


# ---- worker: one training in this process ------------------------------------------------------
def worker(overrides: list[str], out: Path) -> None:
    from hydra import compose, initialize_config_dir

    from deepseek_moe.train.cli import register_schema, to_run_config
    from deepseek_moe.train.trainer import Trainer

    class NoSaveTrainer(Trainer):
        """The real trainer, minus checkpoint files (see the module docstring)."""

        def save_checkpoint(self):
            self.checkpoints.last_saved_step = self.step

    from deepseek_moe.model.experts import RoutedExperts, resolve_impl
    from deepseek_moe.train.distributed import shutdown_distributed

    register_schema()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=overrides))
    trainer = NoSaveTrainer(cfg)
    summary = trainer.fit()
    resolved = None  # the path the experts ran: what "auto" became on this device and dtype
    experts = next((m for m in trainer.model.modules() if isinstance(m, RoutedExperts)), None)
    if experts is not None:
        w = experts.gate_up_proj
        aligned = experts.dim % 8 == 0 and experts.hidden % 8 == 0
        resolved = resolve_impl(experts.impl, w.device, w.dtype, aligned)
    # as train.py does after a successful run: a group left to interpreter exit can abort it
    shutdown_distributed()
    summary = {**summary, "experts_impl_resolved": resolved}
    out.write_text(
        json.dumps(
            {"summary": summary, "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        )
    )


def prepare(data_overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from data_prep.prepare import ensure_prepared
    from deepseek_moe.train.cli import register_schema, to_run_config

    register_schema()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=data_overrides))
    ensure_prepared(cfg.data)


# ---- driver --------------------------------------------------------------------------------------
def _run(args: list[str], log, timeout_s: float) -> str | None:
    """Run this script with `args` in a fresh process; None on success, else why it failed (the
    last line of its output, which for our errors is the one-line message)."""
    try:
        proc = subprocess.run(
            [sys.executable, __file__, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as err:
        log.write(
            f"$ {' '.join(args)}\nTIMEOUT after {timeout_s:.0f} s\n{err.stdout or ''}\n{err.stderr or ''}\n"
        )
        log.flush()
        return f"timed out after {timeout_s:.0f} s"
    log.write(f"$ {' '.join(args)}\n{proc.stdout}\n{proc.stderr}\n")
    log.flush()
    if proc.returncode == 0:
        return None
    # our errors end stderr with one line naming the problem (a traceback ends with it too)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    lines = lines or [line for line in proc.stdout.splitlines() if line.strip()]
    return f"exit {proc.returncode}: {lines[-1][:300] if lines else 'no output'}"


def summarize(metrics_path: Path, warmup: int, max_rss_gb: float) -> dict:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    timed = train[warmup:] or train
    step_s = statistics.median(r["step_time_s"] for r in timed)
    tokens_per_step = train[0]["tokens_per_s"] * train[0]["step_time_s"]
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    gpu_mem = [r["max_memory_gb"] for r in train if r.get("max_memory_gb") is not None]
    return {
        "steps": len(train),
        "timed_steps": len(timed),
        "tokens_per_step": round(tokens_per_step),
        "step_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "mfu": statistics.median(mfus) if mfus else None,
        "peak_mem_gb": max(gpu_mem) if gpu_mem else max_rss_gb,
        "peak_mem_kind": "GPU max allocated" if gpu_mem else "host max RSS",
        "loss_first": train[0]["lm_loss"],
        "loss_last": train[-1]["lm_loss"],
    }


def environment() -> dict:
    import torch

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": "cpu",
    }
    env["capability"] = "n/a"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        env["deepspeed"] = None
    return env


def table(results: list[dict]) -> str:
    """One row per case, failed and skipped ones included (their numbers left empty)."""
    lines = [
        "| case | experts_impl (ran) | status | tokens/step | steps (timed) | step time s | tokens/s | "
        "MFU | peak memory GB | LM loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        impl = r["experts_impl"] or "n/a"
        if r.get("experts_impl_resolved"):
            impl += f" ({r['experts_impl_resolved']})"
        if r["status"] != "passed":
            lines.append(f"| {r['case']} | {impl} | {r['status']} |" + " |" * 7)
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {r['case']} | {impl} | passed | {r['tokens_per_step']:,} | "
            f"{r['steps']} ({r['timed_steps']}) | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | "
            f"{mfu} | {r['peak_mem_gb']:.2f} ({r['peak_mem_kind']}) | "
            f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
        )
    return "\n".join(lines)


def plan_cases(cpu: bool) -> list[tuple[str, str, list[str]]]:
    """(case, experts_impl, overrides) in the order they run: every case with the default
    experts implementation first (the configuration users get), then the "loop" comparisons, so
    a run cut short by the time budget loses the comparisons first."""
    impls = experts_impls()
    order = [(name, impls[0]) for name in CASES] + [(name, impl) for impl in impls[1:] for name in CASES]
    return [(name, impl, CASES[name][1 if cpu else 0]) for name, impl in order]


def run_cases(args, steps: int, log, tmp: str) -> list[dict]:
    """Prepare the data, then every case in a fresh process. Each case is recorded whatever
    happens: passed (with its numbers), FAILED (the last line of its output) or skipped (the
    time budget ran out, or the data preparation failed)."""
    t_start = time.time()
    # data prepared beforehand (fetch_wheels.sh puts it next to the wheels): nothing to tokenize
    data = [f"data.out_dir={args.data or Path(tmp) / 'data'}", *DATA]
    prepare_error = _run(["--prepare", json.dumps(data)], log, timeout_s=args.budget_s)
    results = []
    for name, impl, case_overrides in plan_cases(args.cpu):
        row = {"case": name, "experts_impl": impl}
        left = args.budget_s - (time.time() - t_start)
        if prepare_error is not None:
            results.append({**row, "status": f"skipped: data preparation failed ({prepare_error})"})
            continue
        if left < 30:
            results.append({**row, "status": f"skipped: time budget of {args.budget_s:.0f} s used"})
            continue
        run_dir = Path(tmp) / f"{name}_{impl or 'default'}"
        overrides = [*case_overrides, *COMMON, *data, f"trainer.max_steps={steps}", f"run_dir={run_dir}"]
        if impl:
            overrides.append(f"model.moe.experts_impl={impl}")
        if args.cpu:
            overrides.append("trainer.reuse_host_memory=false")
        out_json = Path(tmp) / f"{run_dir.name}.json"
        t0 = time.time()
        error = _run(["--worker", json.dumps(overrides), str(out_json)], log, timeout_s=left)
        row["wall_s"] = round(time.time() - t0, 1)
        if error is None:
            info = json.loads(out_json.read_text())
            row.update(status="passed", experts_impl_resolved=info["summary"].get("experts_impl_resolved"))
            row.update(summarize(run_dir / "metrics.jsonl", args.warmup, info["max_rss_gb"]))
            print(
                f"{name} {impl}: {row['step_s']:.4f} s/step, {row['tokens_per_s']:,.0f} tok/s, "
                f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}",
                flush=True,
            )
        else:
            row["status"] = f"FAILED: {error}"
            print(f"{name} {impl}: {row['status']}", flush=True)
        results.append(row)
    return results


def write_report(args, steps: int, results: list[dict], total_s: float) -> bool:
    """acceptance.md and acceptance.json in args.out; True when the tests and every case passed."""
    env = environment()
    passed = all(r["status"] == "passed" for r in results) and args.tests_rc in (None, 0)
    report = {
        "environment": env,
        "mode": "cpu dry run" if args.cpu else "gpu",
        "steps": steps,
        "warmup": args.warmup,
        "budget_s": args.budget_s,
        "gpu_tests_exit_code": args.tests_rc,
        "passed": passed,
        "results": results,
        "total_s": total_s,
    }
    (args.out / "acceptance.json").write_text(json.dumps(report, indent=2) + "\n")
    tests = {None: "not run", 0: "passed"}.get(args.tests_rc, f"FAILED (exit {args.tests_rc})")
    if args.cpu and args.tests_rc == 0:
        tests = "skipped (no CUDA)"
    md = (
        f"# GPU acceptance ({report['mode']}): {'PASSED' if passed else 'FAILED'}\n\n"
        f"{env['date_utc']} UTC; device {env['device']} (compute capability {env['capability']}); "
        f"python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), DeepSpeed {env['deepspeed']}.\n\n"
        f"Command: `bash bench/gpu/acceptance.sh OUT{' --cpu' if args.cpu else ''} --steps {steps}`; "
        f"GPU tests (`pytest -m gpu tests/gpu`): {tests}.\n"
        f"{steps} optimizer steps per run, timings over the steps after the first {args.warmup}; "
        f"bf16, ZeRO-1, one device, 2 micro-batches per step. experts_impl (ran): the configured "
        f"value and the path it resolved to on this device.\n\n{table(results)}\n\n"
        f"Total {total_s:.0f} s (budget for the runs {args.budget_s:.0f} s).\n"
    )
    (args.out / "acceptance.md").write_text(md)
    print(md)
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="where acceptance.md/.json go (required)")
    parser.add_argument("--cpu", action="store_true", help="dry run on CPU with tiny sizes")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default 30 on GPU, 4 with --cpu)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed first steps (default 5, 1 with --cpu)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds for data preparation and all runs; cases that would start later are "
        "recorded as skipped (default 300 on a GPU: with the preflight and the GPU tests the "
        "whole script stays under 8 min; 1200 for the --cpu dry run)",
    )
    parser.add_argument(
        "--tests-rc", type=int, default=None, help="exit code of the GPU tests, for the report"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a data directory prepared beforehand with --prepare-data (default: prepare now)",
    )
    parser.add_argument(
        "--prepare-data", type=Path, metavar="DIR", help="prepare the acceptance corpus into DIR and exit"
    )
    parser.add_argument("--worker", nargs=2, metavar=("OVERRIDES_JSON", "OUT_JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", metavar="OVERRIDES_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker[0]), Path(args.worker[1]))
        return
    if args.prepare:
        prepare(json.loads(args.prepare))
        return
    if args.prepare_data:
        prepare([f"data.out_dir={args.prepare_data.absolute()}", *DATA])
        return

    if args.out is None:
        parser.error("--out is required")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --cpu for the dry run")
    steps = args.steps or (4 if args.cpu else 30)
    if args.budget_s is None:
        args.budget_s = 1200.0 if args.cpu else 300.0
    if args.warmup is None:
        args.warmup = 1 if args.cpu else 5
    args.warmup = min(args.warmup, max(steps - 1, 0))
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    with (
        tempfile.TemporaryDirectory(prefix="acceptance_") as tmp,
        open(args.out / "acceptance.log", "w", encoding="utf-8") as log,
    ):
        results = run_cases(args, steps, log, tmp)
    sys.exit(0 if write_report(args, steps, results, time.time() - t_start) else 1)


if __name__ == "__main__":
    main()
