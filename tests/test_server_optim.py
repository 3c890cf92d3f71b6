"""Server optimizers (Reddi et al., 2021): the aggregate's change as a pseudo-gradient.

Unit checks against torch's own optimizers and float64 hand references, the phi / PG
exemptions, the refusal for methods whose global state is no average, config validation,
and (slow) resume == straight on the smoke path with FedAdam.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import compose_config, make_update

from ubsmoe.validate import validate
from ubsmoe.errors import ConfigError
from ubsmoe.fl.client import ClientUpdate
from ubsmoe.fl.server import ServerState
from ubsmoe.fl.server_optim import ServerOptimizer, build_server_optimizer
from ubsmoe.fl.strategies import FedAvg, FLoRA, FlexLoRA, HetLoRA, SparseMoEStrategy
from ubsmoe.settings import ServerSettings

Tensors = dict[str, torch.Tensor]


def random_updates(state: Tensors, round_idx: int, n_clients: int = 3, dtype=torch.float32):
    """Client states scattered around ``state`` (seeded by the round), with unequal example counts."""
    g = torch.Generator().manual_seed(100 + round_idx)
    return [
        make_update(
            {k: (v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(dtype) for k, v in state.items()},
            num_examples=10 + 7 * c,
            client_id=c,
        )
        for c in range(n_clients)
    ]


def initial_state(dtype=torch.float32) -> Tensors:
    g = torch.Generator().manual_seed(0)
    return {
        "a.lora_A.weight": torch.randn(4, 6, generator=g, dtype=torch.float64).to(dtype),
        "a.lora_B.weight": torch.randn(5, 4, generator=g, dtype=torch.float64).to(dtype),
        "head.weight": torch.randn(2, 5, generator=g, dtype=torch.float64).to(dtype),
    }


def run_rounds(settings: ServerSettings | None, rounds: int = 4) -> list[Tensors]:
    server = ServerState(round=0, global_state=initial_state())
    opt = ServerOptimizer(settings)
    strategy = FedAvg()
    history = []
    for r in range(rounds):
        before = server.global_state
        strategy.aggregate(server, random_updates(before, r))
        opt.step(before, server)
        history.append(dict(server.global_state))
    return history


def test_fedavg_with_lr_1_is_the_aggregate_untouched() -> None:
    server = ServerState(round=0, global_state=initial_state())
    updates = random_updates(server.global_state, 0)
    expected = ServerState(round=0, global_state=dict(server.global_state))
    FedAvg().aggregate(expected, updates)
    FedAvg().aggregate(server, updates)
    aggregate = server.global_state
    opt = ServerOptimizer()  # the default settings: fedavg, lr 1
    opt.step(initial_state(), server)
    assert not opt.active and opt.optimizer is None and opt.state_dict() == {}
    assert server.global_state is aggregate  # the very dict the strategy produced: bit for bit
    for name, value in expected.global_state.items():
        assert torch.equal(server.global_state[name], value)


def test_fedavgm_with_momentum_0_and_lr_1_equals_fedavg() -> None:
    plain = run_rounds(None)
    sgd = run_rounds(ServerSettings(optimizer="fedavgm", lr=1.0, momentum=0.0))
    for a, b in zip(plain, sgd, strict=True):
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6 * float(a[name].abs().max()))


def test_fedavg_server_lr_scales_the_change() -> None:
    before = initial_state()
    server = ServerState(round=0, global_state=dict(before))
    FedAvg().aggregate(server, random_updates(before, 0))
    aggregate = dict(server.global_state)
    ServerOptimizer(ServerSettings(optimizer="fedavg", lr=0.5)).step(before, server)
    for name in before:
        expected = before[name].double() + 0.5 * (aggregate[name].double() - before[name].double())
        # the result is cast back to float32: a relative error of one float32 rounding
        torch.testing.assert_close(server.global_state[name].double(), expected, rtol=1.2e-7, atol=1e-12)


def test_fedavgm_momentum_accumulates_the_changes() -> None:
    """x_{t+1} = x_t + lr * m_t, m_t = beta * m_{t-1} + Delta_t (Hsu et al.; torch SGD, dampening 0)."""
    settings = ServerSettings(optimizer="fedavgm", lr=0.5, momentum=0.9)
    server = ServerState(round=0, global_state=initial_state(torch.float64))
    opt, strategy = ServerOptimizer(settings), FedAvg()
    x = {k: v.clone() for k, v in server.global_state.items()}
    m = {k: torch.zeros_like(v) for k, v in x.items()}
    for r in range(3):
        before = server.global_state
        strategy.aggregate(server, random_updates(before, r, dtype=torch.float64))
        aggregate = dict(server.global_state)
        opt.step(before, server)
        for k in x:
            m[k] = 0.9 * m[k] + (aggregate[k] - x[k])
            x[k] = x[k] + 0.5 * m[k]
            torch.testing.assert_close(server.global_state[k], x[k], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- quadratic toy problem
class Quadratic:
    """Clients c with f_c(x) = 0.5 * ||H_c (x - x*_c)||^2; each returns one local gradient step."""

    def __init__(self, dim: int = 5, clients: int = 3) -> None:
        g = torch.Generator().manual_seed(3)
        self.h = [torch.randn(dim, dim, generator=g, dtype=torch.float64) for _ in range(clients)]
        self.target = [torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(clients)]

    def client_state(self, x: torch.Tensor, c: int, lr: float = 0.05) -> torch.Tensor:
        grad = self.h[c].T @ (self.h[c] @ (x - self.target[c]))
        return x - lr * grad

    def loss(self, x: torch.Tensor) -> float:
        return float(sum(0.5 * (h @ (x - t)).pow(2).sum() for h, t in zip(self.h, self.target, strict=True)))


def run_toy(settings: ServerSettings, rounds: int = 12) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(global x after every round, the pseudo-gradient x - aggregate of every round)."""
    toy = Quadratic()
    server = ServerState(round=0, global_state={"x": torch.zeros(5, dtype=torch.float64)})
    opt, strategy = ServerOptimizer(settings), FedAvg()
    xs, grads = [], []
    for _ in range(rounds):
        before = server.global_state
        updates = [
            make_update({"x": toy.client_state(before["x"], c)}, num_examples=10, client_id=c) for c in range(3)
        ]
        strategy.aggregate(server, updates)
        grads.append(before["x"] - server.global_state["x"])
        opt.step(before, server)
        xs.append(server.global_state["x"].clone())
    return xs, grads


