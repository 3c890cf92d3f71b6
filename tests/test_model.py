"""FederatedClassifier: steps, client budgets, state exchange, PG and DMR in the loss, errors."""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from ubsmoe.errors import ConfigError
from helpers import build, compose_config, make_batch

from ubsmoe.settings import LoraSettings, MethodSettings, ModelSettings


@pytest.fixture(scope="module")
def sparse_model():
    return build()


@pytest.fixture(scope="module")
def dense_model():
    return build(sparse=False)


def train_steps(model, batch, steps):
    model.train()
    opt = model.configure_optimizers()
    losses = []
    for i in range(steps):
        loss = model.training_step(batch, i)
        loss.backward()
        model.on_after_backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_sparse_training_reduces_loss_and_restores(sparse_model):
    start = sparse_model.trainable_state()
    sparse_model.set_client(k=2)
    losses = train_steps(sparse_model, make_batch(), 6)
    assert losses[-1] < 0.7 * losses[0]
    changed = sparse_model.trainable_state()
    assert any(not torch.equal(start[n], changed[n]) for n in sparse_model.expert_tensor_names())
    tel = sparse_model.telemetry()
    assert len(tel) == 6
    layer = tel["encoder.layer.0"]
    assert layer["expert_tokens"].sum() == 2 * layer["tokens"] and layer["tokens"] == 6 * int(make_batch()["attention_mask"].sum())
    assert 0.25 <= float(layer["max_load_fraction"]) <= 1.0
    sparse_model.reset_telemetry()
    assert sparse_model.telemetry()["encoder.layer.0"]["tokens"] == 0
    sparse_model.load_trainable_state(start)
    assert all(torch.equal(v, sparse_model.trainable_state()[n]) for n, v in start.items())
    sparse_model.set_client()


def test_k_equal_m_matches_dense_model_logits(sparse_model, dense_model):
    batch = make_batch()
    sparse_model.set_client(k=8)
    sparse_model.eval(), dense_model.eval()
    # In float64: the experts sum the FFN's neurons in another order than the dense matmul,
    # which in float32 moves the logits by BLAS-dependent amounts; in float64 they agree to
    # ~1e-12 of their scale on any CPU.
    sparse64, dense64 = copy.deepcopy(sparse_model).double(), copy.deepcopy(dense_model).double()
    with torch.no_grad():
        a = sparse64._logits(batch)
        b = dense64._logits(batch)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * float(b.abs().max()))


def test_trainable_state_names_and_strict_loading(sparse_model):
    state = sparse_model.trainable_state()
    experts = sparse_model.expert_tensor_names()
    phis = sparse_model.phi_names()
    assert len(experts) == 6 * 4 and len(phis) == 6
    assert all(state[n].shape[0] == 8 for n in experts + phis)
    assert any(n.endswith("router.weight") for n in state) and "head.weight" in state
    assert all(v.device.type == "cpu" and not v.requires_grad for v in state.values())
    bad = dict(state)
    bad.pop("head.bias")
    with pytest.raises(KeyError):
        sparse_model.load_trainable_state(bad)
    bad = dict(state)
    bad["head.bias"] = torch.zeros(3)
    with pytest.raises(ValueError):
        sparse_model.load_trainable_state(bad)


def test_same_seed_same_state_and_global_rng_untouched(sparse_model):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    twin = build()
    assert torch.equal(torch.rand(3), expected_next)
    a, b = sparse_model.trainable_state(), twin.trainable_state()
    fresh = build(seed=0).trainable_state()
    assert a.keys() == b.keys()
    assert all(torch.equal(b[n], fresh[n]) for n in b)
    other = build(seed=1).trainable_state()
    assert not torch.equal(b["head.weight"], other["head.weight"])


def test_set_client_validates(sparse_model):
    for bad in (0, 9):
        with pytest.raises(ConfigError) as err:
            sparse_model.set_client(k=bad)
        assert err.value.key == "client.k"
    with pytest.raises(ConfigError):
        sparse_model.set_client(rank=9)
    sparse_model.set_client(k=3, tier_index=2)
    assert all(b.k == 3 and b.tier_index == 2 for b in sparse_model.blocks.values())
    sparse_model.set_client()
    assert all(b.k == 8 for b in sparse_model.blocks.values())


