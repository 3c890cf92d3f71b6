"""Per-client training data and the shared evaluation sets of one federated run.

:func:`build_federated_data` turns a handful of config values into a :class:`FederatedData`:
one :class:`ClientDataModule` per client (its partition of the tokenized train set) and one
evaluation loader per validation split. Every cheap check runs before the tokenizer is
loaded, so a typo fails in milliseconds rather than after tokenizing.

Batch order is a pure function of (data seed, client id, round, epoch). A run resumed from
a checkpoint at round r therefore feeds each client exactly the batches the uninterrupted
run would have, without saving any sampler state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import datasets
import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader

from ubsmoe.data import glue
from ubsmoe.data.partition import bucketize_scores
from ubsmoe.data.specs import LoaderSpec, PartitionSpec
from ubsmoe.errors import ConfigError
from ubsmoe.seeding import derive_seed


def length_grouped_batches(
    order: list[int], lengths: list[int], batch_size: int, window: int, generator: torch.Generator
) -> list[list[int]]:
    """Batches of similar length from a shuffled epoch ``order`` (``data.train_length_window``).

    The order is cut into windows of ``window`` batches; each window is sorted longest first
    (stable, so equal lengths keep their shuffled order) and cut into batches, and the epoch's
    batches are then shuffled with ``generator``. A batch is padded to nearly its own length
    instead of its longest random member's (SST-2 at batch 32, window 4: 20 instead of 39
    positions for 13 real tokens), at the price of batches whose members have similar
    lengths. Every example is served once per epoch, as without grouping.
    """
    batches: list[list[int]] = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class ClientDataModule(lightning.LightningDataModule):
    """One client's share of the training set, served in seeded, reproducible orders.

    ``dataset`` is the whole tokenized training set; the client sees only ``indices``.
    ``label_ids`` are the labels the partition was drawn on (class ids, or score buckets for
    regression), one per example of ``dataset``; ``num_classes`` is their range.
    """

    def __init__(
        self,
        client_id: int,
        dataset: datasets.Dataset,
        indices: np.ndarray,
        *,
        collate_fn: Any,
        batch_size: int,
        data_seed: int,
        label_ids: np.ndarray,
        num_classes: int,
        length_window: int = 0,
    ) -> None:
        super().__init__()
        self.client_id = int(client_id)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.dataset = dataset.select(self.indices, keep_in_memory=True)
        self.collate_fn = collate_fn
        self.batch_size = int(batch_size)
        self.data_seed = int(data_seed)
        self.num_classes = int(num_classes)
        self._label_ids = np.asarray(label_ids, dtype=np.int64)[self.indices]
        self.epoch_counter = 0
        self.length_window = int(length_window)
        self._lengths = [len(ids) for ids in self.dataset["input_ids"]] if self.length_window else []

    @property
    def num_examples(self) -> int:
        return int(self.indices.size)

    def label_counts(self) -> np.ndarray:
        """Examples per class (or per score bucket) on this client."""
        return np.bincount(self._label_ids, minlength=self.num_classes)

    def _epoch_loader(self, *stream: object) -> DataLoader:
        generator = torch.Generator().manual_seed(derive_seed(self.data_seed, "client", self.client_id, *stream))
        order = torch.randperm(self.num_examples, generator=generator).tolist()
        if self.length_window:
            batches = length_grouped_batches(order, self._lengths, self.batch_size, self.length_window, generator)
            return DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate_fn, num_workers=0)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=order,
            collate_fn=self.collate_fn,
            num_workers=0,
        )

    def train_dataloader(self) -> DataLoader:
        """One shuffled epoch; each call advances ``epoch_counter`` and so reshuffles (Lightning use)."""
        loader = self._epoch_loader(self.epoch_counter)
        self.epoch_counter += 1
        return loader

    def batches(
        self, round_idx: int, num_steps: int | None = None, num_epochs: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The client's batches for one federated round: ``num_steps`` batches or ``num_epochs`` epochs.

        Steps run through as many freshly shuffled epochs as they need (the last batch of an
        epoch may be smaller). The order depends only on (data seed, client, round, epoch).
        """
        if (num_steps is None) == (num_epochs is None):
            raise ConfigError(
                "federation.local_steps", num_steps, "exactly one of local steps or local epochs must be set"
            )
        if num_steps is not None and num_steps < 1:
            raise ConfigError("federation.local_steps", num_steps, "an integer >= 1")
        if num_epochs is not None and num_epochs < 1:
            raise ConfigError("federation.local_epochs", num_epochs, "an integer >= 1")
        if self.num_examples == 0:
            raise ValueError(f"client {self.client_id} has no examples to train on")
        return self._iterate(int(round_idx), num_steps, num_epochs)

    def _iterate(
        self, round_idx: int, num_steps: int | None, num_epochs: int | None
    ) -> Iterator[dict[str, torch.Tensor]]:
        served = 0
        epoch = 0
        while num_epochs is None or epoch < num_epochs:
            for batch in self._epoch_loader("round", round_idx, "epoch", epoch):
                yield dict(batch)
                served += 1
                if num_steps is not None and served == num_steps:
                    return
            epoch += 1


