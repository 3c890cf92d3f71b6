"""Fixed batches of the run's training data: MoEfication's unlabeled calibration text, the diagnostics' probes.

The construction (``model.moefy``) records FFN activations on text of the task. It takes the
first examples of every client in turn (round robin over clients, each client's examples in
its partition order), so the batches do not depend on the method, only on the seed and
the data settings, and every client's text is represented. Labels are dropped: only the
model inputs are returned. Departure from a strict federation: the server sees this
unlabeled text (docs/paper.md, row 46; docs/design.md).

The gradient-bias diagnostic (:mod:`ubsmoe.callbacks.grad_bias`) needs a loss, so its probe
(:func:`probe_batch`) keeps every column of the same round-robin examples and pads them
with the clients' own training collate: class labels for classification, the
response-only token targets for instruction data.
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


def probe_batch(clients: Sequence, num_examples: int) -> dict[str, torch.Tensor]:
    """Up to ``num_examples`` training examples (round robin), labels included, as one training batch.

    Padded by ``clients[0].collate_fn``, the collate the clients train with, so the batch has
    whatever the task's loss reads (GLUE: ``labels`` per example; instruction data: the
    ``labels`` token targets, right-padded).
    """
    if not clients:
        raise ValueError("a probe batch needs at least one client")
    rows = [clients[c].dataset[i] for c, i in round_robin_picks(clients, num_examples)]
    return dict(clients[0].collate_fn(rows))
