"""Robust aggregation rules against small reference implementations, and the byzantine fault."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import compose_config
from scipy import stats

from ubsmoe.errors import ConfigError
from ubsmoe.fl.aggregators import (
    aggregating_with,
    coordinate_rule,
    median_rule,
    multi_krum,
    trimmed_mean_rule,
)
from ubsmoe.fl.faults import FaultInjection, poison_update, poisoned_records
from ubsmoe.fl.strategies.base import weighted_mean
from ubsmoe.validate import validate


def _values(clients: int, shape: tuple[int, ...] = (5, 3), seed: int = 0) -> torch.Tensor:
    return torch.randn((clients, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _equal(values: torch.Tensor) -> torch.Tensor:
    return torch.full_like(values, 1.0 / values.shape[0])


@pytest.mark.parametrize("clients", [1, 2, 5, 6])
def test_median_with_equal_weights_is_numpys_median(clients: int) -> None:
    v = _values(clients)
    expected = np.median(v.numpy(), axis=0)
    np.testing.assert_allclose(median_rule(v, _equal(v)).numpy(), expected, rtol=0, atol=1e-12)


def test_weighted_median_equals_the_median_of_values_repeated_by_their_integer_weights() -> None:
    v = _values(4)
    counts = torch.tensor([1, 3, 2, 5], dtype=torch.float64)
    w = (counts / counts.sum()).reshape(4, 1, 1).expand_as(v)
    repeated = np.repeat(v.numpy(), counts.int().numpy(), axis=0)
    np.testing.assert_allclose(median_rule(v, w).numpy(), np.median(repeated, axis=0), atol=1e-12)


@pytest.mark.parametrize(("clients", "fraction"), [(10, 0.1), (10, 0.2), (8, 0.25), (5, 0.0)])
def test_trimmed_mean_with_equal_weights_is_scipys_trim_mean(clients: int, fraction: float) -> None:
    v = _values(clients)
    expected = stats.trim_mean(v.numpy(), fraction, axis=0)
    np.testing.assert_allclose(trimmed_mean_rule(fraction)(v, _equal(v)).numpy(), expected, atol=1e-12)


def test_weighted_trimmed_mean_equals_the_trimmed_mean_of_values_repeated_by_their_integer_weights() -> None:
    v = _values(4, seed=3)
    counts = torch.tensor([2, 3, 1, 4], dtype=torch.float64)  # 10 copies: fraction 0.2 drops 2 a side
    w = (counts / counts.sum()).reshape(4, 1, 1).expand_as(v)
    repeated = np.repeat(v.numpy(), counts.int().numpy(), axis=0)
    expected = stats.trim_mean(repeated, 0.2, axis=0)
    np.testing.assert_allclose(trimmed_mean_rule(0.2)(v, w).numpy(), expected, atol=1e-12)


def _krum_reference(vectors: np.ndarray, f: int, select: int) -> list[int]:
    n = len(vectors)
    scores = []
    for i in range(n):
        d = sorted(float(((vectors[i] - vectors[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[: max(1, n - f - 2)]))
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:select])


@pytest.mark.parametrize(("f", "select"), [(1, 1), (2, 1), (2, 4), (0, 3)])
def test_multi_krum_equals_a_loop_reference(f: int, select: int) -> None:
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(8, 6))
    vectors[[2, 5]] *= 50  # two far-off clients
    chosen = multi_krum(torch.from_numpy(vectors), f, select)
    assert chosen == _krum_reference(vectors, f, select)
    assert 2 not in chosen and 5 not in chosen


def test_multi_krum_default_keeps_n_minus_f() -> None:
    assert len(multi_krum(torch.randn(7, 3), 2)) == 5


@pytest.mark.parametrize("aggregator", ["mean", "median", "trimmed_mean", "krum"])
def test_identical_clients_give_that_client(aggregator: str) -> None:
    one = torch.randn(4, 3, dtype=torch.float32)
    tensors = [one.clone() for _ in range(5)]
    weights = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    with aggregating_with(coordinate_rule(aggregator, 0.2)):
        out = weighted_mean(tensors, weights)
    torch.testing.assert_close(out, one, rtol=0, atol=1e-6)
    assert multi_krum(torch.stack([one.reshape(-1)] * 5), 1) == [0, 1, 2, 3]


def test_weighted_mean_routes_through_the_active_rule_and_resists_one_outlier() -> None:
    honest = [torch.full((3,), 1.0 + 0.01 * i) for i in range(4)]
    poisoned = honest + [torch.full((3,), 1000.0)]
    weights = torch.full((5,), 0.2, dtype=torch.float64)
    assert float(weighted_mean(poisoned, weights)[0]) > 100  # the mean follows the outlier
    with aggregating_with(median_rule):
        assert abs(float(weighted_mean(poisoned, weights)[0]) - 1.02) < 1e-6
    with aggregating_with(trimmed_mean_rule(0.2)):
        assert abs(float(weighted_mean(poisoned, weights)[0]) - 1.02) < 1e-6
    assert float(weighted_mean(poisoned, weights)[0]) > 100  # the rule ends with the block


def test_per_expert_weights_are_applied_per_row_by_the_median() -> None:
    tensors = [torch.tensor([[0.0, 0.0], [5.0, 5.0]]), torch.tensor([[1.0, 1.0], [6.0, 6.0]]),
               torch.tensor([[2.0, 2.0], [7.0, 7.0]])]  # fmt: skip
    weights = torch.tensor([[0.8, 0.0], [0.1, 0.1], [0.1, 0.9]], dtype=torch.float64)  # [C, E]
    with aggregating_with(median_rule):
        out = weighted_mean(tensors, weights)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [7.0, 7.0]]))


# ------------------------------------------------------------------ the byzantine fault


def test_poisoning_scales_flips_or_replaces_the_change() -> None:
    received = {"w": torch.ones(1000), "b": torch.zeros(3)}
    trained = {"w": torch.ones(1000) + 0.01, "b": torch.tensor([0.1, -0.2, 0.3])}
    for mode, factor in (("scale", 100.0), ("sign_flip", 3.0)):
        sent = {n: t.clone() for n, t in trained.items()}
        poison_update(sent, received, mode, factor, random.Random(0))
        sign = 1.0 if mode == "scale" else -1.0
        for n in sent:
            torch.testing.assert_close(sent[n] - received[n], sign * factor * (trained[n] - received[n]))
    sent = {n: t.clone() for n, t in trained.items()}
    poison_update(sent, received, "noise", 10.0, random.Random(0))
    change = sent["w"] - received["w"]
    assert abs(float(change.norm()) / float((trained["w"] - received["w"]).norm()) - 10.0) < 0.6
    assert float(change.mean()).__abs__() < 0.05  # noise, not the honest direction


def test_byzantine_is_drawn_and_logged_by_seed_alone() -> None:
    faults = FaultInjection(byzantine=0.3, byzantine_mode="sign_flip", byzantine_scale=5.0)
    accepted = [(c, "t") for c in range(200)]
    records = poisoned_records(faults, seed=7, round_idx=2, accepted=accepted)
    hit = {r.client for r in records}
    assert hit == {c for c in range(200) if faults.draw(7, 2, c) == "byzantine"}
    assert 40 < len(hit) < 80
    assert all(r.kind == "byzantine" and r.round == 3 and "sign_flip x5" in r.reason for r in records)
    assert poisoned_records(FaultInjection(), 7, 2, accepted) == []


def test_config_checks_for_the_new_keys() -> None:
    validate(compose_config("server.aggregator=trimmed_mean", "server.trim_fraction=0.2"))
    validate(compose_config("federation.faults.byzantine=0.2", "federation.faults.byzantine_mode=noise"))
    for overrides, key in (
        (("server.aggregator=mode",), "server.aggregator"),
        (("server.aggregator=trimmed_mean", "server.trim_fraction=0.5"), "server.trim_fraction"),
        (("server.aggregator=krum", "server.krum_byzantine=4"), "server.krum_byzantine"),
        (("federation.faults.byzantine_mode=flip",), "federation.faults.byzantine_mode"),
        (("federation.faults.byzantine=0.6", "federation.faults.fail=0.6"), "federation.faults"),
    ):
        with pytest.raises(ConfigError) as err:
            validate(compose_config(*overrides))
        assert err.value.key == key
