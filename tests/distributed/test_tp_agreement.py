"""Tensor parallelism without sequence parallelism: every TP rank applies bit-identical ADAPT
group weights, scores and normalisers, even when the ranks' copies of the hidden states differ in
the last bits (as they may on GPUs: each rank's copy comes out of its own all-reduce, and the
GPU pooling kernel sums with atomics in no fixed order).

Two real gloo processes run the megatron loss_func body (`adapt_loss`) on their vocab shards
with TP rank 1's hidden states perturbed by ~1e-6 relative. Control: the engine's weights from
each rank's own copy (what each rank applied before the TP reconciliation) differ.
"""
from __future__ import annotations

import torch

from tests.distributed_helper import run_distributed

SEQ, BATCH, HIDDEN, VOCAB = 24, 2, 16, 96


def _agreement_worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from adapt_pretrain.config import AdaptConfig
    from adapt_pretrain.core import AdaptEngine
    from adapt_pretrain.megatron.loss import StepAccumulator, TPContext, adapt_loss, group_signal_input
    from tests.distributed._attention_worker import micro_batch

    tp = TPContext(dist.new_group(list(range(world_size))), rank, world_size, sequence_parallel=False)
    batch = micro_batch(5)
    g = torch.Generator().manual_seed(99)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=g)  # megatron's [s, b, H], same on every rank
    logits = torch.randn(BATCH, SEQ, VOCAB, generator=g)
    centroid = torch.nn.functional.normalize(torch.randn(HIDDEN, generator=g), dim=0)
    if rank == 1:  # this rank's copy differs in the last bits
        hidden = hidden * (1 + 1e-6 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(7)))
    shard = VOCAB // world_size
    local_logits = logits[..., rank * shard:(rank + 1) * shard].clone().requires_grad_(True)

    engine = AdaptEngine(AdaptConfig(enabled=True, tau=0.05, w_max=100.0))
    engine.anchors.update(centroid, torch.tensor(1.0), step=0)
    acc = StepAccumulator(torch.device("cpu"))
    loss_sum, _, _ = adapt_loss(engine, 1, batch, local_logits, hidden, tp, 1, acc)
    row = acc.groups[0]
    # control: the weights each rank would apply from its own copy of the hidden states
    own_h, own_gid, own_pos = group_signal_input(engine, hidden, batch, TPContext(None, 0, 1, False))
    own = engine.group_weights(own_h, own_gid, own_pos, batch["num_groups"], 1)
    return {"weights": row["weights"], "scores": row["scores"], "normaliser": acc.totals[0].item(),
            "loss_sum": loss_sum.item(), "own_weights": own.weights}


def test_tp_ranks_apply_identical_weights_and_normalisers():
    r0, r1 = run_distributed(_agreement_worker, 2)
    assert r0["weights"].std() > 0.05, "weights nearly uniform: the check would be weak"
    assert not torch.equal(r0["own_weights"], r1["own_weights"]), \
        "control: the perturbation must change the weights a rank computes from its own copy"
    assert torch.equal(r0["weights"], r1["weights"]), "TP ranks applied different group weights"
    assert torch.equal(r0["scores"], r1["scores"]), "TP ranks derived different scores"
    assert r0["normaliser"] == r1["normaliser"], "TP ranks accumulated different normalisers"
    assert r0["loss_sum"] == r1["loss_sum"], "TP ranks computed different weighted loss sums"
    # the applied weights are TP rank 0's own
    assert torch.equal(r0["weights"], r0["own_weights"])
