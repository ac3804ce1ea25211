"""The ladder's report: a markdown page with the paper-form table, the verdicts and two PNGs.

    write_report(ladder, Path("bench/reports/ablation_<machine>_<date>.md"))

`ladder` is the `results.json` object written by ladder.py. The PNGs go next to the report
(`<stem>_loss_curves.png`, `<stem>_fig4.png`); everything is written to a temporary name and
renamed.
"""

from __future__ import annotations

import os
from pathlib import Path
from statistics import mean
from typing import Any

from analysis import ordering_verdicts, redundancy_rises, redundancy_verdicts
from variants import FIG4_RATIO_DENOMINATOR, ORDERINGS, SEEDED, VARIANTS


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot_curves(ladder: dict[str, Any], path: Path, reference: str = "gshard") -> None:
    """Left: validation loss against training tokens, per variant the mean over seeds and the
    range. Right: each variant minus `reference` at the same seed and step (the data order,
    which moves every variant of a seed together, cancels), mean over the common seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = ladder["runs"].values()
    curve = {(r["variant"], r["seed"]): dict(r["curve"]) for r in runs if r["curve"]}
    fig, (ax, ax_rel) = plt.subplots(1, 2, figsize=(13, 4.8))
    for variant in VARIANTS:
        seeds = sorted(s for v, s in curve if v == variant)
        if not seeds:
            continue
        tokens = sorted(set.intersection(*(set(curve[(variant, s)]) for s in seeds)))
        per_point = [[curve[(variant, s)][t] for s in seeds] for t in tokens]
        label = f"{VARIANTS[variant].label} ({len(seeds)} seed{'s' * (len(seeds) > 1)})"
        xs = [t / 1e6 for t in tokens]
        line = ax.plot(xs, [mean(v) for v in per_point], marker=".", label=label)
        color = line[0].get_color()
        if len(seeds) > 1:
            ax.fill_between(
                xs, [min(v) for v in per_point], [max(v) for v in per_point], color=color, alpha=0.2
            )
        common = [s for s in seeds if (reference, s) in curve]
        rel_tokens = [t for t in tokens if all(t in curve[(reference, s)] for s in common)]
        if common and rel_tokens:
            rel = [
                mean(curve[(variant, s)][t] - curve[(reference, s)][t] for s in common) for t in rel_tokens
            ]
            ax_rel.plot([t / 1e6 for t in rel_tokens], rel, marker=".", color=color, label=label)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (trainer's sample)")
    ax.set_title("validation loss (mean over seeds, seed range shaded)")
    lows = [r["val_loss"] for r in runs]
    if lows:  # the interesting part: the late curves, not the first steps' drop from ln(vocab)
        ax.set_ylim(min(lows) - 0.1, min(lows) + 1.5)
    ax_rel.axhline(0.0, color="grey", lw=0.8)
    ax_rel.set_xlabel("training tokens (M)")
    ax_rel.set_ylabel(f"loss minus {VARIANTS[reference].label.split(' (')[0]}'s, same seed")
    ax_rel.set_title("paired by seed: below 0 = better than GShard")
    ax_rel.set_ylim(-0.3, 0.3)
    for a in (ax, ax_rel):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def plot_fig4(ladder: dict[str, Any], path: Path) -> bool:
    """Fig. 4: validation loss with the top-r routed experts of every token disabled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses: dict[str, dict[int, list[float]]] = {}
    for run in ladder["runs"].values():
        for r, loss in (run.get("fig4") or {}).items():
            losses.setdefault(run["variant"], {}).setdefault(int(r), []).append(loss)
    if not losses:
        return False
    fig, (ax, ax_rise) = plt.subplots(1, 2, figsize=(10, 4))
    rises = redundancy_rises(ladder["runs"])
    for variant, by_r in losses.items():
        rs = sorted(by_r)
        ys = [mean(by_r[r]) for r in rs]
        err = [
            [ys[i] - min(by_r[r]) for i, r in enumerate(rs)],
            [max(by_r[r]) - ys[i] for i, r in enumerate(rs)],
        ]
        xs = [k / FIG4_RATIO_DENOMINATOR for k in rs]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=VARIANTS[variant].label)
        ax_rise.plot(
            xs, [mean(rises[variant][r].values()) for r in rs], marker="o", label=VARIANTS[variant].label
        )
    ax.set_xlabel("ratio of disabled top routed experts")
    ax.set_ylabel("validation loss")
    ax.set_title("Fig. 4 at small scale (mean, seed range)")
    ax_rise.set_xlabel("ratio of disabled top routed experts")
    ax_rise.set_ylabel("loss(r) - loss(0)")
    ax_rise.set_title("rise over the intact model")
    for a in (ax, ax_rise):
        ticks = sorted({r for v in losses.values() for r in v})
        a.set_xticks(
            [k / FIG4_RATIO_DENOMINATOR for k in ticks], [f"{k}/{FIG4_RATIO_DENOMINATOR}" for k in ticks]
        )
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return True


def _fmt_loss(a: dict[str, Any]) -> str:
    if a["std"] is None:
        return f"{a['mean']:.4f}"
    return f"{a['mean']:.4f} ± {a['std']:.4f} (range {a['min']:.4f}-{a['max']:.4f})"


