"""Pooling, scores and weights against fp64 references written from the definitions in docs/METHOD.md."""
import math

import pytest
import torch

from adapt_pretrain.config import AdaptConfig
from adapt_pretrain.core import AdaptEngine, pool_groups
from tests.core.batches import packed_batch


def reference_embeddings(hidden, group_ids, positions, num_groups):
    out = []
    for g in range(num_groups):
        rows = [positions[t].item() * hidden[t] for t in range(hidden.shape[0]) if group_ids[t] == g]
        v = torch.stack(rows).sum(0)
        out.append(v / v.norm())
    return torch.stack(out)


def engine_with_anchors(cfg: AdaptConfig, anchor_hidden, anchor_groups, anchor_pos, n_anchor):
    engine = AdaptEngine(cfg)
    s, c = engine.anchor_partial(anchor_hidden.float(), anchor_groups, anchor_pos, n_anchor)
    engine.finish_anchor_refresh(s, c, step=0)
    return engine


def test_pool_groups_matches_loop_and_ignores_padding():
    b = packed_batch([5, 1, 9], pad=4)
    pooled = pool_groups(b["hidden"].float(), b["group_ids"], b["positions"], b["num_groups"])
    for g in range(3):
        ref = sum(b["positions"][t].item() * b["hidden"][t] for t in range(len(b["group_ids"])) if b["group_ids"][t] == g)
        torch.testing.assert_close(pooled[g].double(), ref, rtol=1e-5, atol=1e-5)
    assert pooled.dtype == torch.float32


def test_score_is_mean_cosine_to_anchors_and_weight_is_clipped_sigmoid():
    a = packed_batch([7, 3, 12, 4], seed=1)
    b = packed_batch([6, 1, 15], seed=2)
    cfg = AdaptConfig(enabled=True, tau=0.3, w_min=0.4, w_max=0.9)
    engine = engine_with_anchors(cfg, a["hidden"], a["group_ids"], a["positions"], a["num_groups"])
    gw = engine.group_weights(b["hidden"].float(), b["group_ids"], b["positions"], b["num_groups"], step=0)
    anchors = reference_embeddings(a["hidden"], a["group_ids"], a["positions"], a["num_groups"])
    docs = reference_embeddings(b["hidden"], b["group_ids"], b["positions"], b["num_groups"])
    mean_cos = (docs @ anchors.T).mean(dim=1)
    torch.testing.assert_close(gw.scores.double(), mean_cos, rtol=1e-4, atol=1e-5)
    expected = [min(max(1 / (1 + math.exp(-s / 0.3)), 0.4), 0.9) for s in mean_cos.tolist()]
    torch.testing.assert_close(gw.weights.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-5)


def test_weights_stay_within_bounds_for_extreme_temperatures():
    a = packed_batch([4, 4], seed=3)
    b = packed_batch([3] * 20, seed=4)
    for tau, lo, hi in [(1e-4, 0.2, 0.7), (100.0, 0.0, 0.3), (1.0, 0.6, 10.0)]:
        cfg = AdaptConfig(enabled=True, tau=tau, w_min=lo, w_max=hi)
        engine = engine_with_anchors(cfg, a["hidden"], a["group_ids"], a["positions"], a["num_groups"])
        w = engine.group_weights(b["hidden"].float(), b["group_ids"], b["positions"], 20, step=0).weights
        assert bool(((w >= lo) & (w <= hi)).all()), (tau, w)


def test_permuting_documents_permutes_weights_and_batch_mates_do_not_matter():
    a = packed_batch([5, 5], seed=5)
    lengths = [4, 9, 2, 6]
    b = packed_batch(lengths, seed=6)
    engine = engine_with_anchors(AdaptConfig(enabled=True), a["hidden"], a["group_ids"], a["positions"], 2)
    w = engine.group_weights(b["hidden"].float(), b["group_ids"], b["positions"], 4, step=0).weights
    order = [2, 0, 3, 1]  # new group k is old document order[k]
    starts = [sum(lengths[:g]) for g in range(4)]
    idx = torch.cat([torch.arange(starts[g], starts[g] + lengths[g]) for g in order])
    new_groups = torch.cat([torch.full((lengths[g],), k) for k, g in enumerate(order)])
    w_perm = engine.group_weights(b["hidden"][idx].float(), new_groups, b["positions"][idx], 4, step=0).weights
    torch.testing.assert_close(w_perm, w[order])
    # a document alone in its batch gets the weight it had among batch-mates
    alone = engine.group_weights(b["hidden"][idx[:lengths[2]]].float(), torch.zeros(lengths[2], dtype=torch.long),
                                 b["positions"][idx[:lengths[2]]], 1, step=0).weights
    torch.testing.assert_close(alone, w[2:3])


