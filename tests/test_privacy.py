"""Client-level DP: clipping bound, calibrated noise, the accountant's epsilon, resume, and the config checks."""

from __future__ import annotations

import io
import math

import pytest
import torch
from dp_accounting import dp_event, rdp
from helpers import compose_config, make_update
from hypothesis import given, settings
from hypothesis import strategies as st

from ubsmoe.errors import ConfigError
from ubsmoe.fl.aggregation import ServerAggregation, update_parts
from ubsmoe.fl.client import ClientPayload
from ubsmoe.fl.server import ServerState
from ubsmoe.fl.strategies import FedAvg, SparseMoEStrategy
from ubsmoe.privacy.accountant import PrivacyLedger, epsilon_after
from ubsmoe.privacy.dp import ClientLevelDP, clip_update, resolved_noise_multiplier, update_norm
from ubsmoe.settings import PrivacySettings
from ubsmoe.validate import validate

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(st.lists(finite, min_size=1, max_size=20), min_size=1, max_size=5),
    clip=st.floats(min_value=1e-4, max_value=1e4),
)
def test_a_clipped_update_never_exceeds_the_clip(parts: list[list[float]], clip: float) -> None:
    tensors = {f"p{i}": torch.tensor(values, dtype=torch.float32) for i, values in enumerate(parts)}
    clipped, norm = clip_update(tensors, clip)
    assert update_norm(clipped) <= clip * (1 + 1e-12)
    if norm <= clip:  # short updates pass unchanged
        for name, t in tensors.items():
            torch.testing.assert_close(clipped[name], t.to(torch.float64))


def _mechanism(**overrides: object) -> ClientLevelDP:
    settings_ = PrivacySettings(**{"dp": "fixed", **overrides})  # type: ignore[arg-type]
    return ClientLevelDP(settings_, num_clients=100, clients_per_round=10, rounds=5, seed=3)


def test_the_noise_has_the_calibrated_std() -> None:
    dp = _mechanism(clip_norm=0.5, noise_multiplier=2.0)
    noise = dp.noise_like(torch.zeros(200_000), count=4)
    expected = 2.0 * 0.5 / 4
    # the sample std of 2e5 normals is within 1% of the true one far beyond 5 sigma (sigma ~ 0.16%)
    assert abs(float(noise.std()) / expected - 1) < 0.01
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(200_000)


def test_epsilon_after_r_rounds_is_the_accountants_own() -> None:
    q, z, delta, rounds = 0.1, 1.1, 1e-5, 7
    ledger = PrivacyLedger(delta)
    for _ in range(rounds):
        ledger.record_round(q, z)
    reference = rdp.RdpAccountant(orders=[1.5, *range(2, 129), 256, 512])
    reference.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds)
    expected = reference.get_epsilon(delta)
    assert ledger.epsilon() == pytest.approx(epsilon_after(q, z, rounds, delta), rel=1e-12)
    assert ledger.epsilon() == pytest.approx(expected, rel=0.02)  # other Renyi orders: nearly the same bound
    assert ledger.epsilon() > epsilon_after(q, z, rounds - 1, delta) > 0


def test_target_epsilon_sets_the_smallest_noise_that_meets_it() -> None:
    target = PrivacySettings(dp="fixed", noise_multiplier=None, target_epsilon=4.0)
    z = resolved_noise_multiplier(target, num_clients=100, clients_per_round=10, rounds=20)
    assert epsilon_after(0.1, z, 20, 1e-5) <= 4.0 + 1e-6
    assert epsilon_after(0.1, z * 0.97, 20, 1e-5) > 4.0


def _round(dp: ClientLevelDP, norms: list[float]) -> torch.Tensor:
    for n in norms:
        dp.clip_client({"x": torch.tensor([n])})
    noise = dp.noise_like(torch.zeros(5), len(norms))
    dp.end_round()
    return noise


def test_resume_keeps_the_accountant_clip_and_noise() -> None:
    norms = [[0.05, 0.3, 0.2], [0.5, 0.01, 0.02], [0.2, 0.2, 0.9]]
    straight = _mechanism(dp="adaptive", clip_norm=0.1, noise_multiplier=1.0, count_noise=1.0)
    expected = [_round(straight, n) for n in norms]
    first = _mechanism(dp="adaptive", clip_norm=0.1, noise_multiplier=1.0, count_noise=1.0)
    got = [_round(first, norms[0])]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = _mechanism(dp="adaptive", clip_norm=0.1, noise_multiplier=1.0, count_noise=1.0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got += [_round(resumed, n) for n in norms[1:]]
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.clip == straight.clip and resumed.epsilon() == straight.epsilon()
    assert resumed.ledger.rounds == 3


def test_adaptive_clipping_follows_the_unclipped_fraction() -> None:
    dp = _mechanism(dp="adaptive", clip_norm=1.0, noise_multiplier=0.0, count_noise=1e-9, adaptive_lr=0.2)
    _round(dp, [0.1, 0.2, 0.3, 0.4])  # all unclipped: b = 1 > 0.5, the clip shrinks
    assert dp.clip == pytest.approx(math.exp(-0.2 * 0.5))
    _round(dp, [5.0, 6.0, 7.0, 8.0])  # all clipped: b = 0, it grows back
    assert dp.clip == pytest.approx(1.0)


def test_adaptive_clipping_pays_for_the_count_in_the_updates_noise() -> None:
    dp = _mechanism(dp="adaptive", noise_multiplier=1.0, count_noise=1.0)
    assert dp.update_multiplier == pytest.approx((1.0 - 0.25) ** -0.5)
    assert dp.noise_std(4) == pytest.approx(dp.update_multiplier * dp.clip / 4)


# ------------------------------------------------------------------ the mechanism in the aggregation


def _sparse_round(num_examples: tuple[int, ...] = (10, 10, 10)) -> tuple[ServerState, list, dict]:
    g = torch.Generator().manual_seed(0)
    received = {"layer.expert.lora_A": torch.randn(4, 2, 3, generator=g), "router": torch.randn(4, 3, generator=g)}
    pg = {"layer": torch.randn(4, 3, generator=g)}
    server = ServerState(round=0, global_state=dict(received), pg_defaults=dict(pg))
    updates, payloads = [], {}
    for c, n in enumerate(num_examples):
        state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in received.items()}
        update = make_update(
            state, n, k=2, client_id=c, expert_tokens={"layer": torch.tensor([30.0, 30.0, 20.0, 20.0])},
            tokens=50.0, pg_defaults={"layer": pg["layer"] + 0.1 * torch.randn(4, 3, generator=g)},
        )  # fmt: skip
        updates.append(update)
        payloads[c] = ClientPayload(state=dict(received), pg_defaults=dict(pg))
    return server, updates, payloads


