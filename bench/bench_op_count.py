"""Benchmark: ops issued by one MoE layer forward+backward, per experts path and expert count.

    python bench/bench_op_count.py                  # 2,048 tokens, hidden 256, top-6, 2 shared
    python bench/bench_op_count.py --experts 8,64,160

Each top-level aten op is at least one kernel launch on a GPU, so a layer whose op count grows
with the number of experts is launch-bound with fine-grained experts. Counted with
torch.profiler on CPU (the ops a path issues do not depend on the device): top-level = aten ops
with no aten op above them (ops inside our autograd Functions count; their sub-ops do not).
Printed per path: ops and matmuls at each expert count, and the ratio largest / smallest count.
The CUDA default path is `grouped_mm`; the target is a ratio within 1.2x.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MATMUL_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::matmul",
    "aten::_grouped_mm",
    "aten::grouped_mm",
    "aten::linear",
)


def _top_level_aten(prof) -> list[str]:
    names = []
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            names.append(event.name)
    return names


def count_top_level_aten_ops(fn: Callable[[], None]) -> int:
    """Top-level aten ops issued while running fn() (forward and backward)."""
    return len(_profile(fn))


def _profile(fn: Callable[[], None]) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return _top_level_aten(prof)


def main(argv=None) -> None:
    import torch

    from deepseek_moe.config.model import MoEConfig
    from deepseek_moe.model.moe import MoELayer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--expert-width", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--shared", type=int, default=2)
    ap.add_argument("--experts", default="8,64")
    args = ap.parse_args(argv)
    counts = [int(e) for e in args.experts.split(",")]
    rows = {}
    for impl in ("grouped_mm", "loop"):
        for E in counts:
            torch.manual_seed(0)
            cfg = MoEConfig(
                n_routed_experts=E,
                n_shared_experts=args.shared,
                top_k=args.top_k,
                moe_intermediate_size=args.expert_width,
                experts_impl=impl,
            )
            layer = MoELayer(args.hidden, cfg)
            for p in layer.parameters():
                torch.nn.init.normal_(p, std=0.02)
            x = torch.randn(args.tokens, args.hidden, requires_grad=True)

            def step():
                y, aux = layer(x)
                (y.square().mean() + sum(aux.values(), torch.zeros(()))).backward()

            step()  # warm-up outside the profile
            names = _profile(step)
            rows[impl, E] = (len(names), sum(n in MATMUL_OPS for n in names))
    head = " | ".join(f"experts {E}: ops (matmuls)" for E in counts)
    print(f"| experts impl | {head} | ops ratio {counts[-1]} / {counts[0]} |")
    print("|---" * (len(counts) + 2) + "|")
    for impl in ("grouped_mm", "loop"):
        cells = " | ".join(f"{rows[impl, E][0]:,} ({rows[impl, E][1]})" for E in counts)
        ratio = rows[impl, counts[-1]][0] / rows[impl, counts[0]][0]
        print(f"| {impl} | {cells} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