def test_pg_expert_signal_switch():
    method = MethodSettings()
    method.pg.expert_mode = "shared_mean"  # this mode writes into the gradients (missed_tokens: below)
    model = build(method=method)
    model.set_client(k=1)
    batch = make_batch(n=2, length=6)

    def starved_grads():
        model.zero_grad()
        model.train()
        for block in model.blocks.values():
            block.reset_step()
            with torch.no_grad():
                block.lora.lora_B1.normal_(std=0.01)  # so that every LoRA tensor has a real gradient
        model.training_step(batch, 0).backward()
        starved = {name: b.counters("step")["expert_tokens"] == 0 for name, b in model.blocks.items()}
        model.on_after_backward()
        out = []
        for name, block in model.blocks.items():
            for t in block.lora.tensors():
                out.append(t.grad[starved[name]])
        return out, starved

    method.pg.expert = False
    grads, starved = starved_grads()
    assert any(s.any() for s in starved.values())
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    method.pg.expert = True
    grads, _ = starved_grads()
    assert sum(torch.count_nonzero(g) for g in grads) > 0


def _expert_lora_change(eta: float, k: int, expert: bool = True):
    """Parameter change of every expert LoRA tensor after one AdamW step at client K = k."""
    method = MethodSettings()
    method.pg.eta, method.pg.expert = eta, expert
    model = build(method=method)
    model.set_client(k=k)
    model.train()
    with torch.no_grad():
        for block in model.blocks.values():
            block.lora.lora_B1.normal_(std=0.01, generator=torch.Generator().manual_seed(5))
            block.lora.lora_B2.normal_(std=0.01, generator=torch.Generator().manual_seed(6))
    before = {n: t.detach().clone() for n, t in model.named_parameters() if ".lora.lora_" in n and "intermediate" in n}
    opt = model.configure_optimizers()
    for block in model.blocks.values():
        block.reset_step()
    batch = make_batch(n=4, length=8)
    model.training_step(batch, 0).backward()
    tokens = {name: b.counters("step")["expert_tokens"].clone() for name, b in model.blocks.items()}
    model.on_after_backward()
    opt.step()
    params = dict(model.named_parameters())
    return {n: params[n].detach() - v for n, v in before.items()}, tokens


def test_pg_missed_token_step_is_outside_adamw_and_linear_in_eta():
    small, tokens = _expert_lora_change(2e-3, k=1)
    double, _ = _expert_lora_change(4e-3, k=1)
    off, _ = _expert_lora_change(2e-3, k=1, expert=False)
    starved_seen = 0
    for name, delta in small.items():
        layer = name.split(".intermediate")[0].removeprefix("backbone.")
        starved = tokens[layer] == 0
        # a token-less expert has no gradient: AdamW leaves it, only PG moves it, linearly in eta
        assert torch.count_nonzero(off[name][starved]) == 0
        if starved.any() and "lora_A" in name:
            starved_seen += 1
            assert torch.count_nonzero(delta[starved]) > 0
            # float32 parameters of size ~0.05: the change is exact up to their rounding (ulp ~4e-9)
            assert float(delta[starved].abs().max()) < 1e-3  # below the cap c_i = 1 (step RMS = lr)
            torch.testing.assert_close(double[name][starved], 2 * delta[starved], rtol=1e-3, atol=2e-8)
    assert starved_seen > 0


def test_pg_expert_signal_does_nothing_at_k_equal_m():
    with_pg, _ = _expert_lora_change(0.1, k=8)
    without, _ = _expert_lora_change(0.1, k=8, expert=False)
    for name, delta in with_pg.items():
        torch.testing.assert_close(delta, without[name], rtol=0, atol=0)


def test_dmr_penalty_and_optimizer_groups(sparse_model):
    batch = make_batch()
    sparse_model.set_client(k=2)
    sparse_model.eval()  # no dropout noise (dropout is 0 anyway), same routing twice
    with torch.no_grad():
        base = float(sparse_model.training_step(batch, 0))
        phi = sparse_model.blocks["encoder.layer.0"].phi
        phi.fill_(3.0)  # 2 above phi_max = 1 on each of 8 experts, and routing shifts uniformly
        shifted = float(sparse_model.training_step(batch, 0))
        phi.zero_()
    settings = sparse_model.method.dmr
    assert shifted - base == pytest.approx(settings.penalty * 8 * 2.0**2, rel=1e-4)
    opt = sparse_model.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    optim = sparse_model.optim_settings
    assert lrs == {"lora": optim.lr, "head": optim.head_lr, "router": optim.router_lr, "phi": optim.phi_lr}
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(sparse_model.trainable_state())
    sparse_model.set_client()