def test_fedadam_with_bias_correction_is_torch_adam_on_the_pseudo_gradients() -> None:
    settings = ServerSettings(optimizer="fedadam", lr=0.05, betas=(0.9, 0.99), tau=1e-3, bias_correction=True)
    xs, grads = run_toy(settings)
    x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    reference = torch.optim.Adam([x], lr=0.05, betas=(0.9, 0.99), eps=1e-3)
    for got, grad in zip(xs, grads, strict=True):
        x.grad = grad.clone()
        reference.step()
        torch.testing.assert_close(got, x.detach(), rtol=0, atol=1e-12)
    toy = Quadratic()
    assert toy.loss(xs[-1]) < toy.loss(torch.zeros(5, dtype=torch.float64))


def test_fedadam_default_is_the_papers_uncorrected_rule() -> None:
    """Reddi et al. Algorithm 2: m = b1 m + (1-b1) D, v = b2 v + (1-b2) D^2, x += lr m / (sqrt(v) + tau)."""
    settings = ServerSettings(optimizer="fedadam", lr=0.05, betas=(0.9, 0.99), tau=1e-3)
    assert settings.bias_correction is False
    xs, grads = run_toy(settings)
    x, m, v = (torch.zeros(5, dtype=torch.float64) for _ in range(3))
    for got, grad in zip(xs, grads, strict=True):
        delta = -grad
        m = 0.9 * m + 0.1 * delta
        v = 0.99 * v + 0.01 * delta**2
        x = x + 0.05 * m / (v.sqrt() + 1e-3)
        torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-12)


def yogi_reference(
    grads: list[list[float]], lr: float, b1: float, b2: float, tau: float, bias: bool, v0: float = 0.0
) -> list[list[float]]:
    """FedYogi by hand, one float at a time (python floats are float64)."""
    n = len(grads[0])
    x, m, v, out = [0.0] * n, [0.0] * n, [v0] * n, []
    for t, g in enumerate(grads, start=1):
        for i in range(n):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            g2 = g[i] * g[i]
            sign = (v[i] > g2) - (v[i] < g2)
            v[i] = v[i] - (1 - b2) * g2 * sign
            if bias:
                c1, c2 = 1 - b1**t, 1 - b2**t
                x[i] -= lr / c1 * m[i] / (math.sqrt(v[i] / c2) + tau)
            else:
                x[i] -= lr * m[i] / (math.sqrt(v[i]) + tau)
        out.append(list(x))
    return out


