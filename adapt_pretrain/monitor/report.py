"""`adapt-pretrain report RUN_DIR [RUN_DIR ...] [--out DIR]`: PNG plots + a static HTML page.

Why: runs without W&B (or before `wandb sync`) still need to show the curriculum, and method
comparisons need several runs on the same axes. Reads only `metrics.jsonl` (monitor.py), so it
works on a laptop with matplotlib alone.

Plots (several runs: one panel per run for per-run views, one line per run for shared views):
- curriculum.png: per-domain mean weight over steps;
- weight_heatmap.png: weight distribution over steps: each logged histogram as a column normalised
  to its own peak (steps log only their populated span of the fixed bins: every column is put on
  one grid as fine as the finest logged bin), under the p05/p25/p50/p75/p95 quantiles and min/max
  logged every step;
- loss.png: per-domain loss and the overall (unweighted, weighted) loss;
- effective.png: effective data ratio and ESS / groups.
"""
from __future__ import annotations

import argparse
import html
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from adapt_pretrain.monitor.monitor import read_metrics

PLOTS = ("curriculum", "weight_heatmap", "loss", "effective")


@dataclass
class RunSeries:
    """One run's metrics as arrays: step -> scalars, histograms and events."""

    name: str
    path: str
    steps: dict[int, dict[str, Any]]
    events: list[dict[str, Any]]

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(s, line["scalars"][key]) for s, line in self.steps.items() if key in line.get("scalars", {})]
        if not pts:
            return np.zeros(0), np.zeros(0)
        x, y = zip(*pts)
        return np.asarray(x, dtype=float), np.asarray(y, dtype=float)

    def domains(self) -> list[str]:
        found: dict[str, None] = {}
        for line in self.steps.values():
            for key in line.get("scalars", {}):
                if key.startswith("domain/") and key.count("/") >= 2:
                    found.setdefault(key.split("/", 1)[1].rsplit("/", 1)[0], None)
        return list(found)

    def histograms(self, key: str) -> list[tuple[int, np.ndarray, np.ndarray]]:
        out = []
        for s, line in self.steps.items():
            h = line.get("histograms", {}).get(key)
            if h:
                out.append((s, np.asarray(h["counts"], float), np.asarray(h["bins"], float)))
        return out


def load_runs(run_dirs: Sequence[str]) -> list[RunSeries]:
    """Load every run; names are directory basenames, made unique with their parent when they clash."""
    runs = []
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    for d, name in zip(run_dirs, names):
        if names.count(name) > 1:
            name = os.path.join(os.path.basename(os.path.dirname(os.path.normpath(d))), name)
        steps, events = read_metrics(d)
        runs.append(RunSeries(name, d, steps, events))
    return runs


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, width: float = 6.0, height: float = 3.6):
    plt = _plt()
    fig, axes = plt.subplots(n, 1, figsize=(width, height * n), squeeze=False)
    return plt, fig, [a[0] for a in axes]


