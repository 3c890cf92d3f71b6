"""Partitioners: coverage, determinism, skew, minimum sizes and argument errors."""

from __future__ import annotations

from pathlib import Path
import numpy as np
import pyarrow.parquet as pq
import pytest

from ubsmoe.data.partition import (
    MAX_REDRAWS,
    bucketize_scores,
    dirichlet_partition,
    iid_partition,
    partition,
)
from ubsmoe.errors import ConfigError

GLUE_DIR = str(Path(__file__).resolve().parents[1] / "data" / "glue")


@pytest.fixture(scope="module")
def sst2_labels() -> np.ndarray:
    return pq.read_table(f"{GLUE_DIR}/sst2/train.parquet", columns=["label"])["label"].to_numpy()


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.size == n
    assert np.array_equal(np.sort(joined), np.arange(n))  # each index exactly once
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted within a client


def mean_label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    classes = np.unique(labels)
    entropies = []
    for part in parts:
        counts = np.array([(labels[part] == c).sum() for c in classes], dtype=float)
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(entropies))


def test_dirichlet_covers_every_example_once(sst2_labels):
    parts = dirichlet_partition(sst2_labels, num_clients=10, alpha=0.5, min_size=10, seed=3)
    assert len(parts) == 10
    assert_exact_cover(parts, sst2_labels.size)


def test_dirichlet_is_deterministic_in_the_seed(sst2_labels):
    a = dirichlet_partition(sst2_labels, 10, 0.5, 10, seed=1)
    b = dirichlet_partition(sst2_labels, 10, 0.5, 10, seed=1)
    c = dirichlet_partition(sst2_labels, 10, 0.5, 10, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_smaller_alpha_gives_more_label_skew(sst2_labels):
    skewed = dirichlet_partition(sst2_labels, 10, alpha=0.1, min_size=10, seed=0)
    near_iid = dirichlet_partition(sst2_labels, 10, alpha=100.0, min_size=10, seed=0)
    h_skewed = mean_label_entropy(skewed, sst2_labels)
    h_iid = mean_label_entropy(near_iid, sst2_labels)
    overall = mean_label_entropy([np.arange(sst2_labels.size)], sst2_labels)  # about 0.99 bits
    assert h_iid == pytest.approx(overall, abs=0.02)
    assert h_skewed < h_iid - 0.3


def test_minimum_size_holds_even_when_redraws_cannot_reach_it():
    labels = np.repeat(np.arange(4), 50)  # 200 examples, 4 classes
    # 20 clients x 10 = the whole set: only an exactly even split satisfies the minimum,
    # which a Dirichlet(0.05) draw never produces, so the deterministic top-up must run.
    parts = dirichlet_partition(labels, num_clients=20, alpha=0.05, min_size=10, seed=0)
    assert_exact_cover(parts, labels.size)
    assert [p.size for p in parts] == [10] * 20
    again = dirichlet_partition(labels, num_clients=20, alpha=0.05, min_size=10, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again))
    assert MAX_REDRAWS >= 1


def test_minimum_size_holds_on_real_labels(sst2_labels):
    subset = sst2_labels[:3000]
    parts = dirichlet_partition(subset, num_clients=30, alpha=0.05, min_size=50, seed=4)
    assert_exact_cover(parts, subset.size)
    assert min(p.size for p in parts) >= 50


def test_iid_is_balanced_and_deterministic(sst2_labels):
    parts = iid_partition(1003, num_clients=10, seed=5)
    assert_exact_cover(parts, 1003)
    assert sorted(p.size for p in parts) == [100] * 7 + [101] * 3
    assert all(np.array_equal(x, y) for x, y in zip(parts, iid_partition(1003, 10, seed=5)))
    iid = partition(sst2_labels, method="iid", num_clients=10, alpha=1.0, min_size=1, seed=0)
    assert mean_label_entropy(iid, sst2_labels) == pytest.approx(
        mean_label_entropy([np.arange(sst2_labels.size)], sst2_labels), abs=0.01
    )


def test_partition_dispatches_to_dirichlet(sst2_labels):
    direct = dirichlet_partition(sst2_labels, 5, 0.3, 10, seed=9)
    dispatched = partition(sst2_labels, method="dirichlet", num_clients=5, alpha=0.3, min_size=10, seed=9)
    assert all(np.array_equal(x, y) for x, y in zip(direct, dispatched))


def test_bucketize_scores_gives_quantile_buckets():
    scores = np.linspace(0.0, 5.0, 100)
    buckets = bucketize_scores(scores, 4)
    assert buckets.dtype == np.int64
    assert np.bincount(buckets).tolist() == [25, 25, 25, 25]
    assert np.all(np.diff(buckets) >= 0)  # monotone in the score
    assert bucketize_scores(scores, 1).tolist() == [0] * 100
    with pytest.raises(ConfigError, match="data.regression_buckets"):
        bucketize_scores(scores, 0)


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_non_positive_alpha_is_rejected(alpha):
    with pytest.raises(ConfigError, match="federation.dirichlet_alpha"):
        partition(np.zeros(100), method="dirichlet", num_clients=2, alpha=alpha, min_size=1, seed=0)


def test_more_clients_than_examples_allow_is_rejected_with_the_numbers():
    with pytest.raises(ConfigError, match="federation.num_clients") as err:
        partition(np.zeros(100), method="dirichlet", num_clients=11, alpha=1.0, min_size=10, seed=0)
    assert "100" in str(err.value) and "10" in str(err.value)
    with pytest.raises(ConfigError, match="federation.num_clients"):
        partition(np.zeros(100), method="iid", num_clients=0, alpha=1.0, min_size=0, seed=0)


def test_unknown_method_is_rejected_with_the_choices():
    with pytest.raises(ConfigError, match="federation.partition") as err:
        partition(np.zeros(10), method="quantity", num_clients=2, alpha=1.0, min_size=1, seed=0)
    assert "dirichlet" in str(err.value) and "iid" in str(err.value)
