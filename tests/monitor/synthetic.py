"""A synthetic but realistic ADAPT run for monitor tests: scores start bunched and spread over
training (the implicit curriculum of docs/MONITORING.md), one domain drifts towards the anchors, the others away."""
from __future__ import annotations

import torch

from adapt_pretrain.monitor import Monitor, StatsLayout, WandbConfig, finalize, partial_stats

DOMAINS = ("web", "code", "wiki", "books")


def synthetic_batch(step: int, total: int, groups: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-group tensors of one micro-batch at `step` of `total`."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    progress = step / max(total - 1, 1)
    domain = torch.randint(0, len(DOMAINS), (groups,), generator=g)
    pull = torch.tensor([0.6, -0.4, 0.3, -0.7], dtype=torch.float64)[domain]  # target-likeness per domain
    spread = 0.05 + 0.6 * progress
    scores = (pull * progress + spread * torch.randn(groups, generator=g, dtype=torch.float64)).clamp(-1, 1)
    weights = torch.sigmoid(scores / 0.25)
    tokens = torch.randint(8, 256, (groups,), generator=g).double()
    per_tok = 4.0 - 1.5 * progress + 0.3 * domain.double() + 0.1 * torch.randn(groups, generator=g, dtype=torch.float64)
    return {"weights": weights, "scores": scores, "group_tokens": tokens, "group_domain": domain,
            "group_loss": per_tok * tokens}


def write_synthetic_run(run_dir: str, steps: int = 60, wandb: WandbConfig | None = None,
                        seed: int = 0, stdout: bool = False) -> Monitor:
    """Log a whole synthetic run through the real Monitor; returns the (closed) monitor."""
    layout = StatsLayout(num_domains=len(DOMAINS))  # the trainer's bins
    wb = wandb or WandbConfig(enabled=False, histogram_interval=5, table_interval=20)
    mon = Monitor(run_dir, {"adapt": {"enabled": True, "tau": 0.25}, "seed": seed}, wb, rank=0, stdout=stdout)
    for step in range(steps):
        b = synthetic_batch(step, steps, seed=seed)
        m = finalize(partial_stats(layout, **b), DOMAINS)
        scalars = dict(m.scalars, lr=3e-4 * min(1.0, (step + 1) / 10), **{"train/tokens_per_s": 1.0e4 + step})
        hists = m.histograms if mon.histogram_due(step) else None
        tables = None
        if mon.table_due(step):
            order = torch.argsort(b["weights"], descending=True)
            pick = torch.cat([order[:3], order[-3:]])
            tables = {"extremes": [{"domain": DOMAINS[int(b["group_domain"][i])], "id": int(i),
                                    "snippet": f"doc {int(i)} text", "weight": float(b["weights"][i])} for i in pick]}
        mon.log_step(step, scalars, hists, tables)
        if step % 20 == 0:
            mon.log_event(step, "anchor_refresh", centroid_shift=0.01 * (step + 1), num_anchors=50)
    mon.close()
    return mon