@pytest.mark.parametrize("bias_correction", [False, True])
def test_fedyogi_matches_a_hand_computed_float64_reference(bias_correction: bool) -> None:
    # Pseudo-gradients chosen so that v - g^2 changes sign along the way (both branches of Yogi's rule).
    grads = [[0.5, -1.0, 0.0], [0.1, -2.0, 0.3], [2.0, 0.01, -0.3], [-0.2, 0.0, 0.3], [0.05, 1.5, -4.0]]
    settings = ServerSettings(optimizer="fedyogi", lr=0.1, betas=(0.9, 0.99), tau=1e-3, bias_correction=bias_correction)
    opt = ServerOptimizer(settings)
    server = ServerState(round=0, global_state={"x": torch.zeros(3, dtype=torch.float64)})
    expected = yogi_reference(grads, 0.1, 0.9, 0.99, 1e-3, bias_correction)
    for grad, want in zip(grads, expected, strict=True):
        before = server.global_state
        server.global_state = {"x": before["x"] - torch.tensor(grad, dtype=torch.float64)}  # aggregate = x - g
        opt.step(before, server)
        want_t = torch.tensor(want, dtype=torch.float64)
        torch.testing.assert_close(server.global_state["x"], want_t, rtol=1e-12, atol=1e-14)
    # Yogi's v differs from Adam's on these gradients: the rule is not Adam in disguise.
    adam = ServerOptimizer(replace(settings, optimizer="fedadam", bias_correction=True))
    adam_server = ServerState(round=0, global_state={"x": torch.zeros(3, dtype=torch.float64)})
    for grad in grads:
        before = adam_server.global_state
        adam_server.global_state = {"x": before["x"] - torch.tensor(grad, dtype=torch.float64)}
        adam.step(before, adam_server)
    assert not torch.allclose(adam_server.global_state["x"], server.global_state["x"])