def _routing_line(run: dict[str, Any]) -> str:
    layers = run.get("routing") or []
    if not layers:
        return ""
    dead = [len(l["dead_experts"]) for l in layers]
    imb = [l["load_imbalance"] for l in layers]
    return f"dead experts per layer {dead}, load imbalance (max/mean) {', '.join(f'{x:.2f}' for x in imb)}"


def render(ladder: dict[str, Any], curves_png: str, fig4_png: str | None) -> str:
    agg, summary, runs = ladder["aggregate"], ladder["summary"], ladder["runs"]
    first_run = next(iter(runs.values()))
    out = [
        "# Ablation ladder: the DeepSeekMoE paper's Table 1 / Fig. 3 / Fig. 4 at small scale",
        "",
        f"Started {ladder['started']} on {ladder['machine']}. Training and evaluation of all runs: {ladder['ladder_s'] / 60:.1f} min; this invocation: {ladder['wall_s'] / 60:.1f} min.",
        f"Data: `{ladder['data_dir']}`; {ladder['steps']} steps per run; validation loss over "
        f"{first_run['eval_tokens']:,} tokens (the whole validation split, `evaluate --all`).",
        "",
        "Command:",
        "",
        "```",
        ladder["command"],
        "```",
        "",
        "## Table (paper form)",
        "",
        "| variant | total params | activated params | FLOPs/token | seeds | val loss (mean ± std over seeds) |",
        "|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        if variant not in agg:
            continue
        s, a = summary[variant], agg[variant]
        out.append(
            f"| {VARIANTS[variant].label} | {s['total_params'] / 1e6:.2f}M | {s['active_params'] / 1e6:.2f}M | "
            f"{s['flops_per_token'] / 1e6:.2f}M | {len(a['seeds'])} | {_fmt_loss(a)} |"
        )
    out += [
        "",
        "Per run:",
        "",
        "| run | val loss | train s | eval s | routing (evaluated data) |",
        "|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        out.append(
            f"| {name} | {run['val_loss']:.4f} | {run['train_s']:.0f} | {run['eval_s'] + run.get('fig4_s', 0):.0f} | {_routing_line(run)} |"
        )
    out += ["", "## The paper's orderings", ""]
    for v in ordering_verdicts(runs, ORDERINGS, SEEDED):
        ratio = (
            f"{v['ratio']:.1f}x its standard error {v['stderr']:.4f}"
            if v["ratio"] is not None
            else "no spread"
        )
        seeds = (
            f"seed {v['seeds'][0]}"
            if len(v["seeds"]) == 1
            else f"mean over seeds {', '.join(map(str, v['seeds']))}"
        )
        borrowed = (
            f" (one common seed: the spread of the {' - '.join(SEEDED)} per-seed differences stands in)"
            if v["borrowed_noise"]
            else ""
        )
        out.append(
            f"- {VARIANTS[v['higher']].label} > {VARIANTS[v['lower']].label}: **{v['verdict']}**; "
            f"margin {v['margin']:+.4f} ({seeds}; per seed {', '.join(f'{d:+.4f}' for d in v['differences'])}) "
            f"= {ratio}{borrowed}."
        )
    fig4 = redundancy_verdicts(runs, "deepseek_moe", "gshard")
    if fig4:
        out += [
            "",
            "Fig. 4 (DeepSeekMoE's loss rises more steeply than GShard's when the same share of its routed experts, "
            "the top-ranked ones of each token, is disabled; the paper compares against GShard x1.5, matched in loss, "
            "this ladder against GShard, matched in parameters):",
            "",
        ]
        for v in fig4:
            ratio = (
                f"{v['ratio']:.1f}x its standard error {v['stderr']:.4f}"
                if v["ratio"] is not None
                else "no spread"
            )
            disabled = {
                run["variant"]: run["fig4_disabled"][str(v["r"])]
                for run in runs.values()
                if run.get("fig4_disabled")
            }
            out.append(
                f"- {v['r']}/{FIG4_RATIO_DENOMINATOR} disabled (DeepSeekMoE {disabled['deepseek_moe']} of 63 experts, "
                f"GShard {disabled['gshard']} of 16): rise DeepSeekMoE {v['rise']['deepseek_moe']:+.4f}, "
                f"GShard {v['rise']['gshard']:+.4f}; "
                f"**{v['verdict']}**, margin {v['margin']:+.4f} = {ratio}."
            )
    out += ["", f"![validation loss curves]({curves_png})", ""]
    if fig4_png:
        out += [f"![Fig. 4 redundancy]({fig4_png})", ""]
    out += [
        "Seeds set both the initialisation and the data order (`trainer.seed`); every variant of a seed sees the same batches, "
        "so variants are compared within a seed (paired differences) and the data order's effect, which moves all variants "
        f"of a seed together, cancels. Only {', '.join(SEEDED)} are trained with every seed. A verdict is 'beyond seed noise' "
        "when the mean difference exceeds twice its standard error (stdev of the per-seed differences / sqrt(seeds)).",
        "",
    ]
    return "\n".join(out)


def write_report(ladder: dict[str, Any], path: Path) -> list[Path]:
    """The report at `path` and its PNGs next to it; the paths written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    curves = path.with_name(f"{path.stem}_loss_curves.png")
    fig4 = path.with_name(f"{path.stem}_fig4.png")
    plot_curves(ladder, curves)
    has_fig4 = plot_fig4(ladder, fig4)
    _atomic_write(path, render(ladder, curves.name, fig4.name if has_fig4 else None))
    return [path, curves] + ([fig4] if has_fig4 else [])
