"""LinUpper online loss reweighting (Sow et al., ICLR 2025), the second online policy (docs/METHOD.md).

Per-sample losses are min-max normalised to [-d, d], w' = min(l + d, d), w = softmax(w' / r) over
the global batch. Two layout-independence choices (documented in docs/METHOD.md):
- the min and max are those of the previous step's global batch (the current step's are only known
  after every micro-batch and rank has run); the first step is uniform;
- the softmax denominator is replaced by the constant exp(d / r): with `normalize: weights` every
  constant cancels, so this equals the softmax exactly; for `tokens`/`sum` it keeps weights in
  (0, 1] instead of shrinking them with the batch size.
"""
from __future__ import annotations

import torch


def linupper_weights(group_loss: torch.Tensor, loss_min: float, loss_max: float, d: float, r: float) -> torch.Tensor:
    """Weights in (0, 1] for per-group mean losses given the global batch's loss range."""
    span = max(loss_max - loss_min, 1e-12)
    normalised = (group_loss.detach().float() - loss_min) / span * (2 * d) - d
    normalised = normalised.clamp(-d, d)
    upper = torch.minimum(normalised + d, torch.full_like(normalised, d))
    return torch.exp((upper - d) / r)
