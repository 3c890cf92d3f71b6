"""Config validation: each bad value gets one ConfigError naming its key, before any work."""

from __future__ import annotations

import pytest
from helpers import compose_config

from ubsmoe.settings import Tier, parse_tiers

from ubsmoe.validate import validate
from ubsmoe.errors import ConfigError
from ubsmoe.fl.client import assign_tiers, make_client_specs, make_tier_specs


def test_default_experiment_is_valid() -> None:
    tiers = validate(compose_config("experiment=glue_hetero"))
    assert [t.beta for t in tiers] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("federation.clients_per_round=30", "federation.clients_per_round"),
        ("federation.eval_every=0", "federation.eval_every"),
        ("federation.dirichlet_alpha=0", "federation.dirichlet_alpha"),
        ("federation.dirichlet_alpha=-1.5", "federation.dirichlet_alpha"),
        ("federation.num_clients=0", "federation.num_clients"),
        ("federation.rounds=0", "federation.rounds"),
        ("federation.local_epochs=2", "federation.local_steps"),
        ("federation.partition=zipf", "federation.partition"),
        ("model.num_experts=0", "model.num_experts"),
        ("model.pooling=max", "model.pooling"),
        ("model.lora.rank=0", "model.lora.rank"),
        ("method.dmr.zeta=1.5", "method.dmr.zeta"),
        ("method.dmr.phi_min=2", "method.dmr.phi_min"),
        ("method.dmr.np_ratio=0.5", "method.dmr.np_ratio"),
        ("logger.mode=cloud", "logger.mode"),
        ("resume=/no/such/checkpoint.ckpt", "resume"),
        ("seed=-1", "seed"),
        ("data.train_length_window=-1", "data.train_length_window"),
        ("data.train_length_window=true", "data.train_length_window"),
    ],
)
def test_bad_values_name_their_key(override: str, key: str) -> None:
    cfg = compose_config(override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key
    assert key in str(err.value)


def test_tier_group_values_are_checked() -> None:
    cfg = compose_config("tiers=two")
    cfg.tiers[0].beta = 1.5
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.beta=1.5"):
        validate(cfg)


def test_tier_betas_and_shares() -> None:
    with pytest.raises(ConfigError, match=r"tiers\[1\]\.beta"):
        parse_tiers([{"name": "a", "beta": 0.5, "share": 0.5}, {"name": "b", "beta": 0.0, "share": 0.5}])
    with pytest.raises(ConfigError, match="sum to 1"):
        parse_tiers([{"name": "a", "beta": 0.5, "share": 0.5}, {"name": "b", "beta": 1.0, "share": 0.4}])
    with pytest.raises(ConfigError, match="unique"):
        parse_tiers([{"name": "a", "beta": 0.5, "share": 0.5}, {"name": "a", "beta": 1.0, "share": 0.5}])


def test_k_and_rank_follow_beta() -> None:
    tiers = [Tier("a", 0.25, 0.25), Tier("b", 0.5, 0.25), Tier("c", 0.75, 0.25), Tier("d", 1.0, 0.25)]
    assert [t.num_experts_active(8) for t in tiers] == [2, 4, 6, 8]
    assert [t.lora_rank(8) for t in tiers] == [2, 4, 6, 8]
    assert Tier("tiny", 0.05, 1.0).num_experts_active(8) == 1  # never zero experts
    assert Tier("x", 0.3, 1.0).num_experts_active(10) == 3  # floor(3.0) despite float error


def test_tier_assignment_is_deterministic_and_follows_shares() -> None:
    tiers = [Tier("a", 0.25, 0.5), Tier("b", 1.0, 0.3), Tier("c", 0.5, 0.2)]
    assigned = assign_tiers(10, tiers)
    assert assigned == assign_tiers(10, tiers)
    assert [assigned.count(i) for i in range(3)] == [5, 3, 2]
    assert len(assign_tiers(7, tiers)) == 7
    specs = make_client_specs(
        10, make_tier_specs(tiers, sparse=True, hetero_rank=False, num_experts=8, max_rank=8)
    )
    assert [s.client_id for s in specs] == list(range(10))
    assert {s.k for s in specs if s.tier.name == "a"} == {2}
    assert all(s.rank is None for s in specs)


def test_sampler_is_seeded_and_restorable() -> None:
    from ubsmoe.fl.server import ClientSampler

    a, b = ClientSampler(20, 5, seed=3), ClientSampler(20, 5, seed=3)
    first = [a.sample() for _ in range(3)]
    assert first == [b.sample() for _ in range(3)]
    assert all(len(set(s)) == 5 for s in first)
    assert first != [ClientSampler(20, 5, seed=4).sample() for _ in range(3)]
    saved = a.state_dict()
    nxt = a.sample()
    a.load_state_dict(saved)
    assert a.sample() == nxt
