"""Eval's per-domain sample: seeded documents, an exact label budget spread evenly, training's labels.

References are written here independently: a brute-force search for the water-filling level, and
the evaluated labels listed document by document in plain Python.
"""
import numpy as np
import pytest

from adapt_pretrain.config import ConfigError
from adapt_pretrain.evaluate import EvalSettings, label_counts, label_stream, sample_documents

EOS = 0


def _reference_counts(lengths, budget):
    """Brute force: the largest common share c with sum(min(L, c)) <= budget, then at most one more
    label for a document still cut; the total must then be exactly min(budget, sum of lengths)."""
    c = 0
    while sum(min(n, c + 1) for n in lengths) <= budget and c < max(lengths):
        c += 1
    return c


@pytest.mark.parametrize("lengths", [
    [50_000, 40_000, 45_000],                                             # few long documents
    list(np.random.default_rng(0).integers(20, 2_000, size=256)),        # many documents, mixed lengths
    [3, 10, 100, 5_000] * 40,
])
def test_label_counts_spend_exactly_the_budget_evenly(lengths):
    budget = 32_768
    counts = label_counts(lengths, budget)
    assert sum(counts) == min(budget, sum(lengths))
    c = _reference_counts(lengths, budget)
    for n, k in zip(lengths, counts):
        assert k <= n
        assert k == n if n <= c else k in (c, c + 1)  # whole when short, else the common share (+1)


def test_label_counts_small_totals_and_cap():
    assert label_counts([5, 7], 100) == [5, 7]                   # fewer labels than the budget: all of them
    assert label_counts([1000] * 4, 100, cap=10) == [10] * 4    # the per-document cap binds first
    assert sum(label_counts([1000] * 4, 30, cap=10)) == 30


def _evaluated_labels_reference(docs, counts):
    """What must be scored, in order: a cut document's tokens 2..k+1; a whole one's tokens 2..L and EOS."""
    out = []
    for doc, k in zip(docs, counts):
        if k == 0:
            continue
        out += list(doc[1:]) + [EOS] if k >= len(doc) else list(doc[1:k + 1])
    return out


def test_label_stream_has_no_end_label_on_a_cut_prefix():
    docs = [np.array([10, 11, 12, 13]), np.array([20, 21])]
    stream, labels = label_stream(docs, [2, 2], EOS)
    np.testing.assert_array_equal(stream, [10, 11, 12, EOS, 20, 21, EOS])
    # labels of stream[1:]: 11 12 | EOS after the cut prefix: no | 20 after an EOS: no | 21 EOS: yes
    np.testing.assert_array_equal(labels, [1, 1, 0, 0, 1, 1])


def test_label_stream_matches_reference_on_random_documents():
    rng = np.random.default_rng(3)
    docs = [rng.integers(1, 50, size=int(n)) for n in rng.integers(1, 40, size=30)]
    counts = label_counts([len(d) for d in docs], 300)
    stream, labels = label_stream(docs, counts, EOS)
    assert labels.sum() == sum(counts) == 300
    assert list(stream[1:][labels == 1]) == _evaluated_labels_reference(docs, counts)


def test_sample_documents_is_seeded_per_domain():
    a = sample_documents(6400, 256, seed=0, domain="wiki")
    assert len(a) == 256 == len(set(a.tolist())) and list(a) == sorted(a) and a.max() < 6400
    np.testing.assert_array_equal(a, sample_documents(6400, 256, seed=0, domain="wiki"))
    assert set(a.tolist()) != set(sample_documents(6400, 256, seed=1, domain="wiki").tolist())
    assert set(a.tolist()) != set(sample_documents(6400, 256, seed=0, domain="news").tolist())
    np.testing.assert_array_equal(sample_documents(10, 256, seed=5, domain="x"), np.arange(10))


def test_eval_settings_validate():
    assert EvalSettings() == EvalSettings.from_dict({})
    with pytest.raises(ConfigError, match="eval.docs"):
        EvalSettings(docs=0)
    with pytest.raises(ConfigError, match="unknown key"):
        EvalSettings.from_dict({"max_token": 5})
