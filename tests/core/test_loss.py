"""Loss assembly: plain CE when off or uniform, the three normalisations, micro-batch split invariance."""
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
