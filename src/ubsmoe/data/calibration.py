"""Unlabeled calibration batches for a data-driven MoEfication, drawn from the run's training data.

The construction (``model.moefy``) records FFN activations on text of the task. It takes the
first examples of every client in turn (round robin over clients, each client's examples in
its partition order), so the batches do not depend on the method, only on the seed and
the data settings, and every client's text is represented. Labels are dropped: only the
model inputs are returned. Departure from a strict federation: the server sees this
unlabeled text (docs/paper.md, row 46; docs/design.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def round_robin_picks(clients: Sequence, num_examples: int) -> list[tuple[int, int]]:
    """``(client index, example index)`` of up to ``num_examples`` examples: each client's first, then second, ..."""
    picks: list[tuple[int, int]] = []
    position = 0
    while len(picks) < num_examples:
        added = False
        for c, client in enumerate(clients):
            if position < len(client.dataset) and len(picks) < num_examples:
                picks.append((c, position))
                added = True
        if not added:
            break
        position += 1
    return picks


def calibration_batches(clients: Sequence, num_examples: int, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """Up to ``num_examples`` training examples as padded model-input batches.

    ``clients`` are :class:`~ubsmoe.data.datamodule.ClientDataModule` (a ``dataset`` of
    tokenized rows and a padding ``collate_fn``).
    """
    rows = []
    for c, i in round_robin_picks(clients, num_examples):
        row = clients[c].dataset[i]
        rows.append({k: row[k] for k in MODEL_INPUTS if k in row})
    collate = clients[0].collate_fn if clients else None
    return [dict(collate(rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)]
