"""Loss assembly: plain CE when off or uniform, the three normalisations, micro-batch split invariance."""
import pytest
import torch
import torch.nn.functional as F

from adapt_pretrain.config import AdaptConfig
from adapt_pretrain.core import AdaptEngine
from tests.core.batches import packed_batch


def reference_token_ce(logits, labels):
    return -torch.log_softmax(logits.double(), dim=-1).gather(1, labels[:, None]).squeeze(1)


def test_disabled_is_exactly_plain_cross_entropy():
    b = packed_batch([5, 9, 2], pad=3)
    logits = b["logits"].float()
    engine = AdaptEngine(AdaptConfig(enabled=False))
    terms = engine.loss(logits, b["labels"], b["loss_mask"], b["group_ids"], torch.ones(3))
    plain = F.cross_entropy(logits, b["labels"], reduction="none")
    assert torch.equal(terms.token_loss, plain)
    assert torch.equal(terms.loss_sum, (plain * b["loss_mask"].float()).sum())
    assert terms.normaliser.item() == 16


def test_uniform_policy_gives_mean_cross_entropy():
    b = packed_batch([5, 9, 2], pad=3)
    engine = AdaptEngine(AdaptConfig(enabled=True, policy="uniform"))
    w = engine.group_weights(None, b["group_ids"], b["positions"], 3, step=0).weights
    terms = engine.loss(b["logits"].float(), b["labels"], b["loss_mask"], b["group_ids"], w)
    ref = (reference_token_ce(b["logits"], b["labels"]) * b["loss_mask"]).sum() / b["loss_mask"].sum()
    torch.testing.assert_close((terms.loss_sum / terms.normaliser).double(), ref, rtol=1e-5, atol=1e-6)


