"""Validation loss and perplexity of a checkpoint or a Hugging Face model directory.

    python -m deepseek_moe.evaluate SOURCE [key=value ...] [--sequences N | --all] [--micro-batch B]
            [--split val] [--disable-top-experts R] [--routing-stats] [--ep-size P]
            [--precision auto|fp32|bf16]
    torchrun --nproc_per_node 2 -m deepseek_moe.evaluate SOURCE --ep-size 2     # several processes

SOURCE: a run directory (its newest complete checkpoint), a checkpoint (RUN/checkpoints/
step_XXXXXXXX; any EP size, ZeRO stage and precision), or a Hugging Face model directory (our
export in either format, or DeepSeek's release).

key=value: `data.*` (another prepared directory `data.out_dir=DIR`, a mixture's
`data.sources=[...]`), `trainer.seq_len`, `trainer.micro_batch_size`, `trainer.eval_batches`;
on top of the run's config.yaml. An HF directory holds no data: `data.out_dir=` is required, and
its sequence length defaults to the model's max_seq_len. The prepared tokenizer must fit the
model's vocabulary.

Which sequences (windows of seq_len+1 tokens of the split):
  default        a checkpoint: exactly the trainer's validation sample (eval_batches x
                 micro_batch_size x the training world size, spread over the split), so
                 val_loss equals the run's metrics.jsonl val_loss at that step;
                 an HF directory: --all
  --all          every window of the split
  --sequences N  N windows spread evenly over the split (as the trainer spreads its sample)
The sample never depends on the number of processes or --micro-batch; the loss is the
token-weighted mean over it. For a mixture (data.sources) each source is evaluated on its own
sample: `val_loss/<name>` each, and `val_loss` their mean weighted by the mixture weights.

Options:
  --micro-batch B            sequences per forward per process (default trainer.micro_batch_size)
  --split val|train          the split to read (default val)
  --disable-top-experts R    DeepSeekMoE Fig. 4: in every MoE layer each token skips its R
                             highest-affinity routed experts and takes the next top-K; gates are
                             those experts' own affinities. Under device-limited routing the R
                             are removed before the groups are chosen. R + top_k must not exceed
                             the experts a token can reach
  --routing-stats            per MoE layer over the evaluated tokens: load fraction per expert,
                             load_imbalance (max/mean), dead experts, router entropy, min/max
                             expert fraction (summed over processes)
  --ep-size P                expert-parallel size of this evaluation (divides the process count)
  --precision                auto (default: the run's trainer.precision resolved on this device;
                             an HF directory: bf16 on CUDA, else fp32), fp32 or bf16

Output: one JSON object on stdout (source, kind, step, split, data, sample, sequences, tokens,
seq_len, val_loss, perplexity, [val_loss/<name>, sources], disable_top_experts, precision,
world_size, ep_size, micro_batch_size, train_world_size, seconds, [routing]) and one summary
line on stderr; only rank 0 prints. A user error is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Iterator, Optional

from deepseek_moe.errors import report_user_errors


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_moe.evaluate",
        description=__doc__.split("\n\n")[0],
        epilog="See README.md, 'Evaluating a checkpoint'.",
    )
    parser.add_argument("source", help="run directory, checkpoint directory or Hugging Face model directory")
    parser.add_argument("overrides", nargs="*", help="data.*, trainer.seq_len, trainer.micro_batch_size, ...")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--sequences", type=int, default=None, help="N windows spread over the split")
    which.add_argument("--all", action="store_true", help="every window of the split")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per forward per process")
    parser.add_argument("--split", default="val", choices=("val", "train"))
    parser.add_argument("--disable-top-experts", type=int, default=0, metavar="R")
    parser.add_argument("--routing-stats", action="store_true")
    parser.add_argument("--ep-size", type=int, default=1, metavar="P")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    return parser.parse_args(argv)


def summary_line(result: dict[str, Any], label: str) -> str:
    """`runs/x step 400: val_loss 4.0123 (ppl 55.27) on 1,024 x 256 tokens of data/kdoc val, 12.3 s`."""
    data = result["data"][0] if len(result["data"]) == 1 else f"{len(result['data'])} sources"
    skip = result["disable_top_experts"]
    return (
        f"{label}: val_loss {result['val_loss']:.4f} (ppl {result['perplexity']:.2f}) on "
        f"{result['sequences']:,} x {result['seq_len']} tokens of {data} {result['split']}"
        + (f", top {skip} experts disabled" if skip else "")
        + f", {result['seconds']:.1f} s"
    )


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Everything written to stdout inside (DeepSpeed's log lines, a library's print, C code)
    goes to stderr, so that stdout holds only the JSON object and `json.loads(stdout)` works."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    with stdout_to_stderr():
        result = _evaluate(args)
    if int(os.environ.get("RANK", "0")) == 0:
        label = (
            f"{result['source']} step {result['step']}" if result["step"] is not None else result["source"]
        )
        print(json.dumps(result), flush=True)
        print(summary_line(result, label), file=sys.stderr, flush=True)
    return result


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from deepseek_moe.evaluate.run import evaluate

    return report_user_errors(
        evaluate,
        args.source,
        args.overrides,
        sequences=args.sequences,
        all_windows=True if args.all else None,
        micro_batch_size=args.micro_batch,
        split=args.split,
        disable_top_experts=args.disable_top_experts,
        routing_stats=args.routing_stats,
        ep_size=args.ep_size,
        precision=args.precision,
    )


if __name__ == "__main__":
    main()
