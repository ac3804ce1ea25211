"""One self-contained HTML page for one or several runs: every plot a base64 PNG (matplotlib, Agg
backend), no script, no external file, so it opens offline and can be mailed or archived.

Sections: summary; loss (train and validation, per source when the run has `val_loss/<source>`);
lr, gradient norm, tokens/s, MFU, memory; per-layer load imbalance, router entropy, dropped
fraction, EP ranks per token; expert-load heatmaps over time per layer; all-to-all bytes; alarms;
the resolved config. Several runs are overlaid in one colour each (ablations); with one run the
per-layer plots draw one line per layer.
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Optional

import numpy as np

from deepseek_moe.report.runs import Run, read_run, unique_names

LAYER_METRICS = (
    ("load_imbalance", "load imbalance (max / mean tokens per expert)"),
    ("router_entropy", "router entropy (nats per token)"),
    ("dropped_frac", "dropped fraction of token copies"),
    ("ranks_per_token", "EP ranks (groups) reached per token"),
)
STEP_METRICS = (
    ("lr", "learning rate", False),
    ("grad_norm", "gradient norm (before clipping)", True),
    ("tokens_per_s", "tokens / s", False),
    ("mfu", "MFU", False),
    ("max_memory_gb", "peak GPU memory (GB)", False),
    ("step_time_s", "step time (s)", False),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    """`<img>` with the figure as a base64 PNG; the figure is closed."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _colors(n: int) -> list:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _smooth(values: np.ndarray, n: int = 0) -> np.ndarray:
    """Trailing mean over about 1% of the points (at least 1): noisy per-step losses read better."""
    n = n or max(1, len(values) // 100)
    if n <= 1 or len(values) < n:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty_like(values)
    out[n - 1 :] = (c[n:] - c[:-n]) / n
    out[: n - 1] = c[1:n] / np.arange(1, n)
    return out


def loss_plot(runs: list[Run]) -> Optional[str]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.2))
    drawn = False
    for run, color in zip(runs, _colors(len(runs))):
        steps, loss = run.series("loss")
        if len(steps):
            ax.plot(steps, loss, color=color, alpha=0.25, lw=0.8)
            ax.plot(steps, _smooth(loss), color=color, lw=1.6, label=f"{run.name}: train loss")
            drawn = True
        steps, val = run.series("val_loss", run.val)
        if len(steps):
            ax.plot(steps, val, "o-", color=color, lw=2, ms=4, label=f"{run.name}: val loss")
        for source, style in zip(run.val_sources, ("--", ":", "-.") * 20):
            steps, val = run.series(f"val_loss/{source}", run.val)
            if len(steps):
                ax.plot(steps, val, style, marker=".", color=color, lw=1.2, label=f"{run.name}: val {source}")
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("loss (train: raw and smoothed; validation: overall and per source)")
    return _png(fig)


