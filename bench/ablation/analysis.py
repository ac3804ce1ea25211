"""From the ladder's per-run results to the paper-form table and the verdicts.

    agg = aggregate(runs)                 # variant -> seeds' val losses, mean, std, range
    for v in ordering_verdicts(runs, ORDERINGS, ("gshard", "deepseek_moe")): ...  # Table 1 / Fig. 3
    for v in redundancy_verdicts(runs):   # Fig. 4: loss rise with the top-r experts disabled

`runs`: run name -> {"variant", "seed", "val_loss", "fig4": {"0": loss, "1": ...}} (JSON keys
are strings). Comparisons are paired by seed (a seed fixes the initialisation and the data order
for every variant); seed noise is the spread of the per-seed differences. A difference counts
as beyond seed noise when it exceeds twice its standard error.
"""

from __future__ import annotations

import math
from statistics import mean, stdev
from typing import Any

NOISE_MULTIPLE = 2.0


def aggregate(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_variant: dict[str, list[tuple[int, float]]] = {}
    for run in runs.values():
        by_variant.setdefault(run["variant"], []).append((run["seed"], run["val_loss"]))
    out = {}
    for variant, pairs in by_variant.items():
        pairs.sort()
        losses = [loss for _, loss in pairs]
        out[variant] = {
            "seeds": [s for s, _ in pairs],
            "val_losses": losses,
            "mean": mean(losses),
            "std": stdev(losses) if len(losses) > 1 else None,
            "min": min(losses),
            "max": max(losses),
        }
    return out


def paired_differences(runs: dict[str, dict[str, Any]], higher: str, lower: str) -> dict[int, float]:
    """seed -> loss(higher) - loss(lower), for the seeds both variants were trained with."""
    by = {(r["variant"], r["seed"]): r["val_loss"] for r in runs.values()}
    seeds = sorted({s for v, s in by if v == higher} & {s for v, s in by if v == lower})
    return {s: by[(higher, s)] - by[(lower, s)] for s in seeds}


def verdict(margin: float, se: float | None) -> str:
    if margin <= 0:
        return "did not hold"
    if se is None:
        return "held (no seed spread to compare with)"
    if margin > NOISE_MULTIPLE * se:
        return "held, beyond seed noise"
    return "held, within seed noise"


def ordering_verdicts(
    runs: dict[str, dict[str, Any]], orderings, reference: tuple[str, str]
) -> list[dict[str, Any]]:
    """For each (higher, lower) pair: the paired margin (mean over the common seeds of
    loss(higher) - loss(lower)), its standard error and the verdict.

    Every variant of one seed sees the same batches, so differences are taken within a seed;
    the data order's effect, which moves every variant of a seed together, cancels. With
    several common seeds the standard error is stdev(differences) / sqrt(n). A pair with one
    common seed borrows the spread of the `reference` pair's per-seed differences (the pair
    trained with every seed) as the standard deviation of one difference."""
    ref = list(paired_differences(runs, *reference).values())
    ref_std = stdev(ref) if len(ref) > 1 else None
    out = []
    for higher, lower in orderings:
        diffs = paired_differences(runs, higher, lower)
        if not diffs:
            continue
        values = list(diffs.values())
        margin = mean(values)
        borrowed = len(values) < 2
        std = ref_std if borrowed else stdev(values)
        se = None if std is None else std / math.sqrt(len(values))
        out.append(
            {
                "higher": higher,
                "lower": lower,
                "seeds": list(diffs),
                "differences": values,
                "margin": margin,
                "stderr": se,
                "ratio": margin / se if se else None,
                "borrowed_noise": borrowed,
                "verdict": verdict(margin, se),
            }
        )
    return out


def redundancy_rises(runs: dict[str, dict[str, Any]]) -> dict[str, dict[int, dict[int, float]]]:
    """variant -> r -> seed -> loss(r) - loss(0), from the runs that have Fig. 4 results."""
    out: dict[str, dict[int, dict[int, float]]] = {}
    for run in runs.values():
        fig4 = run.get("fig4")
        if not fig4:
            continue
        base = fig4["0"]
        for r, loss in fig4.items():
            out.setdefault(run["variant"], {}).setdefault(int(r), {})[run["seed"]] = loss - base
    return out


def redundancy_verdicts(runs: dict[str, dict[str, Any]], steeper: str, flatter: str) -> list[dict[str, Any]]:
    """Fig. 4: for each r >= 1, whether `steeper`'s loss rise exceeds `flatter`'s, paired by
    seed like `ordering_verdicts`."""
    rises = redundancy_rises(runs)
    if steeper not in rises or flatter not in rises:
        return []
    out = []
    for r in sorted(set(rises[steeper]) & set(rises[flatter]) - {0}):
        a, b = rises[steeper][r], rises[flatter][r]
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        diffs = [a[s] - b[s] for s in seeds]
        margin = mean(diffs)
        se = stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
        out.append(
            {
                "r": r,
                "rise": {steeper: mean(a[s] for s in seeds), flatter: mean(b[s] for s in seeds)},
                "seeds": seeds,
                "margin": margin,
                "stderr": se,
                "ratio": margin / se if se else None,
                "verdict": verdict(margin, se),
            }
        )
    return out
