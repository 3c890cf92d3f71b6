"""The paper's routing: K_max sets the tiers' K_c, an absolute N_p fixes the candidate set."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import compose_config

from ubsmoe.settings import Tier, resolve_k_max

from ubsmoe.validate import validate
from ubsmoe.errors import ConfigError
from ubsmoe.fl.client import make_tier_specs
from ubsmoe.smoe.routing import modulate, num_candidates, route

TIERS = [Tier("t25", 0.25, 0.25), Tier("t50", 0.5, 0.25), Tier("t75", 0.75, 0.25), Tier("t100", 1.0, 0.25)]


def _ks(k_max: int | None, num_experts: int = 8) -> list[int | None]:
    specs = make_tier_specs(TIERS, sparse=True, hetero_rank=False, num_experts=num_experts, max_rank=8, k_max=k_max)
    return [s.k for s in specs]


def test_k_max_top_k_gives_a_sparse_full_budget_tier() -> None:
    assert _ks(None) == [2, 4, 6, 8]  # dense encoder cut into experts: K_max = M, beta = 1 runs the FFN
    assert _ks(8) == [2, 4, 6, 8]
    sparse = _ks(2)  # a native MoE's top-2 of 8: the full-budget tier routes 2 experts, not 8
    assert sparse == [1, 1, 1, 2]
    assert max(sparse) < 8
    assert _ks(8, num_experts=64)[-1] == 8  # OLMoE-like: 8 of 64 at beta = 1


def test_resolve_k_max_prefers_config_then_backbone_then_m() -> None:
    assert resolve_k_max(None, 8) == 8
    assert resolve_k_max(None, 64, default=8) == 8
    assert resolve_k_max(4, 64, default=8) == 4
    with pytest.raises(ConfigError, match="model.k_max"):
        resolve_k_max(9, 8)


def test_k_max_is_checked_before_any_work() -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config("model.k_max=9"))
    assert err.value.key == "model.k_max"
    validate(compose_config("model.k_max=2"))


def test_absolute_n_p_gives_every_tier_the_same_candidates() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=g)
    phi = torch.randn(8, generator=g)
    changed = []
    for k in (1, 2, 3, 4):
        n_p = num_candidates(k, 8, np_ratio=2.0, absolute=4)
        assert n_p == 4
        changed.append(modulate(logits, phi, 1.0, n_p) != logits)  # where phi was added = the candidates
    for mask in changed[1:]:
        assert torch.equal(mask, changed[0])
    assert int(changed[0].sum(1).max()) == 4
    # the ratio form gives the weaker tier a smaller set: 2, 4, 6, 8 candidates for K = 1 .. 4
    assert [num_candidates(k, 8, 2.0) for k in (1, 2, 3, 4)] == [2, 4, 6, 8]
    # a tier with more active experts than N_p gets N_p = K_c (the active set lies in the candidates)
    assert num_candidates(6, 8, 2.0, absolute=4) == 6
    top4 = logits.topk(4, dim=-1).indices
    r = route(logits, 2, phi=phi, n_candidates=4)
    assert all(set(r.experts[i].tolist()) <= set(top4[i].tolist()) for i in range(64))


def test_n_p_default_is_absolute_and_warns_when_it_covers_every_expert() -> None:
    cfg = compose_config()
    assert cfg.method.dmr.num_candidates == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(cfg)
    with pytest.warns(UserWarning, match="num_candidates=8"):
        validate(compose_config("method.dmr.num_candidates=8"))
    with pytest.raises(ConfigError) as err:
        validate(compose_config("method.dmr.num_candidates=0"))
    assert err.value.key == "method.dmr.num_candidates"