def _save(fig: Any, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def ema(y: np.ndarray, alpha: float, x: np.ndarray | None = None) -> np.ndarray:
    """Exponential moving average with factor `alpha` per step; with `x` (steps) the decay is
    alpha ** (step gap), so a domain seen only every few steps is not dragged behind the others."""
    if alpha <= 0 or y.size == 0:
        return y
    gaps = np.ones_like(y) if x is None else np.diff(np.asarray(x, dtype=float), prepend=x[0])
    out = np.empty_like(y)
    acc = y[0]
    for i, (v, gap) in enumerate(zip(y, gaps)):
        keep = alpha ** gap
        acc = keep * acc + (1 - keep) * v
        out[i] = acc
    return out


def _line(ax: Any, x: np.ndarray, y: np.ndarray, smooth: float, fmt: str = "-", **kw: Any) -> None:
    """Raw values, or a faint raw line under its EMA when smoothing (per-step values are noisy)."""
    if smooth > 0:
        line, = ax.plot(x, y, fmt, alpha=0.2, lw=0.8, color=kw.get("color"))
        kw.setdefault("color", line.get_color())
        ax.plot(x, ema(y, smooth, x), fmt, **kw)
    else:
        ax.plot(x, y, fmt, **kw)


def _mark_events(ax: Any, run: RunSeries) -> None:
    for ev in run.events:
        if ev.get("event") == "anchor_refresh" and ev.get("step") is not None:
            ax.axvline(ev["step"], color="0.8", lw=0.6, zorder=0)


def plot_curriculum(runs: list[RunSeries], out_dir: str, smooth: float = 0.0) -> str:
    plt, fig, axes = _grid(len(runs))
    for ax, run in zip(axes, runs):
        _mark_events(ax, run)
        any_line = False
        for dom in run.domains():
            x, y = run.series(f"domain/{dom}/mean_weight")
            if x.size:
                _line(ax, x, y, smooth, label=dom, lw=1.4)
                any_line = True
        x, y = run.series("adapt/weight_mean")
        if x.size:
            _line(ax, x, y, smooth, "--", color="k", lw=1, label="all groups")
            any_line = True
        if not any_line:
            _empty(ax, "no per-domain weights logged")
        else:
            ax.legend(fontsize=7, ncol=2)
        ax.set(title=f"{run.name}: per-domain mean weight (token-weighted)", xlabel="step", ylabel="mean weight")
        ax.grid(alpha=0.3)
    return _save(fig, out_dir, "curriculum")


def _rebin(counts: np.ndarray, edges: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Counts on `edges` -> counts on `grid` via the piecewise-linear CDF (mass preserved in range)."""
    cdf = np.concatenate([[0.0], np.cumsum(counts)])
    return np.diff(np.interp(grid, edges, cdf))


def _column_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each logged step (half-way to the neighbours; one step wide when alone)."""
    if steps.size == 1:
        return np.asarray([steps[0] - 0.5, steps[0] + 0.5])
    half = np.diff(steps) / 2
    return np.concatenate([[steps[0] - half[0]], steps[:-1] + half, [steps[-1] + half[-1]]])


def relative_density(mat: np.ndarray) -> np.ndarray:
    """Each column (one step's histogram) divided by its own peak, empty cells masked.

    Normalising per step keeps every step's shape readable: with one colour scale for the whole run, a
    step where all groups share one bin saturates the scale and every other step turns one dark colour.
    """
    peak = mat.max(axis=0, keepdims=True)
    rel = np.divide(mat, peak, out=np.zeros_like(mat, dtype=float), where=peak > 0)
    return np.ma.masked_less_equal(rel, 0.0)


_QUANTILE_LINES = (("p50", "-", "black", "median"), ("p25", "--", "black", "p25 / p75"), ("p75", "--", "black", None),
                   ("p05", ":", "black", "p05 / p95"), ("p95", ":", "black", None),
                   ("min", "-", "tab:orange", "min / max"), ("max", "-", "tab:orange", None))


def heatmap_matrix(hists: list[tuple[int, np.ndarray, np.ndarray]],
                   max_rows: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """(grid edges, counts [rows, steps]) of the logged histograms on one grid.

    The grid is the finest logged bin over the union of the logged spans; when that needs more than
    `max_rows` rows (a wide spread: more rows than the plot has pixels for), k adjacent bins are
    merged into one row. Steps log the populated span of one fixed bin grid, so every span's edges
    lie on this grid and re-binning moves no mass between bins.
    """
    lo = min(float(e[0]) for (_, _, e) in hists)
    hi = max(float(e[-1]) for (_, _, e) in hists)
    width = min(float(np.diff(e).min()) for (_, _, e) in hists)
    fine_rows = max(int(round((hi - lo) / width)), 1)
    merge = -(-fine_rows // max_rows)
    rows = -(-fine_rows // merge)
    grid = lo + width * merge * np.arange(rows + 1)
    return grid, np.stack([_rebin(c, e, grid) for (_, c, e) in hists], axis=1)


def plot_weight_heatmap(runs: list[RunSeries], out_dir: str) -> str:
    """Weight distribution over steps: per-step relative density (logged histograms) under quantile lines.

    The quantile lines come from the quantiles logged every step, so they stay dense in time
    when histograms are logged only every few steps. The legend sits below the axes: inside, it
    hid the first steps' cells.
    """
    from matplotlib.colors import PowerNorm

    plt, fig, axes = _grid(len(runs), width=7.0, height=4.6)
    for ax, run in zip(axes, runs):
        hists = run.histograms("hist/weights")
        if not hists:
            _empty(ax, "no weight histograms logged")
            ax.set(title=f"{run.name}: weight distribution")
            continue
        grid, mat = heatmap_matrix(hists)
        x_edges = _column_edges(np.asarray([s for (s, _, _) in hists], float))
        mesh = ax.pcolormesh(x_edges, grid, relative_density(mat), cmap="Blues", norm=PowerNorm(0.5, 0.0, 1.0),
                             shading="flat")
        last_step = max(run.steps) if run.steps else x_edges[-1]
        ax.set_xlim(x_edges[0], max(x_edges[-1], last_step))
        fig.colorbar(mesh, ax=ax, label="groups / the step's fullest bin (sqrt scale)")
        # quantile lines, median and exact min/max, logged every step
        for key, style, color, label in _QUANTILE_LINES:
            x, y = run.series(f"adapt/weight_{key}")
            if x.size:
                ax.plot(x, y, style, color=color, lw=0.9, alpha=0.75, label=label)  # the cells stay visible
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
        # zoom onto the populated bins (weights often live in a narrow band early in training)
        populated = mat.sum(axis=1) > 0
        lo_i, hi_i = np.argmax(populated), len(populated) - np.argmax(populated[::-1])
        _, w_min = run.series("adapt/weight_min")
        _, w_max = run.series("adapt/weight_max")
        y_lo = min([grid[lo_i]] + ([w_min.min()] if w_min.size else []))
        y_hi = max([grid[hi_i]] + ([w_max.max()] if w_max.size else []))
        pad = 0.05 * max(y_hi - y_lo, 1e-6)
        ax.set_ylim(y_lo - pad, y_hi + pad)
        ax.set(title=f"{run.name}: weight distribution over steps", xlabel="step", ylabel="weight")
    return _save(fig, out_dir, "weight_heatmap")


def plot_loss(runs: list[RunSeries], out_dir: str, smooth: float = 0.0) -> str:
    plt, fig, axes = _grid(len(runs) + 1)
    for ax, run in zip(axes, runs):
        drew = False
        for dom in run.domains():
            x, y = run.series(f"domain/{dom}/loss")
            if x.size:
                _line(ax, x, y, smooth, label=dom, lw=1.2)
                drew = True
        if drew:
            ax.legend(fontsize=7, ncol=2)
        else:
            _empty(ax, "no per-domain loss logged")
        ax.set(title=f"{run.name}: per-domain training loss (unweighted CE per token)", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
    ax = axes[-1]
    drew = False
    for i, run in enumerate(runs):
        color = f"C{i}"
        for key, style in (("loss/mean", "-"), ("loss/weighted", ":")):
            x, y = run.series(key)
            if x.size:
                _line(ax, x, y, smooth, style, color=color, label=f"{run.name} {key}")
                drew = True
    if drew:
        ax.legend(fontsize=7)
    else:
        _empty(ax, "no loss logged")
    ax.set(title="overall loss (solid: unweighted, dotted: weighted)", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    return _save(fig, out_dir, "loss")


def plot_effective(runs: list[RunSeries], out_dir: str, smooth: float = 0.0) -> str:
    plt, fig, axes = _grid(2)
    for ax, key, label in ((axes[0], "adapt/effective_data_ratio", "effective data ratio (sum w*tokens / tokens)"),
                           (axes[1], "adapt/ess_frac", "effective sample size / groups")):
        drew = False
        for i, run in enumerate(runs):
            x, y = run.series(key)
            if x.size:
                _line(ax, x, y, smooth, color=f"C{i}", label=run.name)
                drew = True
        if drew:
            ax.legend(fontsize=7)
        else:
            _empty(ax, f"{key} not logged")
        ax.set(title=label, xlabel="step")
        ax.grid(alpha=0.3)
    return _save(fig, out_dir, "effective")


def _final_table(runs: list[RunSeries]) -> str:
    keys = ("loss/mean", "loss/weighted", "adapt/weight_mean", "adapt/weight_std",
            "adapt/effective_data_ratio", "adapt/ess_frac")
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = []
    for run in runs:
        last = run.steps[max(run.steps)]["scalars"] if run.steps else {}
        cells = "".join(f"<td>{last[k]:.4g}</td>" if k in last else "<td>-</td>" for k in keys)
        step = max(run.steps) if run.steps else "-"
        rows.append(f"<tr><td>{html.escape(run.name)}</td><td>{step}</td>{cells}</tr>")
    return f"<table><tr><th>run</th><th>last step</th>{head}</tr>{''.join(rows)}</table>"


def write_html(runs: list[RunSeries], out_dir: str, images: list[str]) -> str:
    figures = "\n".join(
        f'<figure><img src="{html.escape(os.path.basename(p))}"><figcaption>{html.escape(os.path.basename(p))}'
        f"</figcaption></figure>" for p in images)
    sources = "".join(f"<li>{html.escape(r.name)}: {html.escape(os.path.abspath(r.path))}</li>" for r in runs)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>adapt-pretrain report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}img{{max-width:100%}}</style></head><body>
<h1>adapt-pretrain report</h1><ul>{sources}</ul><h2>Final values</h2>{_final_table(runs)}
<h2>Plots</h2>{figures}</body></html>
"""
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return path


def render(run_dirs: Sequence[str], out_dir: str, smooth: float = 0.0) -> list[str]:
    """Render every plot and index.html into out_dir; return the written paths.
    smooth: EMA factor for line plots (0: raw per-step values)."""
    runs = load_runs(run_dirs)
    os.makedirs(out_dir, exist_ok=True)
    images = [plot_curriculum(runs, out_dir, smooth), plot_weight_heatmap(runs, out_dir),
              plot_loss(runs, out_dir, smooth), plot_effective(runs, out_dir, smooth)]
    return images + [write_html(runs, out_dir, images)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapt-pretrain report",
                                     description="Render PNG plots and an HTML page from run directories' metrics.jsonl.")
    parser.add_argument("run_dirs", nargs="+", help="run directories (each holding metrics.jsonl)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: RUN_DIR/report for one run, ./report for several)")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="EMA factor in [0, 1) for line plots, e.g. 0.9 (default 0: raw values)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.smooth < 1.0:
        parser.error("--smooth must be in [0, 1)")
    for d in args.run_dirs:
        if not os.path.exists(os.path.join(d, "metrics.jsonl")):
            parser.error(f"{d}: no metrics.jsonl")
    out = args.out or (os.path.join(args.run_dirs[0], "report") if len(args.run_dirs) == 1 else "report")
    paths = render(args.run_dirs, out, args.smooth)
    print(f"wrote {len(paths)} files to {out}: " + ", ".join(os.path.basename(p) for p in paths))
    return 0
