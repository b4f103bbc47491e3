"""The ADAPT method in plain torch (no megatron or deepspeed imports): pooling, anchors, weights, loss."""
from adapt_pretrain.core.anchors import AnchorState
from adapt_pretrain.core.engine import AdaptEngine, GroupWeights, group_loss_means
from adapt_pretrain.core.linupper import linupper_weights
from adapt_pretrain.core.loss import LossTerms, plain_token_loss, token_weights, weighted_loss_terms
from adapt_pretrain.core.pooling import pool_groups, unit_rows
from adapt_pretrain.core.weights import RunningScoreStats, weights_from_scores

__all__ = ["AdaptEngine", "AnchorState", "GroupWeights", "LossTerms", "RunningScoreStats", "group_loss_means",
           "linupper_weights", "plain_token_loss", "pool_groups", "token_weights", "unit_rows",
           "weighted_loss_terms", "weights_from_scores"]
