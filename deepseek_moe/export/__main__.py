"""Export a training run to a Hugging Face model directory.

    python -m deepseek_moe.export RUN_DIR_OR_CHECKPOINT --out DIR [--format deepseek|qwen2_moe]

RUN_DIR_OR_CHECKPOINT: a run directory (its newest complete checkpoint) or one checkpoint
(RUN/checkpoints/step_XXXXXXXX). Any EP size, ZeRO stage and precision; weights are written in
fp32 when the checkpoint holds fp32 (fp32 runs, or the fp32 master copies in a bf16 run's
ZeRO-1/2 optimizer shards), else in the checkpoint's dtype; the dtype is printed and is config.json's
`torch_dtype`. See README "After training".
"""

from __future__ import annotations

import argparse
from typing import Optional

from deepseek_moe.errors import report_user_errors


def main(argv: Optional[list[str]] = None) -> None:
    from deepseek_moe.export.exporter import FORMATS, export
    from deepseek_moe.export.refusals import Accept

    parser = argparse.ArgumentParser(
        prog="python -m deepseek_moe.export",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="run directory or checkpoint directory")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument(
        "--format",
        default="deepseek",
        choices=sorted(FORMATS),
        help="deepseek: DeepSeek's DeepSeekMoE release layout (default); "
        "qwen2_moe: Qwen2MoeForCausalLM, native in transformers",
    )
    parser.add_argument(
        "--data-dir",
        help="prepared data directory holding the run's tokenizer (default: the run's data.out_dir)",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--drop-group-limit",
        action="store_true",
        help="accept plain top-k routing at inference for a model trained with "
        "device-limited routing (moe.topk_groups < moe.n_groups)",
    )
    parser.add_argument(
        "--drop-router-bias",
        action="store_true",
        help="accept leaving out the V3 selection bias (moe.bias_update_rate > 0)",
    )
    args = parser.parse_args(argv)
    summary = report_user_errors(
        export,
        args.source,
        args.out,
        args.format,
        data_dir=args.data_dir,
        force=args.force,
        accept=Accept(drop_group_limit=args.drop_group_limit, drop_router_bias=args.drop_router_bias),
    )
    print(
        f"wrote {summary['out']} ({summary['format']}, {summary['dtype']} weights, "
        f"{summary['tensors']} tensors in {summary['shards']} shard(s)) from {summary['checkpoint']}"
    )
    for change in summary["accepted_changes"]:
        print(f"  accepted change: {change}")


if __name__ == "__main__":
    main()