def test_pg_defaults_round_trip():
    method = MethodSettings()
    method.pg.router = True  # the defaults exist only with the router-side PG
    sparse_model = build(method=method)
    defaults = sparse_model.pg_defaults()
    assert set(defaults) == set(sparse_model.blocks) and defaults["encoder.layer.0"].shape == (8, 384)
    new = {n: torch.full_like(v, 0.5) for n, v in defaults.items()}
    sparse_model.set_pg_defaults(new)
    assert torch.equal(sparse_model.pg_defaults()["encoder.layer.3"], new["encoder.layer.3"])
    sparse_model.set_pg_defaults(defaults)


def test_dense_hetero_rank_masks_components(dense_model):
    state = dense_model.trainable_state()
    assert not dense_model.expert_tensor_names() and not dense_model.phi_names()
    ffn = [n for n in state if "intermediate.dense.lora" in n or "output.dense.lora" in n]
    assert len(ffn) == 6 * 2 * 2  # LoRA A and B on both FFN matrices of every layer
    full_flops = dense_model.flops_per_example(64)
    dense_model.set_client(rank=2)
    assert dense_model.flops_per_example(64) < full_flops  # a rank-2 client is counted at rank 2
    train_steps(dense_model, make_batch(), 2)
    trained = dense_model.trainable_state()
    for name, value in trained.items():
        if "lora_A" in name:
            assert torch.count_nonzero(value[2:]) == 0 and torch.count_nonzero(value[:2]) > 0
        elif "lora_B" in name:
            assert torch.count_nonzero(value[:, 2:]) == 0
    dense_model.set_client()
    dense_model.load_trainable_state(state)


def test_regression_head_and_validation():
    model = build(num_labels=1, sparse=True)
    batch = make_batch(regression=True)
    model.set_client(k=4)
    losses = train_steps(model, batch, 5)
    assert losses[-1] < losses[0]
    model.eval()
    model.validation_step(batch, 0)
    model.validation_step(batch, 1)
    values = model.compute_validation()
    assert set(values) == {"pearson", "loss"} and all(isinstance(v, float) for v in values.values())
    with torch.no_grad():
        expected = float(torch.nn.functional.mse_loss(model._logits(batch), batch["labels"]))
    assert values["loss"] == pytest.approx(expected, rel=1e-5)
    model.validation_step(batch, 0)
    assert model.compute_validation()["loss"] == pytest.approx(expected, rel=1e-5)  # reset between calls


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError) as err:
        build(model=ModelSettings(num_experts=7))
    assert err.value.key == "model.num_experts"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError) as err:
        build(model=ModelSettings(backbone=str(tmp_path)))
    assert err.value.key == "model.backbone"
    with pytest.raises(ConfigError) as err:
        build(model=ModelSettings(pooling="max"))
    assert err.value.key == "model.pooling"
    with pytest.raises(ConfigError) as err:
        build(model=ModelSettings(lora=LoraSettings(attention_targets=["nonexistent"])))
    assert err.value.key == "model.lora.attention_targets"


def test_router_pg_defaults_travel_only_when_the_router_pg_is_on():
    """The router-side PG costs L * M * h floats each way, and nothing when it is off."""
    from ubsmoe.fl.client import tensor_bytes

    router_on = MethodSettings()
    router_on.pg.router = True
    on = build(method=router_on)
    layers, m, h = len(on.blocks), on.model_settings.num_experts, on.backbone.config.hidden_size
    assert tensor_bytes(on.pg_defaults()) == layers * m * h * 4
    method = MethodSettings()
    method.pg.router = False
    off = build(method=method)
    assert off.pg_defaults() == {}
    off.set_pg_defaults({})  # a payload without defaults loads


def test_router_pg_is_off_by_default_as_in_the_paper(sparse_model):
    """The router-side PG is the project's addition: a default run exchanges none of its L * M * h floats."""
    from ubsmoe.settings import PGSettings, method_settings

    assert PGSettings().router is False
    for name in ("ubsmoe", "smoe", "smoe_llb", "flame"):
        assert method_settings(compose_config(f"method={name}")).pg.router is False, name
    assert sparse_model.pg_defaults() == {}
