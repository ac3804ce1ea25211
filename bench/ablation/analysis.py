"""From the ladder's per-run results to the paper-form table and the verdicts.

    agg = aggregate(runs)                 # variant -> seeds' val losses, mean, std, range
    for v in ordering_verdicts(agg): ...  # Table 1 / Fig. 3 orderings vs seed noise
    for v in redundancy_verdicts(runs):   # Fig. 4: loss rise with the top-r experts disabled

`runs`: run name -> {"variant", "seed", "val_loss", "fig4": {"0": loss, "1": ...}} (JSON keys
are strings). Seed noise is the sample standard deviation over seeds; for a variant trained
with one seed it is the pooled standard deviation of the seeded variants (said in the verdict).
A difference counts as beyond seed noise when it exceeds twice its standard error.
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


def pooled_std(agg: dict[str, dict[str, Any]]) -> float | None:
    """sqrt of the mean variance over the variants trained with several seeds."""
    variances = [a["std"] ** 2 for a in agg.values() if a["std"] is not None]
    return math.sqrt(mean(variances)) if variances else None


def _stderr_of_difference(
    a: dict[str, Any], b: dict[str, Any], pooled: float | None
) -> tuple[float | None, bool]:
    """(standard error of mean(a) - mean(b), whether a pooled std stood in for a one-seed side)."""
    used_pooled = False
    terms = []
    for side in (a, b):
        std = side["std"]
        if std is None:
            if pooled is None:
                return None, True
            std, used_pooled = pooled, True
        terms.append(std**2 / len(side["val_losses"]))
    return math.sqrt(sum(terms)), used_pooled


def verdict(margin: float, se: float | None) -> str:
    if margin <= 0:
        return "did not hold"
    if se is None:
        return "held (no seed spread to compare with)"
    if margin > NOISE_MULTIPLE * se:
        return "held, beyond seed noise"
    return "held, within seed noise"


def ordering_verdicts(agg: dict[str, dict[str, Any]], orderings) -> list[dict[str, Any]]:
    """For each (higher, lower) pair present: the margin mean(higher) - mean(lower), its
    standard error, the ratio, and the verdict."""
    pooled = pooled_std(agg)
    out = []
    for higher, lower in orderings:
        if higher not in agg or lower not in agg:
            continue
        margin = agg[higher]["mean"] - agg[lower]["mean"]
        se, used_pooled = _stderr_of_difference(agg[higher], agg[lower], pooled)
        out.append(
            {
                "higher": higher,
                "lower": lower,
                "margin": margin,
                "stderr": se,
                "ratio": margin / se if se else None,
                "pooled_noise": used_pooled,
                "verdict": verdict(margin, se),
            }
        )
    return out


def redundancy_rises(runs: dict[str, dict[str, Any]]) -> dict[str, dict[int, list[float]]]:
    """variant -> r -> the seeds' loss(r) - loss(0), from the runs that have Fig. 4 results."""
    out: dict[str, dict[int, list[float]]] = {}
    for run in runs.values():
        fig4 = run.get("fig4")
        if not fig4:
            continue
        base = fig4["0"]
        for r, loss in fig4.items():
            out.setdefault(run["variant"], {}).setdefault(int(r), []).append(loss - base)
    return out


def redundancy_verdicts(runs: dict[str, dict[str, Any]], steeper: str, flatter: str) -> list[dict[str, Any]]:
    """Fig. 4: for each r >= 1, whether `steeper`'s mean loss rise exceeds `flatter`'s."""
    rises = redundancy_rises(runs)
    if steeper not in rises or flatter not in rises:
        return []
    out = []
    for r in sorted(set(rises[steeper]) & set(rises[flatter]) - {0}):
        a, b = rises[steeper][r], rises[flatter][r]
        margin = mean(a) - mean(b)
        if len(a) > 1 and len(b) > 1:
            se = math.sqrt(stdev(a) ** 2 / len(a) + stdev(b) ** 2 / len(b))
        else:
            se = None
        out.append(
            {
                "r": r,
                "rise": {steeper: mean(a), flatter: mean(b)},
                "margin": margin,
                "stderr": se,
                "ratio": margin / se if se else None,
                "verdict": verdict(margin, se),
            }
        )
    return out