def test_warmup_and_uniform_give_ones_and_disabled_needs_no_anchors():
    a = packed_batch([5], seed=7)
    b = packed_batch([3, 8], seed=8)
    engine = engine_with_anchors(AdaptConfig(enabled=True, warmup_steps=3), a["hidden"], a["group_ids"], a["positions"], 1)
    assert torch.equal(engine.group_weights(b["hidden"].float(), b["group_ids"], b["positions"], 2, step=2).weights, torch.ones(2))
    assert not torch.equal(engine.group_weights(b["hidden"].float(), b["group_ids"], b["positions"], 2, step=3).weights, torch.ones(2))
    for cfg in (AdaptConfig(enabled=False), AdaptConfig(enabled=True, policy="uniform")):
        w = AdaptEngine(cfg).group_weights(None, b["group_ids"], b["positions"], 2, step=0).weights
        assert torch.equal(w, torch.ones(2))


def test_standardize_uses_previous_steps_global_statistics():
    a = packed_batch([6, 6], seed=9)
    step0 = packed_batch([4, 5, 6, 7], seed=10)
    step1 = packed_batch([3, 8, 5], seed=11)
    cfg = AdaptConfig(enabled=True, standardize=True, standardize_momentum=0.5, tau=1.0)
    engine = engine_with_anchors(cfg, a["hidden"], a["group_ids"], a["positions"], 2)
    g0 = engine.group_weights(step0["hidden"].float(), step0["group_ids"], step0["positions"], 4, step=0)
    assert torch.equal(g0.weights, torch.ones(4)), "no statistics yet: uniform"
    engine.end_step()
    s0 = g0.scores.double()
    torch.testing.assert_close(engine.score_stats.mean, s0.mean().item())
    torch.testing.assert_close(engine.score_stats.var, s0.var(unbiased=False).item())
    g1 = engine.group_weights(step1["hidden"].float(), step1["group_ids"], step1["positions"], 3, step=1)
    z = (g1.scores.double() - s0.mean()) / math.sqrt(s0.var(unbiased=False).item() + 1e-6)
    torch.testing.assert_close(g1.weights.double(), torch.sigmoid(z), rtol=1e-4, atol=1e-5)
    engine.end_step()
    s1 = g1.scores.double()
    torch.testing.assert_close(engine.score_stats.mean, 0.5 * s0.mean().item() + 0.5 * s1.mean().item())


def test_anchor_refresh_schedule_and_state_round_trip():
    a = packed_batch([5, 7], seed=12)
    engine = AdaptEngine(AdaptConfig(enabled=True, refresh_interval=4))
    assert engine.needs_anchor_refresh(0)
    s, c = engine.anchor_partial(a["hidden"].float(), a["group_ids"], a["positions"], 2)
    event = engine.finish_anchor_refresh(s, c, 0)
    assert event["anchors"] == 2.0
    assert [engine.needs_anchor_refresh(k) for k in range(1, 9)] == [False, False, False, True, False, False, False, True]
    restored = AdaptEngine(AdaptConfig(enabled=True, refresh_interval=4))
    restored.load_state_dict(engine.state_dict())
    assert torch.equal(restored.anchors.centroid, engine.anchors.centroid)
    assert not restored.needs_anchor_refresh(1)
    assert not AdaptEngine(AdaptConfig(enabled=False)).needs_anchor_refresh(0)


def test_standardize_statistics_are_reestimated_under_a_new_centroid():
    a1 = packed_batch([6, 6], seed=13)
    a2 = packed_batch([5, 9, 4], seed=14)
    step0 = packed_batch([4, 5, 6, 7, 3], seed=15)
    cfg = AdaptConfig(enabled=True, standardize=True, refresh_interval=1)
    engine = engine_with_anchors(cfg, a1["hidden"], a1["group_ids"], a1["positions"], 2)
    engine.group_weights(step0["hidden"].float(), step0["group_ids"], step0["positions"], 5, step=0)
    engine.end_step()
    s, c = engine.anchor_partial(a2["hidden"].float(), a2["group_ids"], a2["positions"], 3)
    engine.finish_anchor_refresh(s, c, step=1)
    # independent: previous step's document embeddings scored against the new anchors' centroid
    docs = reference_embeddings(step0["hidden"], step0["group_ids"], step0["positions"], 5)
    centroid = reference_embeddings(a2["hidden"], a2["group_ids"], a2["positions"], 3).mean(0)
    scores = docs @ centroid
    assert abs(engine.score_stats.mean - scores.mean().item()) < 1e-5
    assert abs(engine.score_stats.var - scores.var(unbiased=False).item()) < 1e-6
    restored = AdaptEngine(cfg)
    restored.load_state_dict(engine.state_dict())
    assert torch.equal(restored._previous_units, engine._previous_units)


