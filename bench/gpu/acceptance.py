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

    register_schema()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=overrides))
    summary = NoSaveTrainer(cfg).fit()
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
def _run(args: list[str], log) -> None:
    proc = subprocess.run([sys.executable, __file__, *args], cwd=REPO, capture_output=True, text=True)
    log.write(f"$ {' '.join(args)}\n{proc.stdout}\n{proc.stderr}\n")
    log.flush()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{args[:2]} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


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
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        env["deepspeed"] = None
    return env


def table(results: list[dict]) -> str:
    lines = [
        "| case | experts_impl | tokens/step | steps (timed) | step time s | tokens/s | MFU | "
        "peak memory GB | LM loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {r['case']} | {r['experts_impl'] or 'n/a'} | {r['tokens_per_step']:,} | "
            f"{r['steps']} ({r['timed_steps']}) | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | "
            f"{mfu} | {r['peak_mem_gb']:.2f} ({r['peak_mem_kind']}) | "
            f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
        )
    return "\n".join(lines)


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
        "--tests-rc", type=int, default=None, help="exit code of the GPU tests, for the report"
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

    if args.out is None:
        parser.error("--out is required")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --cpu for the dry run")
    steps = args.steps or (4 if args.cpu else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 5)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    t_start = time.time()
    with (
        tempfile.TemporaryDirectory(prefix="acceptance_") as tmp,
        open(args.out / "acceptance.log", "w", encoding="utf-8") as log,
    ):
        data = [f"data.out_dir={tmp}/data", *DATA]
        _run(["--prepare", json.dumps(data)], log)
        for name, (gpu_overrides, cpu_overrides) in CASES.items():
            for impl in experts_impls():
                run_dir = Path(tmp) / f"{name}_{impl or 'default'}"
                overrides = [
                    *(cpu_overrides if args.cpu else gpu_overrides),
                    *COMMON,
                    *data,
                    f"trainer.max_steps={steps}",
                    f"run_dir={run_dir}",
                ]
                if impl:
                    overrides.append(f"model.moe.experts_impl={impl}")
                if args.cpu:
                    overrides.append("trainer.reuse_host_memory=false")
                out_json = Path(tmp) / f"{run_dir.name}.json"
                t0 = time.time()
                _run(["--worker", json.dumps(overrides), str(out_json)], log)
                info = json.loads(out_json.read_text())
                row = {
                    "case": name,
                    "experts_impl": impl,
                    "wall_s": time.time() - t0,
                    **summarize(run_dir / "metrics.jsonl", warmup, info["max_rss_gb"]),
                }
                results.append(row)
                print(
                    f"{name} {impl}: {row['step_s']:.4f} s/step, {row['tokens_per_s']:,.0f} tok/s, "
                    f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}",
                    flush=True,
                )
    env = environment()
    report = {
        "environment": env,
        "mode": "cpu dry run" if args.cpu else "gpu",
        "steps": steps,
        "warmup": warmup,
        "gpu_tests_exit_code": args.tests_rc,
        "results": results,
        "total_s": time.time() - t_start,
    }
    (args.out / "acceptance.json").write_text(json.dumps(report, indent=2) + "\n")
    tests = {None: "not run", 0: "passed"}.get(args.tests_rc, f"FAILED (exit {args.tests_rc})")
    if args.cpu and args.tests_rc == 0:
        tests = "skipped (no CUDA)"
    md = (
        f"# GPU acceptance ({report['mode']})\n\n"
        f"{env['date_utc']} UTC; device {env['device']}; python {env['python']}, torch {env['torch']} "
        f"(CUDA {env['cuda']}), DeepSpeed {env['deepspeed']}.\n\n"
        f"Command: `bash bench/gpu/acceptance.sh{' OUT --cpu' if args.cpu else ''}`; "
        f"GPU tests (`pytest -m gpu tests/gpu`): {tests}.\n"
        f"{steps} optimizer steps per run, timings over the steps after the first {warmup}; "
        f"bf16, ZeRO-1, one device, 2 micro-batches per step.\n\n{table(results)}\n\n"
        f"Total {report['total_s']:.0f} s.\n"
    )
    (args.out / "acceptance.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
