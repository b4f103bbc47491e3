"""Static domain mixing (the form DoReMi and RegMix output): domain weights -> what to train on.

Two deterministic realisations of the same weights:
- `plan_mixture`: per-document repeat counts (whole passes over a domain, then a seeded subset
  for the remainder) so that a uniformly sampled stream over the result has the target token share
  per domain. This needs no loader hook: the result is written as an ordinary data directory.
- `domain_schedule`: an interleaved sequence of domains (smooth weighted round-robin), for a loader
  that draws each next document from a chosen domain; every prefix is as close to the weights as
  integer counts allow, so short runs see the intended mix too.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np


def normalize_domain_weights(weights: Mapping[str, float], domains: Sequence[str]) -> dict[str, float]:
    """Weights over `domains` summing to 1; missing domains get 0, unknown or negative ones raise."""
    unknown = sorted(set(weights) - set(domains))
    if unknown:
        raise ValueError(f"domain weights name unknown domain(s) {unknown}; domains are {sorted(domains)}")
    raw = {d: float(weights.get(d, 0.0)) for d in domains}
    bad = sorted(d for d, w in raw.items() if not np.isfinite(w) or w < 0)
    if bad:
        raise ValueError(f"domain weights must be finite and >= 0; bad: {bad}")
    total = sum(raw.values())
    if total <= 0:
        raise ValueError("domain weights sum to 0")
    return {d: w / total for d, w in raw.items()}


def domain_token_targets(weights: Mapping[str, float], total_tokens: int) -> dict[str, int]:
    """Integer tokens per domain summing exactly to `total_tokens` (largest remainder; ties by name)."""
    norm = normalize_domain_weights(weights, sorted(weights))
    exact = {d: w * total_tokens for d, w in norm.items()}
    out = {d: int(np.floor(x)) for d, x in exact.items()}
    left = total_tokens - sum(out.values())
    for d in sorted(exact, key=lambda d: (-(exact[d] - out[d]), d))[:left]:
        out[d] += 1
    return out


def repeat_counts(doc_tokens: Sequence[int], target_tokens: int, order: Sequence[int] | None = None) -> list[int]:
    """How many times each document of one domain appears so the domain holds ~`target_tokens`.

    Every document gets `target // domain_total` whole passes; the remainder is filled by walking
    `order` (default: the given order) and keeping documents until the remainder is reached (the
    crossing document is kept, so a domain is never short by more than zero tokens).
    """
    tokens = [int(t) for t in doc_tokens]
    total = sum(tokens)
    if target_tokens < 0:
        raise ValueError("target_tokens must be >= 0")
    if total == 0:
        if target_tokens:
            raise ValueError("a domain with no tokens cannot receive a positive target")
        return [0] * len(tokens)
    passes, rest = divmod(int(target_tokens), total)
    counts = [passes] * len(tokens)
    walk = list(range(len(tokens))) if order is None else [int(i) for i in order]
    if sorted(walk) != list(range(len(tokens))):
        raise ValueError("order must be a permutation of the document indices")
    filled = 0
    for i in walk:
        if filled >= rest:
            break
        counts[i] += 1
        filled += tokens[i]
    return counts


def plan_mixture(docs: Iterable[tuple[int, str, int]], weights: Mapping[str, float], total_tokens: int,
                 seed: int = 0) -> dict[int, int]:
    """doc_id -> repeat count realising `weights` over `total_tokens` tokens.

    `docs` are (doc_id, domain, tokens). Domains in `docs` but absent from `weights` get weight 0.
    The remainder subset of each domain is drawn from a permutation seeded by (seed, domain index),
    so adding a domain does not reshuffle the others.
    """
    by_domain: dict[str, list[tuple[int, int]]] = {}
    for doc_id, domain, n in docs:
        by_domain.setdefault(domain, []).append((int(doc_id), int(n)))
    domains = sorted(by_domain)
    norm = normalize_domain_weights(weights, domains)
    targets = domain_token_targets(norm, total_tokens)
    out: dict[int, int] = {}
    for k, domain in enumerate(domains):
        items = sorted(by_domain[domain])
        order = np.random.default_rng([seed, k]).permutation(len(items))
        counts = repeat_counts([n for _, n in items], targets[domain], order)
        out.update({doc_id: c for (doc_id, _), c in zip(items, counts)})
    return out


def domain_schedule(weights: Mapping[str, float], n: int) -> list[str]:
    """The first `n` domains of a smooth weighted round-robin over `weights` (ties: name order).

    Each turn every domain gains its weight, the richest is chosen and pays 1. After k turns each
    domain has been chosen within one of weight * k times, at every k.
    """
    domains = sorted(weights)
    norm = normalize_domain_weights(weights, domains)
    credit = {d: 0.0 for d in domains}
    out: list[str] = []
    for _ in range(n):
        for d in domains:
            credit[d] += norm[d]
        pick = max(domains, key=lambda d: (credit[d], -domains.index(d)))
        credit[pick] -= 1.0
        out.append(pick)
    return out
