"""Comparison results -> markdown tables (mean and std over seeds) and PNG plots, and what a run's
metrics.jsonl says about it (final losses, token groups, the weights' curriculum).

Numbers are per-domain held-out losses (nats/token, lower is better) from each run's eval; the
spread is the sample standard deviation over seeds (ddof=1; 0 with one seed). Overheads are each
method's total FLOPs over its training FLOPs (training FLOPs are equal across methods by design).
"""
from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from adapt_pretrain.data.manifest import MANIFEST, Manifest
from adapt_pretrain.experiments.methods import runs as R
from adapt_pretrain.experiments.methods.plan import CompareConfig, RunSpec, tokens_per_step
from adapt_pretrain.experiments.methods.presets import get_preset

BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _finite_mean(values: Iterable[Any]) -> float:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else float("nan")


def aggregate(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """method -> {seeds, domains: {d: (mean, std)}, averages: {seen/unseen/all: (mean, std)}, flops...}."""
    by_method: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in results:
        by_method[r["method"]].append(r)
    out: dict[str, Any] = {}
    for method, rs in by_method.items():
        domains = sorted({d for r in rs for d in r["eval"]["domains"]})
        avgs = sorted({a for r in rs for a in r["eval"]["averages"]})
        out[method] = {
            "seeds": sorted(int(r["seed"]) for r in rs),
            "per_seed": {int(r["seed"]): {a: v["loss"] for a, v in r["eval"]["averages"].items()} for r in rs},
            "domains": {d: mean_std([r["eval"]["domains"][d]["loss"] for r in rs if d in r["eval"]["domains"]])
                        for d in domains},
            "averages": {a: mean_std([r["eval"]["averages"][a]["loss"] for r in rs if a in r["eval"]["averages"]])
                         for a in avgs},
            "flops_total": float(np.mean([r["flops"]["total"] for r in rs])),
            "flops_training": float(np.mean([r["flops"]["training"] for r in rs])),
            "overhead_ratio": float(np.mean([r["flops"]["overhead_ratio"] for r in rs])),
            "train_seconds": float(np.mean([r.get("train_seconds", 0.0) for r in rs])),
            "seen": sorted({d for r in rs for d in r["eval"].get("seen", [])}),
            "weight_std_mean": _finite_mean(r.get("weight_std_mean") for r in rs),
            "ess_frac_mean": _finite_mean(r.get("ess_frac_mean") for r in rs),
            "domain_weight": {d: float(np.mean([r["domain_weight"][d] for r in rs if d in r.get("domain_weight", {})]))
                              for d in sorted({d for r in rs for d in r.get("domain_weight", {})})},
        }
    return out


def _fmt(ms: tuple[float, float]) -> str:
    return f"{ms[0]:.3f} ± {ms[1]:.3f}"


def _fmt_ppl(ms: tuple[float, float]) -> str:
    """Mean loss ± std, with the perplexity of the mean loss (geometric mean of domain perplexities)."""
    return f"{_fmt(ms)} ({math.exp(ms[0]):.1f})" if math.isfinite(ms[0]) else ""


def markdown_tables(agg: Mapping[str, Any], order: Sequence[str], baseline: str = "uniform") -> str:
    """Summary table (averages, deltas vs baseline, FLOPs) and per-domain table."""
    methods = [m for m in order if m in agg]
    if not methods:
        return "_no finished runs_\n"
    seen = sorted({d for m in methods for d in agg[m]["seen"]})
    domains = sorted({d for m in methods for d in agg[m]["domains"]}, key=lambda d: (d not in seen, d))
    base = agg.get(baseline)
    lines = ["Held-out loss in nats/token, mean ± std over seeds, (perplexity of the mean):", "",
             "| method | seeds | avg seen | avg unseen | avg all | Δ seen vs uniform | Δ unseen vs uniform "
             "| training FLOPs | total FLOPs | overhead | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        a = agg[m]
        av = a["averages"]
        get = lambda k: av.get(k, (math.nan, math.nan))  # noqa: E731
        delta = lambda k: (f"{get(k)[0] - base['averages'][k][0]:+.3f}" if base and k in base["averages"] and k in av  # noqa: E731
                           else "")
        lines.append(f"| {m} | {len(a['seeds'])} | {_fmt_ppl(get('seen'))} | {_fmt_ppl(get('unseen'))} | {_fmt_ppl(get('all'))} "
                     f"| {delta('seen')} | {delta('unseen')} | {a['flops_training']:.3g} "
                     f"| {a['flops_total']:.3g} | {a['overhead_ratio']:.3f}x | {a['train_seconds']:.0f} |")
    lines += paired_deltas(agg, methods, baseline)
    lines += ["", "Per-domain held-out loss (nats/token, mean ± std over seeds; * = anchor / seen domain):", "",
              "| domain | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for d in domains:
        cells = []
        best = min(agg[m]["domains"][d][0] for m in methods if d in agg[m]["domains"])
        for m in methods:
            if d not in agg[m]["domains"]:
                cells.append("")
                continue
            text = _fmt(agg[m]["domains"][d])
            cells.append(f"**{text}**" if agg[m]["domains"][d][0] == best else text)
        lines.append(f"| {d}{' *' if d in seen else ''} | " + " | ".join(cells) + " |")
    online = [m for m in methods if (agg[m].get("weight_std_mean") or 0) > 1e-6 and agg[m].get("domain_weight")]
    if online:
        lines += ["", "Online weighting, what the weights did during training (mean over steps and seeds): "
                  "a domain's mean token weight relative to the batch mean (1.00 = uniform), the weight std "
                  "within a step, and the effective sample size fraction:", "",
                  "| domain | " + " | ".join(online) + " |", "|---|" + "---|" * len(online)]
        for d in domains:
            lines.append(f"| {d}{' *' if d in seen else ''} | "
                         + " | ".join(f"{agg[m]['domain_weight'].get(d, float('nan')):.2f}" for m in online) + " |")
        lines.append("| weight std | " + " | ".join(f"{agg[m]['weight_std_mean']:.3f}" for m in online) + " |")
        lines.append("| ESS fraction | " + " | ".join(f"{agg[m]['ess_frac_mean']:.3f}" for m in online) + " |")
    return "\n".join(lines) + "\n"


def paired_deltas(agg: Mapping[str, Any], methods: Sequence[str], baseline: str) -> list[str]:
    """Markdown lines: each method's avg seen / unseen loss minus the baseline's, seed by seed (same
    seed = same initialisation and data order, so these pairs are the sharper evidence)."""
    base = agg.get(baseline)
    others = [m for m in methods if m != baseline and base]
    seeds = sorted({s for m in others for s in agg[m].get("per_seed", {}) if s in base.get("per_seed", {})}) if base else []
    if not others or not seeds:
        return []
    lines = ["", f"Paired Δ vs {baseline}, seed by seed (avg seen / avg unseen, nats/token; negative = better):", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for m in others:
        cells = []
        for s in seeds:
            mine, ref = agg[m]["per_seed"].get(s), base["per_seed"][s]
            cells.append(" / ".join(f"{mine[k] - ref[k]:+.3f}" if mine and k in mine and k in ref else "-"
                                    for k in ("seen", "unseen")) if mine else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def plot_all(agg: Mapping[str, Any], order: Sequence[str], curves: Mapping[str, list[tuple[list[int], list[float]]]],
             out_dir: str, baseline: str = "uniform",
             weights: Mapping[str, Mapping[str, tuple[list[int], list[float]]]] | None = None) -> list[str]:
    """summary.png (seen/unseen/all bars with std), domain_delta.png (vs baseline), train_loss.png and,
    given online methods' per-step domain weights, weight_curricula.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    methods = [m for m in order if m in agg]
    paths = []
    # 1. averages
    fig, ax = plt.subplots(figsize=(9, 4))
    groups = ["seen", "unseen", "all"]
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        means = [agg[m]["averages"].get(g, (np.nan, 0))[0] for g in groups]
        stds = [agg[m]["averages"].get(g, (np.nan, 0))[1] for g in groups]
        ax.bar(np.arange(len(groups)) + i * width, means, width, yerr=stds, capsize=3, label=m)
    ax.set_xticks(np.arange(len(groups)) + width * (len(methods) - 1) / 2, [f"avg {g}" for g in groups])
    allv = [agg[m]["averages"][g][0] for m in methods for g in groups if g in agg[m]["averages"]]
    if allv:
        ax.set_ylim(min(allv) - 0.15, max(allv) + 0.1)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Held-out loss by domain group (mean ± std over seeds; lower is better)")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "summary.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # 2. per-domain delta vs baseline
    if baseline in agg:
        seen = set(agg[baseline]["seen"])
        domains = sorted(agg[baseline]["domains"], key=lambda d: (d not in seen, d))
        others = [m for m in methods if m != baseline]
        if others:
            mat = np.array([[agg[m]["domains"].get(d, (np.nan, 0))[0] - agg[baseline]["domains"][d][0]
                             for d in domains] for m in others])
            lim = float(np.nanmax(np.abs(mat))) or 1.0
            fig, ax = plt.subplots(figsize=(max(7.0, 2.0 + 0.8 * len(domains)), 2.0 + 0.45 * len(others)))
            im = ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
            ax.set_xticks(range(len(domains)), [d + (" *" if d in seen else "") for d in domains], rotation=45, ha="right")
            ax.set_yticks(range(len(others)), others)
            for i in range(mat.shape[0]):
                for j in range(mat.shape[1]):
                    ax.text(j, i, f"{mat[i, j]:+.2f}", ha="center", va="center", fontsize=7)
            fig.colorbar(im, ax=ax, label=f"loss − {baseline} loss")
            ax.set_title(f"Per-domain held-out loss vs {baseline} (blue = better; * = anchor domain)", fontsize=9)
            fig.tight_layout()
            paths.append(os.path.join(out_dir, "domain_delta.png"))
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)
    # 3. training loss curves (unweighted mean loss of the training batches, mean over seeds)
    if curves:
        fig, ax = plt.subplots(figsize=(8, 4))
        for m in methods:
            runs = [c for c in curves.get(m, []) if c[0]]
            if not runs:
                continue
            n = min(len(c[1]) for c in runs)
            y = np.mean([c[1][:n] for c in runs], axis=0)
            k = max(1, n // 50)
            y = np.convolve(y, np.ones(k) / k, mode="valid")
            ax.plot(runs[0][0][: len(y)], y, label=m)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (unweighted, own training data)")
        ax.set_title("Training loss (smoothed; offline methods train on a different set)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "train_loss.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    # 4. weight curricula of the online methods (one run each)
    online = [m for m in methods if (weights or {}).get(m)]
    if online:
        seen = set().union(*(agg[m]["seen"] for m in online))
        names = sorted({d for m in online for d in weights[m]}, key=lambda d: (d not in seen, d))
        # one colour per domain in every panel: tab20's 10 dark hues first, then their light twins
        color = {d: plt.get_cmap("tab20")((2 * i) % 20 + (2 * i // 20) % 2) for i, d in enumerate(names)}
        fig, axes = plt.subplots(1, len(online), figsize=(5.5 * len(online), 4), squeeze=False, sharey=True)
        for ax, m in zip(axes[0], online):
            for d in names:
                if d not in weights[m]:
                    continue
                steps, values = weights[m][d]
                k = max(1, len(values) // 50)
                y = np.convolve(values, np.ones(k) / k, mode="valid")
                ax.plot(steps[: len(y)], y, color=color[d], lw=2.0 if d in seen else 1.0, ls="-" if d in seen else "--")
            ax.axhline(1.0, color="k", lw=0.5)
            ax.set_title(m, fontsize=9)
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("domain mean weight / batch mean weight")
        handles = [plt.Line2D([], [], color=color[d], lw=2.0 if d in seen else 1.0, ls="-" if d in seen else "--")
                   for d in names]
        axes[0][-1].legend(handles, [d + (" *" if d in seen else "") for d in names], fontsize=7, loc="center left",
                           bbox_to_anchor=(1.0, 0.5))
        fig.suptitle("Weight curricula (smoothed; * = anchor domain; 1 = uniform)", fontsize=10)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "weight_curricula.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def update_marked_block(path: str, block: str, title: str = "# Results") -> None:
    """Replace the text between the compare markers of `path` (create the file if needed), keeping the rest."""
    body = f"{BEGIN}\n{block.rstrip()}\n{END}"
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        if BEGIN in text and END in text:
            text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: body, text, count=1, flags=re.S)
        else:
            text = text.rstrip() + "\n\n" + body + "\n"
    else:
        text = f"{title}\n\n{body}\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _scalars_by_step(run_dir: str) -> dict[int, dict[str, float]]:
    """step -> scalars of the last record of that step in the run's metrics.jsonl (empty if none)."""
    from adapt_pretrain.monitor.monitor import read_metrics

    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        return {}
    steps, _ = read_metrics(run_dir)
    return {s: line["scalars"] for s, line in steps.items() if isinstance(line.get("scalars"), dict)}


def metrics_summary(run_dir: str) -> dict[str, float]:
    """Steps, summed token groups and final losses from the run's metrics.jsonl (last record per step)."""
    per_step = _scalars_by_step(run_dir)
    steps = sorted(per_step)
    groups = sum(float(per_step[s].get("adapt/groups", 0.0)) for s in steps)
    last = per_step[steps[-1]] if steps else {}

    def mean_of(key: str) -> float:
        values = [float(per_step[s][key]) for s in steps if key in per_step[s]]
        return float(sum(values) / len(values)) if values else float("nan")

    return {"steps_logged": len(steps), "groups": groups, "final_loss": float(last.get("loss", float("nan"))),
            "final_loss_unweighted": float(last.get("loss/mean", last.get("loss", float("nan")))),
            "weight_std_mean": mean_of("adapt/weight_std"), "ess_frac_mean": mean_of("adapt/ess_frac"),
            "domain_weight": domain_weights(per_step)}


def domain_shares(scalars: dict[str, float]) -> Iterator[tuple[str, float, float]]:
    """(domain, token share, weighted share) of one step's monitor scalars, for domains present in it;
    weighted share / token share is the domain's mean weight relative to the step's mean weight (a run
    without weights logs no weighted share: 1)."""
    for key, share in scalars.items():
        if key.startswith("domain/") and key.endswith("/token_share") and share > 0:
            d = key[len("domain/"):-len("/token_share")]
            yield d, float(share), float(scalars.get(f"domain/{d}/weighted_share", share))


def domain_weights(per_step: dict[int, dict[str, float]]) -> dict[str, float]:
    """Each domain's token-weighted mean weight over the run, relative to the run's mean weight (1 = uniform)."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for sc in per_step.values():
        for d, share, weighted in domain_shares(sc):
            num[d] = num.get(d, 0.0) + weighted
            den[d] = den.get(d, 0.0) + share
    return {d: num[d] / den[d] for d in sorted(num) if den[d] > 0}


def weight_curves(run_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    """domain -> (steps, the domain's mean token weight relative to the step's mean weight): the weight
    curriculum of an online method, step by step."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for step, sc in sorted(_scalars_by_step(run_dir).items()):
        for d, share, weighted in domain_shares(sc):
            steps, values = out.setdefault(d, ([], []))
            steps.append(step)
            values.append(weighted / share)
    return out


def loss_curve(run_dir: str, key: str = "loss/mean") -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar from metrics.jsonl (falls back to `loss`)."""
    per_step = {s: sc.get(key, sc.get("loss")) for s, sc in _scalars_by_step(run_dir).items()}
    steps = sorted(s for s, v in per_step.items() if v is not None)
    return steps, [float(per_step[s]) for s in steps]


def write_report(cfg: CompareConfig, specs: list[RunSpec], report: str, plots_dir: str) -> list[str]:
    """Update the marked block of `report` with the tables of the finished runs and write the plots;
    returns the plot paths."""
    results = [r for r in (R.cached_result(s) for s in specs) if r is not None]
    agg = aggregate(results)
    curves: dict[str, list] = {}
    weights: dict[str, dict] = {}
    for s in specs:
        if R.cached_result(s) is not None:
            curves.setdefault(s.method, []).append(loss_curve(s.run_dir))
            if s.method not in weights and s.config.get("adapt", {}).get("enabled"):
                weights[s.method] = weight_curves(s.run_dir)  # the first finished seed
    paths = plot_all(agg, cfg.methods, curves, plots_dir, weights=weights)
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(report)))  # noqa: E731
    done, total = len(results), len(specs)
    steps, per_step = tokens_per_step(specs[0].config)
    block = (f"_Generated by `adapt-pretrain compare` from {done}/{total} finished runs "
             f"({len(cfg.methods)} methods x seeds {cfg.seeds}); every run trains {steps} steps x {per_step} tokens "
             f"= {steps * per_step:,} tokens._\n\n" + markdown_tables(agg, cfg.methods) + "\n"
             + "\n".join(f"![{os.path.basename(p)}]({rel(p)})" for p in paths) + "\n")
    update_marked_block(report, block + data_table(cfg, steps * per_step))
    return paths


def data_table(cfg: CompareConfig, budget: int) -> str:
    """Token share per domain of the full training split and of each derived one, and how often a
    run at `budget` tokens passes over each (top-k subsets repeat, the full data does not)."""
    dirs = {"full (uniform, adapt*, linupper)": cfg.data_dir}
    for m in cfg.methods:
        variant = get_preset(m).data_variant
        if variant and os.path.isfile(os.path.join(cfg.variant_dir(variant), MANIFEST)):
            dirs[variant] = cfg.variant_dir(variant)
    shares: dict[str, dict[str, float]] = {}
    passes: dict[str, float] = {}
    for name, path in dirs.items():
        man = Manifest.load(path)
        per = man.raw["splits"]["train"]["tokens_per_domain"]
        total = sum(per.values())
        shares[name] = {d: n / total for d, n in per.items()}
        passes[name] = budget / total
    domains = sorted({d for v in shares.values() for d in v})
    lines = ["", "Training data of each run (token share per domain, %; passes = training tokens / tokens in the set):", "",
             "| domain | " + " | ".join(dirs) + " |", "|---|" + "---|" * len(dirs)]
    for d in domains:
        lines.append(f"| {d} | " + " | ".join(f"{100 * shares[n].get(d, 0.0):.1f}" for n in dirs) + " |")
    lines.append("| passes | " + " | ".join(f"{passes[n]:.2f}" for n in dirs) + " |")
    return "\n".join(lines) + "\n"
