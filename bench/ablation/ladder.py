"""The DeepSeekMoE ablation ladder at small scale: one command trains every variant on the same
data, evaluates it, runs the Fig. 4 redundancy test and writes the table, plots and report.

    python bench/ablation/ladder.py                          # the whole ladder (~75 min on 2 CPU cores)
    python bench/ablation/ladder.py --report bench/reports/ablation_<machine>_<date>.md
    python bench/ablation/ladder.py --variants gshard,deepseek_moe --seeds 1 --steps 1600 \
        --out runs/ablation_long                             # one pair, longer

What it does, in order (bench/ablation/README.md has the details and the numbers):
1. the corpus: the Linux kernel's documentation (`corpus.py`, Debian's linux-doc package),
   prepared once into `data/linux_doc` (8192-token BPE, 2% validation documents);
2. each variant's parameters and FLOPs per token from `deepseek_moe.summary`; the MoE
   variants must match within 2% or the ladder stops before training;
3. `train.py` per variant and seed: same data order, LR, schedule and steps for every variant
   (only `model=` differs); `trainer.seed` = the seed, which sets both the initialisation and
   the data order. GShard and DeepSeekMoE get every seed, the other variants the first;
4. `python -m deepseek_moe.evaluate RUN --all --routing-stats` for the table, and for the
   seeded pair `--disable-top-experts R` at the ratios 0, 1/16, 2/16, 3/16 of the routed experts
   (Fig. 4; GShard R = 0..3, DeepSeekMoE R = 0, 4, 8, 12);
5. `results.json`, `loss_curves.png`, `fig4_redundancy.png` and `report.md` in `--out`
   (with `--report PATH` the report and its PNGs are also written there).

Each run keeps `ladder_trained.json` (training done) and `ladder_result.json` (evaluated) in
`<out>/<variant>_s<seed>/`: a relaunch skips what is done and `train.py` resumes an interrupted
run, so the ladder can be stopped anytime (`--train-only` stops after the trainings).
The variants run one after another, each on all cores (two single-threaded runs side by side
were slower on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from analysis import aggregate  # noqa: E402
from variants import FIG4_RATIO_DENOMINATOR, SEEDED, VARIANTS, moe_mismatches, summaries  # noqa: E402

DEFAULT_DATA_ARGS = [
    "data=local_text",
    "data.name=linux_doc",
    "data.path=data_src/linux_doc",
    "data.out_dir=data/linux_doc",
    "data.val_fraction=0.02",
]
# One schedule for every variant, chosen once (the default AdamW preset's LR and cosine decay).
DEFAULT_TRAIN_ARGS = [
    "trainer.global_batch_size=16",
    "trainer.micro_batch_size=8",
    "trainer.seq_len=256",
    "trainer.eval_batches=8",
    "trainer.log_every=10",
    "trainer.precision=fp32",
    "optim=adamw",
    "optim.lr=3e-3",
    "optim.warmup_steps=20",
    "logger=none",
]
TRAINED_FILE = "ladder_trained.json"
RESULT_FILE = "ladder_result.json"


class LadderError(Exception):
    """A one-line problem that stops the ladder."""


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_s{seed}"


def plan_runs(variants: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(variant, seed) in training order: the first seed of every variant first, so a ladder
    stopped early still has one complete rung of each."""
    runs = [(v, seeds[0]) for v in variants]
    runs += [(v, s) for s in seeds[1:] for v in variants if v in SEEDED]
    return runs


def _run(cmd: list[str], log_path: Path, env: Optional[dict] = None) -> float:
    """Run `cmd` from the repository root with output to `log_path`; its wall time."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
        raise LadderError(
            f"{shlex.join(cmd[:4])} ... failed (exit {proc.returncode}): {tail[0]} (log: {log_path})"
        )
    return time.perf_counter() - start


def evaluate(run_dir: Path, args: list[str], log_path: Path) -> tuple[dict[str, Any], float]:
    """`python -m deepseek_moe.evaluate RUN ARGS`: its JSON and wall time."""
    cmd = [sys.executable, "-m", "deepseek_moe.evaluate", str(run_dir), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n{proc.stderr}")
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise LadderError(f"evaluate {run_dir} {' '.join(args)} failed: {tail[0]}")
    return json.loads(proc.stdout), time.perf_counter() - start


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(tokens seen, val_loss) of every evaluation in the run's metrics.jsonl."""
    tokens_per_step, evals = None, []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "tokens_seen" in rec and tokens_per_step is None:
            tokens_per_step = rec["tokens_seen"] // rec["step"]
        if "val_loss" in rec:
            evals.append((rec["step"], rec["val_loss"]))
    return [(step * (tokens_per_step or 0), loss) for step, loss in evals]