def test_initial_v_is_where_the_second_moment_starts() -> None:
    """``server.initial_v = tau^2``: the paper's v_{-1} >= tau^2 (the default 0 is torch's and Flower's)."""
    tau, v0 = 1e-3, 1e-2  # v0 well above tau^2 so that its effect is visible in every step
    xs, grads = run_toy(ServerSettings(optimizer="fedadam", lr=0.05, tau=tau, initial_v=v0))
    x, m = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    v = torch.full((5,), v0, dtype=torch.float64)
    for got, grad in zip(xs, grads, strict=True):
        m = 0.9 * m - 0.1 * grad
        v = 0.99 * v + 0.01 * grad**2
        x = x + 0.05 * m / (v.sqrt() + tau)
        torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(xs[0], run_toy(ServerSettings(optimizer="fedadam", lr=0.05, tau=tau))[0][0])

    xs, grads = run_toy(ServerSettings(optimizer="fedadagrad", lr=0.1, tau=tau, initial_v=v0))
    x, v = torch.zeros(5, dtype=torch.float64), torch.full((5,), v0, dtype=torch.float64)
    for got, grad in zip(xs, grads, strict=True):
        v = v + grad**2
        x = x - 0.1 * grad / (v.sqrt() + tau)
        torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-14)

    grads_y = [[0.5, -1.0, 0.0], [0.1, -2.0, 0.3], [2.0, 0.01, -0.3]]
    opt = ServerOptimizer(ServerSettings(optimizer="fedyogi", lr=0.1, tau=tau, initial_v=0.5))
    server = ServerState(round=0, global_state={"x": torch.zeros(3, dtype=torch.float64)})
    for grad, want in zip(grads_y, yogi_reference(grads_y, 0.1, 0.9, 0.99, tau, False, v0=0.5), strict=True):
        before = server.global_state
        server.global_state = {"x": before["x"] - torch.tensor(grad, dtype=torch.float64)}
        opt.step(before, server)
        torch.testing.assert_close(server.global_state["x"], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_fedadagrad_is_the_papers_rule_without_momentum() -> None:
    settings = ServerSettings(optimizer="fedadagrad", lr=0.1, tau=1e-3)
    xs, grads = run_toy(settings)
    x, v = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for got, grad in zip(xs, grads, strict=True):
        v = v + grad**2
        x = x - 0.1 * grad / (v.sqrt() + 1e-3)
        torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- exemptions and state
def test_phi_and_pg_defaults_keep_their_own_updates() -> None:
    phi = "backbone.encoder.layer.0.intermediate.phi"
    state = {phi: torch.zeros(4), "backbone.encoder.layer.0.intermediate.router.weight": torch.zeros(4, 3)}
    counts = {"encoder.layer.0": torch.tensor([5.0, 3.0, 0.0, 2.0])}
    updates = []
    for c in range(2):
        g = torch.Generator().manual_seed(c)
        updates.append(
            make_update(
                {k: torch.randn(v.shape, generator=g) for k, v in state.items()},
                num_examples=10 + c,
                expert_tokens=counts,
                tokens=10.0,
                pg_defaults={"encoder.layer.0": torch.randn(4, 3, generator=g)},
                client_id=c,
            )
        )
    strategy = SparseMoEStrategy(expert_tensor_names=[])
    plain = ServerState(round=0, global_state=dict(state), pg_defaults={"encoder.layer.0": torch.zeros(4, 3)})
    strategy.aggregate(plain, updates)
    server = ServerState(round=0, global_state=dict(state), pg_defaults={"encoder.layer.0": torch.zeros(4, 3)})
    opt = build_server_optimizer(
        ServerSettings(optimizer="fedadam", lr=0.01), strategy, frozen_names=[phi]
    )
    before = server.global_state
    strategy.aggregate(server, updates)
    opt.step(before, server)
    assert torch.equal(server.global_state[phi], plain.global_state[phi])  # phi_bar, left to DMR
    assert torch.equal(server.pg_defaults["encoder.layer.0"], plain.pg_defaults["encoder.layer.0"])
    router = "backbone.encoder.layer.0.intermediate.router.weight"
    assert not torch.allclose(server.global_state[router], plain.global_state[router])  # the optimizer did act
    assert opt.names == [router]


def test_flame_tier_absent_from_a_round_keeps_its_scale_under_fedadam() -> None:
    """A tier's scale changes only through its own clients: momentum from earlier rounds must not move it."""
    scale, router = "enc.ffn.tier_scale", "enc.ffn.router.weight"
    strategy = SparseMoEStrategy(expert_tensor_names=[], exponent=2.0)
    opt = build_server_optimizer(ServerSettings(optimizer="fedadam", lr=0.05), strategy)
    server = ServerState(round=0, global_state={scale: torch.ones(2), router: torch.zeros(4, 3)})
    counts = {"enc.ffn": torch.tensor([5.0, 3.0, 0.0, 2.0])}

    def round_of(tiers: list[int], round_idx: int) -> list[ClientUpdate]:
        g = torch.Generator().manual_seed(round_idx)
        updates = []
        for c, tier in enumerate(tiers):
            state = {k: v + torch.randn(v.shape, generator=g) for k, v in server.global_state.items()}
            update = make_update(state, num_examples=10 + c, expert_tokens=counts, tokens=10.0, client_id=c)
            updates.append(replace(update, spec=replace(update.spec, tier_index=tier)))
        return updates

    for r, tiers in enumerate([[0, 1, 1], [0, 1], [0, 0]]):  # tier 1 is absent from the last round
        before = server.global_state
        strategy.aggregate(server, round_of(tiers, r))
        opt.step(before, server)
        assert not torch.equal(server.global_state[scale][0], before[scale][0])
        assert not torch.allclose(server.global_state[router], before[router])  # the optimizer still acts
    assert torch.equal(server.global_state[scale][1], before[scale][1])
    assert scale not in opt.names


def test_state_dict_round_trip_continues_exactly() -> None:
    settings = ServerSettings(optimizer="fedyogi", lr=0.05)
    straight = run_rounds(settings, rounds=4)
    server = ServerState(round=0, global_state=initial_state())
    opt, strategy = ServerOptimizer(settings), FedAvg()
    for r in range(2):
        before = server.global_state
        strategy.aggregate(server, random_updates(before, r))
        opt.step(before, server)
    buffer = io.BytesIO()
    torch.save({"server_optimizer": opt.state_dict(), "global": server.global_state}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what checkpoints allow: tensors and plain containers
    resumed = ServerOptimizer(settings)
    resumed.load_state_dict(saved["server_optimizer"])
    server = ServerState(round=2, global_state=saved["global"])
    for r in range(2, 4):
        before = server.global_state
        strategy.aggregate(server, random_updates(before, r))
        resumed.step(before, server)
        for name, value in straight[r].items():
            assert torch.equal(server.global_state[name], value), name


# ----------------------------------------------------------------------------- who may take one
def test_only_averaging_strategies_opt_in() -> None:
    assert FedAvg.supports_server_optimizer and SparseMoEStrategy.supports_server_optimizer
    assert HetLoRA.supports_server_optimizer
    assert not FLoRA.supports_server_optimizer and not FlexLoRA.supports_server_optimizer
    with pytest.raises(ConfigError) as err:
        build_server_optimizer(ServerSettings(optimizer="fedyogi"), FlexLoRA(scaling=2.0))
    assert err.value.key == "server.optimizer"
    build_server_optimizer(ServerSettings(), FLoRA(scaling=2.0, seed=0))  # plain FedAvg: fine


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("method=flora", "server=fedadam"), "server.optimizer"),
        (("method=flexlora", "server=fedavgm"), "server.optimizer"),
        (("method=flora", "server.lr=0.5"), "server.lr"),
        (("server.optimizer=sgd",), "server.optimizer"),
        (("server.lr=-1",), "server.lr"),
        (("server.lr=0",), "server.lr"),
        (("server=fedadam", "server.betas=[0.9,1.0]"), "server.betas"),
        (("server=fedadam", "server.betas=[-0.1,0.9]"), "server.betas"),
        (("server=fedadam", "server.betas=[0.9]"), "server.betas"),
        (("server=fedadam", "server.tau=0"), "server.tau"),
        (("server=fedyogi", "server.tau=-1e-3"), "server.tau"),
        (("server=fedavgm", "server.momentum=1.0"), "server.momentum"),
        (("server.momentum=0.5",), "server.momentum"),  # momentum with plain fedavg would be ignored
        (("server.bias_correction=maybe",), "server.bias_correction"),
        (("server=fedadam", "server.initial_v=-1e-6"), "server.initial_v"),
        (("server=fedavgm", "server.initial_v=1e-6"), "server.initial_v"),  # no second moment to start
        (("+server.nesterov=true",), "server.nesterov"),
    ],
)
def test_bad_server_values_name_their_key(overrides: tuple[str, ...], key: str) -> None:
    cfg = compose_config("experiment=smoke", *overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key
    assert key in str(err.value)


def test_every_method_takes_the_default_server_update() -> None:
    from ubsmoe.names import METHODS

    for method in METHODS:
        validate(compose_config("experiment=smoke", f"method={method}"))


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_every_server_group_file_is_valid_for_ubsmoe_and_hetlora(name: str) -> None:
    validate(compose_config("experiment=smoke", f"server={name}"))
    validate(compose_config("experiment=smoke", f"server={name}", "method=hetlora"))


# ----------------------------------------------------------------------------- smoke path (slow)
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


TINY = (
    "experiment=smoke",
    "federation.num_clients=6",
    "federation.clients_per_round=2",
    "federation.local_steps=2",
    "data.max_train_examples=240",
    "data.max_eval_examples=32",
    "logger=none",
    "server=fedadam",
    "server.lr=0.05",
)


@pytest.mark.slow
def test_fedadam_resume_equals_straight_on_the_smoke_path(tmp_path: Path, glue_dir: Path, cache_dir: Path) -> None:
    from ubsmoe.runner import run_experiment

    def run(out: str, *overrides: str) -> None:
        run_experiment(
            compose_config(
                *TINY, f"paths.output_dir={tmp_path / out}", f"data.local_dir={glue_dir}",
                f"paths.cache_dir={cache_dir}", *overrides,
            )  # fmt: skip
        )

    run("straight", "federation.rounds=2")
    run("part", "federation.rounds=1")
    from ubsmoe.fl.checkpoint import CHECKPOINT_FILE, load_checkpoint

    saved = load_checkpoint(tmp_path / "part" / CHECKPOINT_FILE)  # verified, weights_only
    moments = saved["server_optimizer"]["optimizer"]["state"]
    assert moments and all(float(s["exp_avg_sq"].abs().sum()) > 0 for s in moments.values())
    run("resumed", "federation.rounds=2", f"resume={tmp_path / 'part'}")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_time"} for r in rs]  # noqa: E731
    straight = strip(read_jsonl(tmp_path / "straight" / "metrics.jsonl"))
    resumed = strip(read_jsonl(tmp_path / "resumed" / "metrics.jsonl"))
    a, b = ([r for r in rs if r["round"] == 2] for rs in (straight, resumed))
    assert len(a) == len(b) == 4  # one row per tier
    for ra, rb in zip(a, b, strict=True):  # as tests/test_train_e2e.py compares resume and straight
        assert rb.keys() == ra.keys()
        for key in ra:
            if isinstance(ra[key], float) or (key == "metrics" and ra[key]):
                assert rb[key] == pytest.approx(ra[key], abs=1e-6), key
            else:
                assert rb[key] == ra[key], key
    # the server optimizer is part of what a resumed run must keep
    with pytest.raises(ConfigError) as err:
        run("other", "federation.rounds=2", "server.lr=0.1", f"resume={tmp_path / 'part'}")
    assert err.value.key == "server.lr"
