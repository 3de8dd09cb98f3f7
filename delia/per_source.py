"""The training set per source (downstream, diverse): the collator's tag, the running loss sums, the record's counts.

`DSFTTrainer` wraps its collator in `SourceTaggingCollator` so each row's `source` reaches `compute_loss`; the loss of
each batch is added to `SourceLoss`, whose `pop` gives `loss_downstream` / `loss_diverse` for `log()`; and
`source_counts` gives the rows, tokens and loss tokens per source that `delia_mixture.json` records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset

from .data import SOURCES, MixturePlan


@dataclass
class SourceTaggingCollator:
    """Wraps a collator: takes the `source` column off each example and adds `source_ids` (index in SOURCES)."""

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        source_ids = [
            SOURCES.index(example["source"]) if example.get("source") in SOURCES else -1 for example in examples
        ]
        batch = self.collator([{k: v for k, v in example.items() if k != "source"} for example in examples])
        batch["source_ids"] = torch.tensor(source_ids, dtype=torch.long)
        return batch


@dataclass
class SourceLoss:
    """Running NLL and loss-token sums per source, one pair of sums per mode ("train", "eval")."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def add(self, mode: str, log_probs: torch.Tensor, label_mask: torch.Tensor, source_ids: torch.Tensor) -> None:
        """Add each row's NLL and loss-token count to its source's sums (rows without a source are skipped).

        Rows are reduced first, so only one number per row is copied or indexed, never a (rows, tokens) tensor.
        """
        nll = log_probs.sum(dim=1, dtype=torch.float32).neg_()
        tokens = label_mask.sum(dim=1, dtype=torch.float32)
        ids = source_ids.to(log_probs.device)
        known = ids >= 0
        if not bool(known.all()):
            ids, nll, tokens = ids[known], nll[known], tokens[known]
        sums = self.sums.get(mode)
        if sums is None:
            sums = self.sums[mode] = torch.zeros(2, len(SOURCES), device=log_probs.device)
        sums[0].index_add_(0, ids, nll)
        sums[1].index_add_(0, ids, tokens)

    def pop(self, mode: str, prefix: str, accelerator: Any) -> dict[str, float]:
        """`{prefix}loss_<source>`: the token-weighted mean NLL since the last pop, summed over every process."""
        sums = self.sums.pop(mode, None)
        if sums is None:
            sums = torch.zeros(2, len(SOURCES), device=accelerator.device)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum")
        nll, tokens = sums.tolist()
        return {f"{prefix}loss_{name}": nll[i] / tokens[i] for i, name in enumerate(SOURCES) if tokens[i] > 0}


def source_counts(dataset: Any, plan: MixturePlan, mixed: bool) -> dict[str, dict[str, int | None]]:
    """Rows, tokens and loss tokens per source of a tokenised training set (rows alone once packed or streaming)."""
    packed = isinstance(dataset, Dataset) and mixed and "source" not in dataset.column_names
    if isinstance(dataset, Dataset) and {"input_ids", "labels"} <= set(dataset.column_names) and not packed:
        columns = ["input_ids", "labels"] + (["source"] if mixed else [])  # a user's own `source` is not DELIA's tag
        table = dataset.select_columns(columns).with_format("arrow")[:]
        source = (
            table.column("source").to_numpy(zero_copy_only=False)
            if mixed
            else np.full(table.num_rows, "downstream", dtype=object)
        )
        tokens = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
        labels = table.column("labels")
        loss_mask = pc.not_equal(pc.list_flatten(labels), -100).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(labels).to_numpy()
        loss_tokens = np.bincount(parents, weights=loss_mask, minlength=len(source))
        return {
            name: {
                "rows": int(rows.sum()),
                "tokens": int(tokens[rows].sum()),
                "loss_tokens": int(loss_tokens[rows].sum()),
            }
            for name in SOURCES
            if (rows := source == name).any()
        }
    if isinstance(dataset, Dataset):  # packed: the source column is gone after tokenisation
        counts: dict[str, dict[str, int | None]] = {"downstream": {"rows": plan.downstream_rows}}
        if plan.diverse_rows:
            counts["diverse"] = {"rows": plan.diverse_rows}
        return counts
    return {"downstream": {"rows": None}}  # streaming: rows are not known up front
