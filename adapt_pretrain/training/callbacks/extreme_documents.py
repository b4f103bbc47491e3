"""The extreme-documents table: each step's highest- and lowest-weighted documents with a decoded
snippet of their text, at the monitor's table cadence (`wandb.table_interval`)."""
from __future__ import annotations

from typing import Any

import torch

from adapt_pretrain.training.callbacks.base import Callback, StepLog


class ExtremeDocuments(Callback):
    """k highest- and k lowest-weighted documents per logged table."""

    def __init__(self, k: int = 5, snippet_tokens: int = 24) -> None:
        self.k, self.snippet_tokens = k, snippet_tokens
        self._tokenizer: Any = None

    def add_metrics(self, trainer: Any, step: int, out: Any, metrics: StepLog) -> None:
        if out.local_groups is None or not trainer.info.is_logging_rank or not trainer.monitor.table_due(step):
            return
        rows = {key: value.cpu() for key, value in out.local_groups.items()}  # only on table steps
        metrics.tables["extreme_documents"] = self.rows(trainer, rows, trainer.last_step.micro_batches)

    def rows(self, trainer: Any, groups: dict[str, torch.Tensor], micro: list[dict]) -> list[dict[str, Any]]:
        """Picked among the logging rank's own groups (its 1/DP share of the global batch), whose tokens it
        holds, so every row carries a text snippet."""
        domains = trainer.parts.domains
        weights = groups["weights"].float()
        order = torch.argsort(weights, descending=True, stable=True).tolist()
        k = self.k
        picks = order[:k] + [i for i in order[-k:] if i not in order[:k]]
        rows = []
        for i in picks:
            domain = int(groups["group_domain"][i])
            rows.append({"domain": domains[domain] if 0 <= domain < len(domains) else str(domain),
                         "doc_id": int(groups["group_doc_id"][i]), "weight": float(weights[i]),
                         "score": float(groups["scores"][i]), "tokens": float(groups["group_tokens"][i]),
                         "snippet": self._snippet(trainer, micro, i)})
        return rows

    def _snippet(self, trainer: Any, micro: list[dict], index: int) -> str:
        """Decoded first tokens of the index-th local group (groups are numbered per micro-batch)."""
        for mb in micro:
            if index < int(mb["num_groups"]):
                ids = mb["tokens"].reshape(-1)[mb["group_id"].reshape(-1) == index][:self.snippet_tokens]
                return self._decoder(trainer).decode(ids.tolist()).replace("\n", " ").strip()
            index -= int(mb["num_groups"])
        return ""

    def _decoder(self, trainer: Any) -> Any:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(trainer.parts.tokenizer_path)
        return self._tokenizer