class TaskSummary(Protocol):
    """What a run may read of the task its data was built for, whichever builder built it.

    :attr:`FederatedData.task` holds a :class:`~ubsmoe.data.glue.GlueTask` for GLUE runs and a
    :class:`~ubsmoe.data.commonsense.CommonsenseSpec` for commonsense runs; these three are what
    both have.
    """

    @property
    def name(self) -> str: ...

    @property
    def main_metric(self) -> str: ...

    @property
    def is_regression(self) -> bool: ...


@dataclass
class FederatedData:
    """Everything the federated loop needs from the data side."""

    task: TaskSummary
    clients: list[ClientDataModule]
    eval_loaders: dict[str, DataLoader]
    label_counts: np.ndarray
    label_names: list[str]


def _check_positive(key: str, value: int | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or int(value) < 1:
        raise ConfigError(key, value, "an integer >= 1" + (" or null (no limit)" if optional else ""))


def _bucket_names(scores: np.ndarray, buckets: np.ndarray, num_buckets: int) -> list[str]:
    """Readable bucket labels ("1.20-2.40") from the score range each bucket really holds."""
    names = []
    for bucket in range(num_buckets):
        members = scores[buckets == bucket]
        names.append(f"{members.min():.2f}-{members.max():.2f}" if members.size else f"bucket{bucket}(empty)")
    return names


def build_federated_data(
    *,
    task: str,
    local_dir: str | None,
    tokenizer_path: str,
    max_length: int,
    regression_buckets: int,
    partition: PartitionSpec,
    loader: LoaderSpec,
) -> FederatedData:
    """Load, subsample, partition and tokenize one GLUE task for ``partition.num_clients`` clients.

    ``partition.seed`` is the run's master seed; partitioning, batch order and train subsampling
    each use their own derived stream. ``loader.max_train_examples`` keeps the first N of a seeded
    permutation (so every label can appear); ``loader.max_eval_examples`` keeps the first N.
    """
    spec = glue.get_task(task)
    _check_positive("data.max_length", max_length)
    _check_positive("data.batch_size", loader.batch_size)
    _check_positive("data.eval_batch_size", loader.eval_batch_size)
    _check_positive("data.max_train_examples", loader.max_train_examples, optional=True)
    _check_positive("data.max_eval_examples", loader.max_eval_examples, optional=True)
    if spec.is_regression:
        _check_positive("data.regression_buckets", regression_buckets)
    if loader.cache_dir is None:
        raise ConfigError("paths.cache_dir", None, "a directory for the tokenized GLUE splits")
    # Checks that need no row count run now, whatever the source.
    partition.check(max(partition.num_clients, 0) * max(partition.min_client_size, 0))

    source_dir = glue.resolve_local_dir(local_dir, spec.name)
    splits = ["train", *spec.eval_splits]
    if source_dir:
        rows = glue.check_local_files(spec, source_dir, splits)
        partition.check(loader.train_rows(rows["train"]))

    raw = glue.load_glue(spec, source_dir, splits)
    train = raw["train"]
    partition.check(loader.train_rows(train.num_rows))

    kept = loader.train_subsample(train.num_rows, partition.seed)
    if kept is not None:
        train = train.select(kept, keep_in_memory=True)

    targets = np.asarray(train[glue.LABEL_COLUMN])
    if spec.is_regression:
        label_ids = bucketize_scores(targets, regression_buckets)
        num_classes = int(regression_buckets)
        label_names = _bucket_names(targets.astype(np.float64), label_ids, num_classes)
    else:
        label_ids = targets.astype(np.int64)
        num_classes = spec.num_labels
        label_names = list(spec.label_names)
        bad = label_ids[(label_ids < 0) | (label_ids >= num_classes)]
        if bad.size:
            raise ConfigError(
                "data.local_dir",
                source_dir,
                f"{spec.name} train labels must be 0..{num_classes - 1}, found {sorted(set(bad.tolist()))[:5]}",
            )

    parts = partition.split(label_ids)

    # Expensive work starts here: everything the user could get wrong was checked above.
    from transformers import AutoTokenizer, DataCollatorWithPadding

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    tokenized_train = glue.tokenize_split(train, spec, tokenizer, max_length, loader.cache_dir, "train")

    data_seed = derive_seed(partition.seed, "data")
    clients = [
        ClientDataModule(
            client_id,
            tokenized_train,
            indices,
            collate_fn=collator,
            batch_size=loader.batch_size,
            data_seed=data_seed,
            label_ids=label_ids,
            num_classes=num_classes,
            length_window=loader.train_length_window,
        )
        for client_id, indices in enumerate(parts)
    ]

    eval_loaders: dict[str, DataLoader] = {}
    for split in spec.eval_splits:
        ds = raw[split]
        if loader.max_eval_examples is not None and loader.max_eval_examples < ds.num_rows:
            ds = ds.select(range(loader.max_eval_examples))
        tokenized = glue.tokenize_split(ds, spec, tokenizer, max_length, loader.cache_dir, split)
        eval_loaders[split] = loader.eval_loader(tokenized, [len(ids) for ids in tokenized["input_ids"]], collator)

    return FederatedData(
        task=spec,
        clients=clients,
        eval_loaders=eval_loaders,
        label_counts=np.stack([client.label_counts() for client in clients]),
        label_names=label_names,
    )


__all__ = ("ClientDataModule", "FederatedData", "build_federated_data", "length_grouped_batches")