def step_metrics_plot(runs: list[Run]) -> Optional[str]:
    plt = _pyplot()
    present = [(k, t, log) for k, t, log in STEP_METRICS if any(r.has(k) for r in runs)]
    if not present:
        return None
    cols = 3
    rows = (len(present) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(14, 3.3 * rows), squeeze=False)
    for ax, (key, title, log) in zip(axes.flat, present):
        for run, color in zip(runs, _colors(len(runs))):
            steps, values = run.series(key)
            if len(steps):
                ax.plot(steps, values, color=color, lw=1.0, label=run.name)
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _layer_lines(ax, runs: list[Run], metric: str) -> bool:
    """One run: a line per MoE layer. Several: per run the mean over layers (solid) and the
    max (dashed) in the run's colour."""
    drawn = False
    if len(runs) == 1:
        run = runs[0]
        plt = _pyplot()
        cmap = plt.get_cmap("viridis")
        n = max(len(run.layers) - 1, 1)
        for i, layer in enumerate(run.layers):
            steps, values = run.series(f"moe/layer{layer}/{metric}")
            if len(steps):
                ax.plot(steps, values, color=cmap(i / n), lw=1.0, label=f"layer {layer}")
                drawn = True
        if drawn and len(run.layers) <= 12:
            ax.legend(fontsize=7, ncol=2)
        return drawn
    for run, color in zip(runs, _colors(len(runs))):
        per_layer = [run.series(f"moe/layer{layer}/{metric}") for layer in run.layers]
        per_layer = [(s, v) for s, v in per_layer if len(s)]
        if not per_layer:
            continue
        n = min(len(s) for s, _ in per_layer)
        steps = per_layer[0][0][:n]
        stack = np.stack([v[:n] for _, v in per_layer])
        ax.plot(steps, stack.mean(0), color=color, lw=1.4, label=f"{run.name}: mean over layers")
        ax.plot(steps, stack.max(0), "--", color=color, lw=1.0, label=f"{run.name}: max")
        drawn = True
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def router_plot(runs: list[Run]) -> Optional[str]:
    plt = _pyplot()
    if not any(r.layers for r in runs):
        return None
    fig, axes = plt.subplots(2, 2, figsize=(14, 7.5))
    for ax, (metric, title) in zip(axes.flat, LAYER_METRICS):
        if not _layer_lines(ax, runs, metric):
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def a2a_plot(runs: list[Run]) -> Optional[str]:
    plt = _pyplot()
    if not any(r.has(f"moe/layer{layer}/a2a_bytes") for r in runs for layer in r.layers):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(14, 3.8))
    for ax, (metric, title) in zip(
        axes,
        (
            ("a2a_bytes", "all-to-all bytes per logging step (total over ranks)"),
            ("a2a_ranks_per_token", "EP ranks a token is sent to"),
        ),
    ):
        _layer_lines(ax, runs, metric)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def heatmap_plot(run: Run) -> Optional[str]:
    """Per MoE layer: experts (rows) x logging steps (columns), load / fair share, 0 to 2 (a
    column is the interval that ends at its step)."""
    loads = run.loads
    if loads is None or len(loads.steps) == 0:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    L = len(loads.layers)
    cols = min(4, L)
    rows = (L + cols - 1) // cols
    counts = loads.counts.astype(np.float64)  # [N, L, E]
    mean = counts.mean(axis=2, keepdims=True)
    ratio = np.divide(counts, mean, out=np.zeros_like(counts), where=mean > 0)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    steps = loads.steps
    extent = (loads.first_steps[0] - 0.5, steps[-1] + 0.5, ratio.shape[2] - 0.5, -0.5)
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= L:
            ax.axis("off")
            continue
        image = ax.imshow(
            ratio[:, i, :].T,
            aspect="auto",
            cmap="viridis",
            vmin=0,
            vmax=2,
            extent=extent,
            interpolation="nearest",
        )
        ax.set_title(f"layer {loads.layers[i]}", fontsize=9)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("expert", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="tokens / fair share")
    return _png(fig)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_table(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        last = run.train[-1] if run.train else {}
        val = run.val[-1].get("val_loss") if run.val else None
        rows.append(
            [
                run.name,
                run.status,
                _fmt(last.get("loss")),
                _fmt(val),
                _fmt(last.get("tokens_seen")),
                _fmt(last.get("tokens_per_s")),
                str(len(run.alarms)),
                str(run.path),
            ]
        )
    return _table(
        ["run", "status", "last loss", "last val loss", "tokens seen", "tokens/s", "alarms", "directory"],
        rows,
    )


def alarms_section(runs: list[Run]) -> str:
    rows = [
        [run.name, str(a["step"]), str(a.get("alarm")), str(a.get("message", ""))]
        for run in runs
        for a in run.alarms
    ]
    if not rows:
        return "<p>No alarm was raised.</p>"
    return _table(["run", "step", "alarm", "message"], rows)


_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ccc; padding-top: 8px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } img { max-width: 100%; display: block; margin: 6px 0; }
pre { background: #f7f7f7; padding: 8px; font-size: 12px; overflow-x: auto; }
.note { color: #666; font-size: 13px; }
"""


def build_report(run_dirs: list[Path]) -> str:
    """The HTML page for `run_dirs` (read now: a live run shows what it has written so far)."""
    names = unique_names(run_dirs)
    runs = [read_run(Path(p), name) for p, name in zip(run_dirs, names)]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>deepseek-moe report: {html.escape(', '.join(names))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Training report: {html.escape(', '.join(names))}</h1>",
        f"<p class='note'>Built {time.strftime('%Y-%m-%d %H:%M:%S')} from what the run directories held then.</p>",
        "<h2>Summary</h2>",
        summary_table(runs),
    ]
    skipped = [f"{r.name}: {r.skipped_lines}" for r in runs if r.skipped_lines]
    if skipped:
        parts.append(
            f"<p class='note'>Unreadable metrics lines skipped (a line being written): {', '.join(skipped)}</p>"
        )

    def section(title: str, body: Optional[str], missing: str) -> None:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(body if body else f"<p class='note'>{html.escape(missing)}</p>")

    section("Loss", loss_plot(runs), "No training step logged yet.")
    section("Optimizer and throughput", step_metrics_plot(runs), "No training step logged yet.")
    section(
        "Router, per MoE layer",
        router_plot(runs),
        "No router statistics (a dense model, or health.expert_stats=false).",
    )
    for run in runs:
        section(
            f"Expert loads over time: {run.name}",
            heatmap_plot(run),
            "No expert_loads.bin (a dense model, health.expert_stats=false, or no logging step yet).",
        )
    section("All-to-all traffic", a2a_plot(runs), "No all-to-all traffic (parallel.ep_size=1).")
    parts.append("<h2>Alarms</h2>")
    parts.append(alarms_section(runs))
    parts.append("<h2>Resolved config</h2>")
    for run in runs:
        text = run.config_text if run.config_text is not None else "(no config.yaml)"
        parts.append(
            f"<details><summary>{html.escape(run.name)}</summary><pre>{html.escape(text)}</pre></details>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
