"""The two groups of settings every data builder takes: how the federation is split, how batches are served.

The GLUE builder (:func:`ubsmoe.data.datamodule.build_federated_data`) and the commonsense
builder (:func:`ubsmoe.data.commonsense.build_commonsense_data`) split and batch the same way,
so they take these two values instead of repeating ten keywords each; :meth:`PartitionSpec.from_config`
and :meth:`LoaderSpec.from_config` are the one place that says which config key feeds which field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from ubsmoe.data import partition as partitioning
from ubsmoe.seeding import derive_seed


@dataclass(frozen=True)
class PartitionSpec:
    """How the training set is split across clients (``federation.*``), and the run's master seed.

    ``method`` is ``federation.partition`` (``dirichlet`` or ``iid``). ``seed`` is the master
    seed: the train subsample, the partition and each client's batch order derive their own
    streams from it, so changing one never shifts another.
    """

    num_clients: int
    method: str
    alpha: float
    min_client_size: int
    seed: int

    @classmethod
    def from_config(cls, cfg: Any) -> PartitionSpec:
        """The ``federation.*`` keys and ``seed`` of a composed run config."""
        fed = cfg.federation
        return cls(
            num_clients=fed.num_clients, method=fed.partition, alpha=fed.dirichlet_alpha,
            min_client_size=fed.min_client_size, seed=cfg.seed,
        )  # fmt: skip

    def check(self, num_examples: int) -> None:
        """ConfigError when no partition of ``num_examples`` examples satisfies these settings (cheap)."""
        partitioning.validate_partition_args(
            method=self.method, num_clients=self.num_clients, alpha=self.alpha, min_size=self.min_client_size,
            num_examples=num_examples,
        )  # fmt: skip

    def split(self, label_ids: np.ndarray) -> list[np.ndarray]:
        """One sorted index array per client, drawn on ``label_ids`` from the seed's partition stream."""
        return partitioning.partition(
            label_ids, method=self.method, num_clients=self.num_clients, alpha=self.alpha,
            min_size=self.min_client_size, seed=derive_seed(self.seed, "partition"),
        )  # fmt: skip


@dataclass(frozen=True)
class LoaderSpec:
    """How much data is used and how it is batched (``data.*``), and where downloads and tokenized sets are kept.

    ``max_train_examples`` keeps a seeded subsample of the training set (null: all of it);
    ``max_eval_examples`` keeps the first N of every evaluation set. ``cache_dir``
    (``paths.cache_dir``) is required by GLUE (tokenized splits); commonsense keeps downloaded
    URL sources there when it is set. ``eval_sort_by_length`` serves the evaluation examples
    longest first, so a batch is padded to nearly its own length (SST-2's validation set: 1.8x
    fewer token positions at batch 128); every metric is a sum over examples, so only the
    float rounding of padded products can differ (docs/performance.md). ``train_length_window``
    > 0 cuts each client's training batches from windows of that many batches sorted by
    length (:func:`~ubsmoe.data.datamodule.length_grouped_batches`); 0 keeps plain shuffled
    batches. Unlike the evaluation order, it changes what a run learns.
    """

    batch_size: int
    eval_batch_size: int
    max_train_examples: int | None
    max_eval_examples: int | None
    cache_dir: str | None = None
    eval_sort_by_length: bool = True
    train_length_window: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> LoaderSpec:
        """The ``data.*`` batching keys and ``paths.cache_dir`` of a composed run config."""
        data = cfg.data
        return cls(
            batch_size=data.batch_size, eval_batch_size=data.eval_batch_size,
            max_train_examples=data.max_train_examples, max_eval_examples=data.max_eval_examples,
            cache_dir=str(cfg.paths.cache_dir), eval_sort_by_length=bool(data.eval_sort_by_length),
            train_length_window=int(data.train_length_window),
        )  # fmt: skip

    def eval_loader(self, examples: Any, lengths: Sequence[int], collate_fn: Callable[[list[Any]], Any]) -> DataLoader:
        """One evaluation set's loader: batches of ``eval_batch_size``, longest examples first when sorting."""
        order = list(range(len(lengths)))
        if self.eval_sort_by_length:
            order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep their order
        return DataLoader(examples, batch_size=self.eval_batch_size, sampler=order, collate_fn=collate_fn)

    def train_rows(self, available: int) -> int:
        """How many of ``available`` training rows the run keeps."""
        return available if self.max_train_examples is None else min(available, self.max_train_examples)

    def train_subsample(self, available: int, seed: int) -> np.ndarray | None:
        """Sorted indices of the kept training rows (the first N of a seeded permutation, so every
        label can appear), or ``None`` when every row is kept."""
        if self.max_train_examples is None or self.max_train_examples >= available:
            return None
        order = np.random.default_rng(derive_seed(seed, "subsample")).permutation(available)
        return np.sort(order[: self.max_train_examples])