def train(variant: str, seed: int, opts, train_args: list[str]) -> float:
    """Train one run (skipped when its marker says it finished); its training wall time."""
    name = run_name(variant, seed)
    run_dir = opts.out / name
    marker = run_dir / TRAINED_FILE
    if marker.is_file():
        return json.loads(marker.read_text())["train_s"]
    cmd = [
        sys.executable,
        "train.py",
        "--config-dir",
        str(HERE / "conf"),
        f"model={VARIANTS[variant].preset}",
        *train_args,
        f"trainer.seed={seed}",
        f"run_dir={run_dir}",
    ]
    print(f"[ladder] train {name} ({opts.steps} steps)", flush=True)
    train_s = _run(cmd, opts.out / "logs" / f"{name}.log")
    _write_json(marker, {"train_s": train_s})
    print(f"[ladder] {name}: trained in {train_s:.0f} s", flush=True)
    return train_s


def fig4_disabled(variant: str, max_step: int) -> dict[str, int]:
    """Fig. 4's x-axis is the ratio of the routed experts disabled, in steps of 1/16 (one of
    GShard's 16 experts): step k disables round(k * E / 16) of a variant's E routed experts
    (DeepSeekMoE's 63: 0, 4, 8, 12), the same share of expert parameters in every variant."""
    E = VARIANTS[variant].routed_experts
    return {str(k): round(k * E / FIG4_RATIO_DENOMINATOR) for k in range(max_step + 1)}


def evaluate_run(variant: str, seed: int, opts, train_s: float) -> dict[str, Any]:
    """The run's table value (whole validation split, routing statistics) and, for the seeded
    pair, the Fig. 4 losses; kept in the run directory so a relaunch skips what is done."""
    name = run_name(variant, seed)
    run_dir = opts.out / name
    result_path = run_dir / RESULT_FILE
    log_path = opts.out / "logs" / f"{name}.log"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        eval_args = ["--all"] + (["--routing-stats"] if VARIANTS[variant].moe else [])
        main_eval, eval_s = evaluate(run_dir, eval_args, log_path)
        result = {
            "variant": variant,
            "seed": seed,
            "val_loss": main_eval["val_loss"],
            "perplexity": main_eval["perplexity"],
            "eval_tokens": main_eval["tokens"],
            "step": main_eval.get("step"),
            "routing": main_eval.get("routing"),
            "curve": val_curve(run_dir),
            "train_s": train_s,
            "eval_s": eval_s,
        }
        _write_json(result_path, result)
        print(f"[ladder] {name}: val_loss {result['val_loss']:.4f}, eval {eval_s:.0f} s", flush=True)
    planned = fig4_disabled(variant, opts.fig4_max_r) if variant in SEEDED and opts.fig4_max_r > 0 else None
    fig4_sample = {"sequences": opts.fig4_sequences}
    if planned and (result.get("fig4_disabled") != planned or result.get("fig4_sample") != fig4_sample):
        fig4_args = ["--all"] if opts.fig4_sequences == 0 else ["--sequences", str(opts.fig4_sequences)]
        fig4, fig4_s = {}, 0.0
        for k, r in planned.items():
            if r == 0 and opts.fig4_sequences == 0:
                fig4[k] = result["val_loss"]
                continue
            out, seconds = evaluate(run_dir, [*fig4_args, "--disable-top-experts", str(r)], log_path)
            fig4[k], fig4_s = out["val_loss"], fig4_s + seconds
        result.update(fig4=fig4, fig4_disabled=planned, fig4_sample=fig4_sample, fig4_s=fig4_s)
        _write_json(result_path, result)
        print(
            f"[ladder] {name}: Fig. 4 ({', '.join(map(str, planned.values()))} experts disabled), {fig4_s:.0f} s",
            flush=True,
        )
    return result


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def prepared_vocab(data_args: list[str]) -> tuple[Path, int]:
    """Prepare the corpus (no-op when done): its directory and padded model vocab size."""
    from data_prep.prepare import compose_data_config, ensure_prepared
    from deepseek_moe.data import padded_vocab_size

    cfg = compose_data_config(data_args)
    meta = ensure_prepared(cfg)
    return Path(cfg.out_dir), padded_vocab_size(meta.vocab_size)