def test_micro_batch_standardization_z_scores_among_batch_mates():
    a = packed_batch([6, 6], seed=16)
    b = packed_batch([4, 5, 6, 7, 3, 9], seed=17)
    cfg = AdaptConfig(enabled=True, standardize=True, standardize_scope="micro_batch", tau=0.5)
    engine = engine_with_anchors(cfg, a["hidden"], a["group_ids"], a["positions"], 2)
    gw = engine.group_weights(b["hidden"].float(), b["group_ids"], b["positions"], 6, step=0)
    anchors = reference_embeddings(a["hidden"], a["group_ids"], a["positions"], 2)
    s = reference_embeddings(b["hidden"], b["group_ids"], b["positions"], 6) @ anchors.mean(0)
    expected = torch.sigmoid((s - s.mean()) / s.std(unbiased=False) / 0.5)
    torch.testing.assert_close(gw.weights.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("momentum", [0.9, 0.2])
def test_running_statistics_are_an_ema_with_the_configured_momentum(momentum):
    """mean <- m mean + (1 - m) batch mean (and the same for the population variance), hand-computed
    over three steps; a non-default momentum, where swapping m and 1 - m shows."""
    a = packed_batch([6, 6], seed=18)
    cfg = AdaptConfig(enabled=True, standardize=True, standardize_momentum=momentum, tau=1.0)
    engine = engine_with_anchors(cfg, a["hidden"], a["group_ids"], a["positions"], 2)
    centroid = reference_embeddings(a["hidden"], a["group_ids"], a["positions"], 2).mean(0)
    mean = var = None
    for step, lengths in enumerate([[4, 5, 6, 7], [3, 8, 5], [6, 2, 9, 4, 5]]):
        b = packed_batch(lengths, seed=19 + step)
        gw = engine.group_weights(b["hidden"].float(), b["group_ids"], b["positions"], len(lengths), step=step)
        s = reference_embeddings(b["hidden"], b["group_ids"], b["positions"], len(lengths)) @ centroid
        if mean is not None:  # weights use the statistics as of the end of the previous step
            expected = torch.sigmoid((s - mean) / math.sqrt(var + 1e-6))
            torch.testing.assert_close(gw.weights.double(), expected, rtol=1e-4, atol=1e-5)
        engine.end_step()
        batch_mean, batch_var = s.mean().item(), s.var(unbiased=False).item()
        if mean is None:
            mean, var = batch_mean, batch_var
        else:
            mean = momentum * mean + (1 - momentum) * batch_mean
            var = momentum * var + (1 - momentum) * batch_var
        assert engine.score_stats.mean == pytest.approx(mean, abs=1e-6), f"EMA mean after step {step}"
        assert engine.score_stats.var == pytest.approx(var, abs=1e-6), f"EMA variance after step {step}"


def test_anchor_groups_without_tokens_are_left_out_of_the_centroid():
    """The centroid is the mean over anchor groups that have tokens: a declared group with no token
    (e.g. a padded micro-batch, all -1) adds nothing to the sum and nothing to the count."""
    a = packed_batch([5, 7, 4], seed=22)
    gids = a["group_ids"].clone()
    gids[gids == 2] = 3                                   # declared groups 0..3; group 2 has no token
    engine = AdaptEngine(AdaptConfig(enabled=True))
    unit_sum, count = engine.anchor_partial(a["hidden"].float(), gids, a["positions"], 4)
    pad_sum, pad_count = engine.anchor_partial(torch.randn(6, 8), torch.full((6,), -1), torch.zeros(6, dtype=torch.long), 4)
    assert (count.item(), pad_count.item()) == (3.0, 0.0)
    assert torch.equal(pad_sum, torch.zeros(8))
    event = engine.finish_anchor_refresh(unit_sum + pad_sum, count + pad_count, step=0)
    assert event["anchors"] == 3.0
    expected = reference_embeddings(a["hidden"], a["group_ids"], a["positions"], 3).mean(0)
    torch.testing.assert_close(engine.anchors.centroid.double(), expected, rtol=1e-5, atol=1e-6)
    # a refresh that saw no anchor with tokens at all is an error, not a centroid of zeros
    with pytest.raises(ValueError, match="no anchor document"):
        AdaptEngine(AdaptConfig(enabled=True)).finish_anchor_refresh(pad_sum, pad_count, step=0)