def test_normalisation_modes_against_hand_formulae():
    b = packed_batch([4, 6, 3], pad=2)
    w = torch.tensor([0.2, 1.5, 0.7])
    ce = reference_token_ce(b["logits"], b["labels"])
    tok_w = torch.tensor([0.2] * 4 + [1.5] * 6 + [0.7] * 3 + [0.0] * 2, dtype=torch.float64)
    m = b["loss_mask"]
    for mode, norm in [("weights", (m * tok_w).sum()), ("tokens", m.sum()), ("sum", torch.tensor(0.25, dtype=torch.float64))]:
        engine = AdaptEngine(AdaptConfig(enabled=True, normalize=mode))
        terms = engine.loss(b["logits"].float(), b["labels"], m, b["group_ids"], w, num_contributions=4)
        torch.testing.assert_close(terms.loss_sum.double(), (m * tok_w * ce).sum(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(terms.normaliser.double(), norm, rtol=1e-6, atol=1e-6)


def test_weights_mode_gradient_is_invariant_to_micro_batch_split():
    b = packed_batch([4, 6, 3, 7, 5], pad=0, vocab=30)
    w = torch.tensor([0.3, 1.2, 0.9, 0.1, 2.0])
    engine = AdaptEngine(AdaptConfig(enabled=True, normalize="weights"))

    def grads(splits):
        logits = b["logits"].float().clone().requires_grad_(True)
        pieces = []
        for lo, hi in splits:
            gids = b["group_ids"][lo:hi]
            first = int(gids.min())
            local = gids - first  # renumber groups within the micro-batch
            ngroups = int(local.max()) + 1
            pieces.append(engine.loss(logits[lo:hi], b["labels"][lo:hi], b["loss_mask"][lo:hi], local, w[first:first + ngroups]))
        total = sum(p.normaliser for p in pieces)
        loss = sum(p.loss_sum for p in pieces) / total
        loss.backward()
        return loss.detach(), logits.grad

    whole_loss, whole_grad = grads([(0, 25)])
    split_loss, split_grad = grads([(0, 4), (4, 13), (13, 25)])
    torch.testing.assert_close(split_loss, whole_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-6, atol=1e-7)
    # and against an fp64 reference of the normalised weighted loss
    logits64 = b["logits"].clone().requires_grad_(True)
    tok_w = w.double()[b["group_ids"]]
    ref = (tok_w * -torch.log_softmax(logits64, -1).gather(1, b["labels"][:, None]).squeeze(1)).sum() / tok_w.sum()
    ref.backward()
    torch.testing.assert_close(whole_grad.double(), logits64.grad, rtol=1e-4, atol=1e-6)


def test_linupper_weights_equal_softmax_of_clipped_normalised_losses():
    b = packed_batch([4, 6, 3, 5], vocab=20)
    cfg = AdaptConfig(enabled=True, policy="linupper", linupper_d=1.0, linupper_r=0.5)
    engine = AdaptEngine(cfg)
    first = engine.loss(b["logits"].float(), b["labels"], b["loss_mask"], b["group_ids"], torch.ones(4), step=0)
    assert torch.equal(first.weights, torch.ones(4)), "no previous range: uniform"
    engine.end_step()
    ce = reference_token_ce(b["logits"], b["labels"])
    means = torch.stack([ce[b["group_ids"] == g].mean() for g in range(4)])
    lo, hi = means.min(), means.max()
    assert abs(engine.loss_range[0] - lo.item()) < 1e-5 and abs(engine.loss_range[1] - hi.item()) < 1e-5
    second = engine.loss(b["logits"].float(), b["labels"], b["loss_mask"], b["group_ids"], torch.ones(4), step=1)
    normalised = (means - lo) / (hi - lo) * 2 - 1
    w_prime = torch.clamp(normalised + 1, max=1.0)
    softmax = torch.softmax(w_prime / 0.5, dim=0)
    got = second.weights.double() / second.weights.double().sum()
    torch.testing.assert_close(got, softmax, rtol=1e-4, atol=1e-6)


def test_tokens_normaliser_counts_only_tokens_that_carry_a_loss():
    """`tokens` divides by the number of tokens whose loss is in the sum: a token with loss_mask 1 but
    an ignored label (-100) or no group (padding, -1) carries no loss and is not counted."""
    b = packed_batch([4, 6, 3], pad=3, vocab=20, seed=3)
    labels = b["labels"].clone()
    labels[[1, 7]] = -100                                  # ignored labels inside documents
    mask = torch.ones_like(b["loss_mask"])                 # mask 1 everywhere, padding included
    carries = (labels != -100) & (b["group_ids"] >= 0)
    assert int(carries.sum()) == 11
    ce = reference_token_ce(b["logits"], labels.clamp_min(0)) * carries
    w = torch.tensor([0.3, 1.4, 0.8])
    tok_w = w.double()[b["group_ids"].clamp_min(0)] * carries
    for mode, expected in [("tokens", (tok_w * ce).sum() / carries.sum()), ("weights", (tok_w * ce).sum() / tok_w.sum())]:
        engine = AdaptEngine(AdaptConfig(enabled=True, normalize=mode))
        terms = engine.loss(b["logits"].float(), labels, mask, b["group_ids"], w)
        torch.testing.assert_close((terms.loss_sum / terms.normaliser).double(), expected, rtol=1e-5, atol=1e-6)
    # LinUpper: the same count, and each group's mean loss is over its loss-carrying tokens only
    engine = AdaptEngine(AdaptConfig(enabled=True, policy="linupper", normalize="tokens"))
    terms = engine.loss(b["logits"].float(), labels, mask, b["group_ids"], torch.ones(3), step=0)
    assert terms.normaliser.item() == 11
    engine.end_step()
    means = torch.stack([ce[(b["group_ids"] == g) & carries].mean() for g in range(3)])
    assert engine.loss_range == pytest.approx((means.min().item(), means.max().item()), rel=1e-5)


def test_linupper_gradient_treats_weights_as_constants():
    """LinUpper's weights are functions of the per-group losses; the gradient must not flow through
    them. Step 1 reuses step 0's batch, so the group means span the loss range and the groups below
    its middle get weights on the slope (w' = n + d), where a gradient through the weights would
    show; checked against an fp64 reference with explicitly constant weights."""
    b = packed_batch([4, 6, 3, 5, 7, 2, 5], vocab=20, seed=21)
    d, r = 1.0, 0.5
    engine = AdaptEngine(AdaptConfig(enabled=True, policy="linupper", linupper_d=d, linupper_r=r))
    engine.loss(b["logits"].float(), b["labels"], b["loss_mask"], b["group_ids"], torch.ones(7), step=0)
    engine.end_step()
    logits = b["logits"].float().requires_grad_(True)
    terms = engine.loss(logits, b["labels"], b["loss_mask"], b["group_ids"], torch.ones(7), step=1)
    (terms.loss_sum / terms.normaliser).backward()

    logits64 = b["logits"].clone().requires_grad_(True)
    ce = -torch.log_softmax(logits64, -1).gather(1, b["labels"][:, None]).squeeze(1)
    means = torch.stack([ce[b["group_ids"] == g].mean() for g in range(7)]).detach()
    normalised = ((means - means.min()) / (means.max() - means.min()) * 2 * d - d).clamp(-d, d)
    w = torch.exp((torch.clamp(normalised + d, max=d) - d) / r)
    on_slope = (w < 1 - 1e-3) & (w > torch.exp(torch.tensor(-d / r)) + 1e-3)
    assert int(on_slope.sum()) >= 2, "the test needs weights whose derivative is not zero"
    tok_w = w[b["group_ids"]] * b["loss_mask"]
    ((tok_w * ce).sum() / tok_w.sum()).backward()
    torch.testing.assert_close(terms.weights.double(), w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=1e-4, atol=1e-6)