def machine() -> str:
    import torch

    cores = os.cpu_count()
    return f"{platform.processor() or platform.machine()}, {cores} CPUs, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run (4,096 tokens each)")
    p.add_argument("--seeds", type=int, default=3, help="seeds for GShard and DeepSeekMoE (the others: 1)")
    p.add_argument("--first-seed", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {','.join(VARIANTS)}")
    p.add_argument(
        "--eval-every", type=int, default=50, help="steps between the trainer's val evaluations (curves)"
    )
    p.add_argument(
        "--fig4-max-r", type=int, default=3, help="Fig. 4 up to this many 1/16 shares of the routed experts"
    )
    p.add_argument(
        "--fig4-sequences", type=int, default=256, help="val sequences for Fig. 4 (0: the whole split)"
    )
    p.add_argument(
        "--corpus", type=Path, default=Path("data_src/linux_doc"), help="fetched by corpus.py if missing"
    )
    p.add_argument(
        "--data-args",
        default=None,
        help="data overrides replacing the linux_doc ones (quoted, space-separated)",
    )
    p.add_argument("--train-args", default="", help="more train.py overrides for every variant (quoted)")
    p.add_argument("--train-only", action="store_true", help="stop after training (evaluate on a later call)")
    p.add_argument("--report", type=Path, default=None, help="also write the report (and PNGs) here")
    opts = p.parse_args(argv)
    try:
        run_ladder(opts)
    except LadderError as err:
        sys.exit(f"ladder: {err}")


def run_ladder(opts) -> None:
    from deepseek_moe.errors import ConfigError, DataError

    start = time.time()
    variants = [v for v in opts.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise LadderError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    seeds = list(range(opts.first_seed, opts.first_seed + opts.seeds))
    opts.out = opts.out.absolute()
    if opts.data_args is None:
        from corpus import CorpusError, ensure_corpus

        try:
            ensure_corpus(opts.corpus)
        except CorpusError as err:
            raise LadderError(str(err)) from err
        data_args = DEFAULT_DATA_ARGS
    else:
        data_args = shlex.split(opts.data_args)
    try:
        data_dir, vocab = prepared_vocab(data_args)
    except (ConfigError, DataError) as err:
        raise LadderError(f"data: {err}") from err
    train_args = [
        *data_args,
        *DEFAULT_TRAIN_ARGS,
        f"trainer.max_steps={opts.steps}",
        f"trainer.eval_every={opts.eval_every}",
        f"checkpoint.every={opts.steps}",
        "checkpoint.keep=1",
        *shlex.split(opts.train_args),
    ]
    seq_len = int(next(a.split("=")[1] for a in reversed(train_args) if a.startswith("trainer.seq_len=")))
    summary = summaries(variants, vocab_size=vocab, seq_len=seq_len)
    print("[ladder] variant            total params  activated params  FLOPs/token")
    for name, s in summary.items():
        print(
            f"[ladder] {name:<18} {s['total_params']:>12,}  {s['active_params']:>16,}  {s['flops_per_token']:>11,}"
        )
    mismatches = moe_mismatches(summary)
    if mismatches:
        raise LadderError("the MoE variants are not matched: " + "; ".join(mismatches))
    runs = plan_runs(variants, seeds)
    # All training first, then all evaluation: the trainings need nothing but train.py.
    train_s = {run_name(v, s): train(v, s, opts, train_args) for v, s in runs}
    if opts.train_only:
        print(f"[ladder] trained {len(runs)} runs in {(time.time() - start) / 60:.1f} min (--train-only)")
        return
    results = {run_name(v, s): evaluate_run(v, s, opts, train_s[run_name(v, s)]) for v, s in runs}
    wall_s = time.time() - start
    ladder = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        "data_dir": str(data_dir),
        "steps": opts.steps,
        "train_args": train_args,
        "summary": summary,
        "runs": results,
        "aggregate": aggregate(results),
        "wall_s": wall_s,
        # training + evaluation of every run, whether or not this invocation did them
        "ladder_s": sum(r["train_s"] + r["eval_s"] + r.get("fig4_s", 0.0) for r in results.values()),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
    }
    (opts.out / "results.json").write_text(json.dumps(ladder, indent=1) + "\n")
    from report import write_report

    paths = write_report(ladder, opts.out / "report.md")
    if opts.report is not None:
        write_report(ladder, opts.report)
        paths.append(opts.report)
    print(
        f"[ladder] done in {wall_s / 60:.1f} min: {opts.out / 'results.json'}; " + ", ".join(map(str, paths))
    )


if __name__ == "__main__":
    main()
