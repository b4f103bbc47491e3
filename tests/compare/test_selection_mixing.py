"""Offline top-k selection and static mixing against hand-computed references."""
import numpy as np
import pytest

from adapt_pretrain.experiments.methods.mixing import (domain_schedule, domain_token_targets, normalize_domain_weights,
                                           plan_mixture, repeat_counts)
from adapt_pretrain.experiments.methods.selection import centroid_scores, select_top_fraction


def test_top_fraction_by_tokens_keeps_crossing_document():
    # ranks by score: 12 (0.9), 10 (0.8), 11 (0.5), 13 (0.1); tokens 30, 10, 40, 20 -> total 100
    ids, scores, tokens = [10, 11, 12, 13], [0.8, 0.5, 0.9, 0.1], [10, 40, 30, 20]
    assert select_top_fraction(ids, scores, tokens, 0.30) == [12]            # 30 >= 30
    assert select_top_fraction(ids, scores, tokens, 0.35) == [12, 10]        # 30 < 35 -> 40 >= 35
    assert select_top_fraction(ids, scores, tokens, 0.41) == [12, 10, 11]    # 40 < 41 -> 80
    assert select_top_fraction(ids, scores, tokens, 1.0) == [12, 10, 11, 13]


def test_top_fraction_ties_broken_by_doc_id_and_input_order_irrelevant():
    ids, scores, tokens = [5, 3, 4], [1.0, 1.0, 1.0], [10, 10, 10]
    assert select_top_fraction(ids, scores, tokens, 0.5) == [3, 4]
    assert select_top_fraction(ids[::-1], scores, tokens[::-1], 0.5) == [3, 4]


def test_top_fraction_rejects_bad_input():
    with pytest.raises(ValueError):
        select_top_fraction([1], [0.0], [1], 0.0)
    with pytest.raises(ValueError):
        select_top_fraction([1, 2], [0.0], [1, 1], 0.5)
    assert select_top_fraction([], [], [], 0.5) == []


def test_centroid_scores_are_mean_cosine_to_anchors():
    anchors = np.array([[2.0, 0.0], [0.0, 3.0]])       # unit: (1,0), (0,1) -> centroid (0.5, 0.5)
    docs = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, -5.0]])
    np.testing.assert_allclose(centroid_scores(docs, anchors), [0.5, np.sqrt(0.5), -0.5])


def test_normalize_domain_weights():
    assert normalize_domain_weights({"a": 2, "b": 6}, ["a", "b", "c"]) == {"a": 0.25, "b": 0.75, "c": 0.0}
    with pytest.raises(ValueError, match="unknown"):
        normalize_domain_weights({"z": 1}, ["a"])
    with pytest.raises(ValueError):
        normalize_domain_weights({"a": -1, "b": 2}, ["a", "b"])
    with pytest.raises(ValueError):
        normalize_domain_weights({"a": 0}, ["a"])


def test_domain_token_targets_largest_remainder():
    # 10 tokens at 1/3 each: 3.33 x 3 -> floors 3,3,3, one left to the first by name on a tie
    assert domain_token_targets({"b": 1, "a": 1, "c": 1}, 10) == {"a": 4, "b": 3, "c": 3}
    # 0.5/0.3/0.2 of 7: 3.5, 2.1, 1.4 -> floors 3, 2, 1; one left -> largest remainder is a (0.5)
    assert domain_token_targets({"a": 0.5, "b": 0.3, "c": 0.2}, 7) == {"a": 4, "b": 2, "c": 1}


def test_repeat_counts_whole_passes_then_ordered_remainder():
    # domain of 3 docs with 10, 20, 30 tokens (60); target 150 = 2 passes (120) + 30
    assert repeat_counts([10, 20, 30], 150) == [3, 3, 2]        # remainder: doc0 (10) + doc1 (20) = 30
    assert repeat_counts([10, 20, 30], 150, order=[2, 0, 1]) == [2, 2, 3]  # doc2 (30) covers it
    assert repeat_counts([10, 20, 30], 25) == [1, 1, 0]         # downsampling: 10 < 25 -> +20 = 30
    assert repeat_counts([10, 20, 30], 0) == [0, 0, 0]
    with pytest.raises(ValueError):
        repeat_counts([10, 20], 5, order=[0, 0])


def test_plan_mixture_hits_weights_and_is_deterministic():
    docs = [(i, "a", 10) for i in range(10)] + [(100 + i, "b", 5) for i in range(40)]  # a: 100 tokens, b: 200
    plan = plan_mixture(docs, {"a": 0.75, "b": 0.25}, 300, seed=3)
    tok = {"a": 0, "b": 0}
    for doc_id, domain, n in docs:
        tok[domain] += plan[doc_id] * n
    assert tok == {"a": 230, "b": 75}  # a: 225 target -> 2 passes + 3 docs (30) = 230; b: 75 exactly (15 docs)
    assert all(plan[i] in (2, 3) for i in range(10))
    assert plan == plan_mixture(list(reversed(docs)), {"a": 0.75, "b": 0.25}, 300, seed=3)
    assert plan != plan_mixture(docs, {"a": 0.75, "b": 0.25}, 300, seed=4)


def test_domain_schedule_smooth_round_robin_hand_trace():
    # credits after adding weights: a .5 b .25 c .25 -> a; a 0 b .5 c .5 -> b (name order);
    # a .5 b -.25 c .75 -> c; a 1 b 0 c 0 -> a
    assert domain_schedule({"a": 2, "b": 1, "c": 1}, 4) == ["a", "b", "c", "a"]
    sched = domain_schedule({"x": 0.7, "y": 0.3}, 100)
    for k in range(1, 101):  # every prefix within one of its share
        assert abs(sched[:k].count("x") - 0.7 * k) < 1.0