def _strategy() -> SparseMoEStrategy:
    return SparseMoEStrategy(["layer.expert.lora_A"], exponent=2.0)


def test_no_noise_and_a_huge_clip_give_the_plain_aggregate() -> None:
    plain_server, updates, payloads = _sparse_round()
    ServerAggregation().aggregate(_strategy(), plain_server, updates, payloads)
    dp_server, updates, payloads = _sparse_round()
    dp = _mechanism(clip_norm=1e9, noise_multiplier=0.0)
    ServerAggregation(dp=dp).aggregate(_strategy(), dp_server, updates, payloads)
    for name, tensor in plain_server.global_state.items():
        torch.testing.assert_close(dp_server.global_state[name], tensor, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dp_server.pg_defaults["layer"], plain_server.pg_defaults["layer"])
    torch.testing.assert_close(dp_server.utilization["layer"], plain_server.utilization["layer"])
    assert dp.ledger.rounds == 1


def test_under_dp_the_average_is_unweighted_over_clipped_updates() -> None:
    server, updates, payloads = _sparse_round(num_examples=(1, 50, 500))
    dp = _mechanism(clip_norm=0.05, noise_multiplier=0.0)
    averaged = ServerAggregation(dp=dp).aggregate(FedAvg(), server, updates, payloads)
    clipped = []
    for copy in averaged:
        parts = update_parts(copy, payloads[copy.spec.client_id])  # its telemetry is flat: leave the shares out
        sent = {name: t for name, t in parts.items() if not name.startswith("utilization/")}
        assert update_norm(sent) <= 0.05 * (1 + 1e-6)
        clipped.append(copy.state["router"].double() - payloads[copy.spec.client_id].state["router"].double())
        assert copy.num_examples == 1
    expected = payloads[0].state["router"].double() + torch.stack(clipped).mean(0)
    torch.testing.assert_close(server.global_state["router"].double(), expected, rtol=0, atol=1e-6)


def test_the_server_adds_noise_of_the_calibrated_std_to_the_average() -> None:
    server, updates, payloads = _sparse_round()
    big = torch.zeros(20_000, 10)
    server.global_state["big"] = big.clone()
    for u in updates:
        u.state["big"] = big.clone()
    for p in payloads.values():
        p.state["big"] = big.clone()
    dp = _mechanism(clip_norm=2.0, noise_multiplier=1.5)
    ServerAggregation(dp=dp).aggregate(FedAvg(), server, updates, payloads)
    assert abs(float(server.global_state["big"].std()) / (1.5 * 2.0 / 3) - 1) < 0.01


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("privacy=fixed", "method=flora"), "method.name"),
        (("privacy=fixed", "method=flexlora"), "method.name"),
        (("privacy=fixed", "method=hetlora"), "method.name"),
        (("privacy=fixed", "method=flame", "privacy.public_calibration=true"), "method.tier_scale"),
        (("privacy=fixed",), "privacy.public_calibration"),
        (("privacy=fixed", "method=fedit", "server.aggregator=median"), "server.aggregator"),
        (("privacy=fixed", "method=fedit", "privacy.target_epsilon=8"), "privacy.noise_multiplier"),
        (("privacy=adaptive", "method=fedit", "privacy.count_noise=0.4"), "privacy.count_noise"),
        (("privacy=fixed", "privacy.clip_norm=0"), "privacy.clip_norm"),
        (("privacy=fixed", "privacy.dp=local"), "privacy.dp"),
    ],
)
def test_dp_refuses_what_it_cannot_protect(overrides: tuple[str, ...], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(*overrides))
    assert err.value.key == key


@pytest.mark.parametrize(
    "overrides",
    [
        ("privacy=fixed", "method=fedit"),
        ("privacy=adaptive", "method=smoe", "privacy.public_calibration=true"),
        ("privacy=fixed", "method=flame", "method.tier_scale=false", "privacy.public_calibration=true"),
        ("privacy=fixed", "method=fedit", "privacy.target_epsilon=8", "privacy.noise_multiplier=null"),
        ("privacy=fixed", "model.moefy.method=weights", "model.router_init=centroid", "model.moefy.skip_defaults=false"),
    ],
)
def test_dp_runs_on_the_averaged_methods(overrides: tuple[str, ...]) -> None:
    validate(compose_config(*overrides))
