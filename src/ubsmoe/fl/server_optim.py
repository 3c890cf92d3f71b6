"""Server optimizers: the aggregate's change as a pseudo-gradient (Reddi et al., ICLR 2021).

Paper: "Adaptive Federated Optimization". After a strategy has aggregated the round's
updates, ``Delta = aggregate - x`` (x the global state the clients received) is the
negative of a gradient, and the new global state is one step of a server optimizer:

- ``fedavg``: ``x + lr * Delta``; with ``lr`` 1 this is plain replacement and no
  optimizer runs at all (so the default is today's FedAvg bit for bit);
- ``fedavgm`` (Hsu et al., 2019): ``torch.optim.SGD`` with ``momentum``;
- ``fedadam``: ``torch.optim.Adam`` with ``betas`` and ``eps = tau``;
- ``fedyogi``: :class:`Yogi` (written here: torch has no Yogi second moment);
- ``fedadagrad``: ``torch.optim.Adagrad`` with ``eps = tau``.

Choices, each a named switch or listed in docs/paper.md (rows 40-43):

- ``server.bias_correction`` (default false): the paper's Algorithm 2 has no bias
  correction, ``x + lr * m / (sqrt(v) + tau)``. torch's Adam always corrects (and adds
  eps after correcting v); with ``false`` :class:`PaperAdam` rescales torch's lr and eps
  every step so that torch computes exactly the paper's update; with ``true`` fedadam is
  torch.optim.Adam as is, and fedyogi corrects the same way.
- ``server.initial_v`` (default 0): the second moment's start v_{-1}. Zero is torch's and
  Flower's choice; the paper's analysis takes ``v_{-1} >= tau^2`` (set ``initial_v`` to
  ``tau**2`` for that). The first moment starts at zero.
- fedadagrad has no first moment (torch's Adagrad; Flower's default beta_1 = 0); the
  paper's Algorithm 2 allows one. ``server.betas`` is not used by it.
- the step runs in float64 on a copy of the global tensors and is cast back, on the device
  of the server state (``server.device``); so do the moments.

What the server optimizer never touches: DMR's phi (the DMR callback sets it from the
averaged phi and the utilization), PG's default outputs (kept in
``ServerState.pg_defaults``, outside ``global_state``) and the tensors a strategy sets by a
rule of its own (:meth:`~ubsmoe.fl.strategies.base.Strategy.server_optimizer_skips`): FLAME's
tier scales, whose entry t must change only through tier t's clients, while the optimizer's
moments would move the entry of a tier absent from the round. Methods whose global state is not an
average of the clients' (FLoRA merges into the frozen weights and restarts the pair,
FlexLoRA re-factorises the aggregated product) declare
``supports_server_optimizer = False`` and get a ConfigError for anything but plain FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from ubsmoe.errors import ConfigError
from ubsmoe.settings import ServerSettings

if TYPE_CHECKING:
    from ubsmoe.fl.server import ServerState
    from ubsmoe.fl.strategies.base import Strategy

Tensors = dict[str, torch.Tensor]


class Yogi(torch.optim.Optimizer):
    """Adam with Yogi's additive second moment (Zaheer et al., 2018; FedYogi in Reddi et al.).

    Per parameter, with g the gradient:

        m = b1 * m + (1 - b1) * g
        v = v - (1 - b2) * g^2 * sign(v - g^2)
        x = x - lr * m / (sqrt(v) + eps)

    ``bias_correction``: as torch's Adam, x = x - lr / c1 * m / (sqrt(v / c2) + eps) with
    c_i = 1 - b_i^t (off in Reddi et al.'s Algorithm 2). m starts at zero, v at ``initial_v``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
        bias_correction: bool = False,
        initial_v: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or initial_v < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid Yogi settings lr={lr}, betas={betas}, eps={eps}, initial_v={initial_v}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "bias_correction": bias_correction}
        super().__init__(params, {**defaults, "initial_v": initial_v})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.full_like(p, group["initial_v"])
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                g2 = g * g
                v.sub_((1.0 - b2) * g2 * torch.sign(v - g2))
                if group["bias_correction"]:
                    c1, c2 = 1.0 - b1 ** state["step"], 1.0 - b2 ** state["step"]
                    p.addcdiv_(m, (v / c2).sqrt_().add_(group["eps"]), value=-group["lr"] / c1)
                else:
                    p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-group["lr"])
        return loss


class PaperAdam(torch.optim.Adam):
    """torch's Adam computing Reddi et al.'s uncorrected update x - lr * m / (sqrt(v) + eps).

    torch always applies x - lr / c1 * m / (sqrt(v) / sqrt(c2) + eps) (c_i = 1 - b_i^t);
    with lr_t = lr * c1 / sqrt(c2) and eps_t = eps / sqrt(c2) that is exactly
    x - lr * m / (sqrt(v) + eps). The moments and the state format stay torch's own.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float], eps: float) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps)
        for group in self.param_groups:
            group["paper_lr"], group["paper_eps"] = float(lr), float(eps)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            done = [float(self.state[p]["step"]) for p in group["params"] if "step" in self.state.get(p, {})]
            t = (done[0] if done else 0.0) + 1.0  # the step about to be taken
            c1, c2 = 1.0 - b1**t, 1.0 - b2**t
            group["lr"] = group["paper_lr"] * c1 / math.sqrt(c2)
            group["eps"] = group["paper_eps"] / math.sqrt(c2)
        return super().step(closure)


def start_second_moment(optimizer: torch.optim.Adam, initial_v: float) -> torch.optim.Adam:
    """Give torch's Adam the state it would create itself, except v = ``initial_v`` (its start v_{-1}).

    Adam initialises a parameter's state only when it finds none, so a state written
    before the first step (the same keys and types: step, exp_avg, exp_avg_sq) is used as is.
    """
    if initial_v == 0.0:
        return optimizer
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {
                "step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.full_like(p, initial_v, memory_format=torch.preserve_format),
            }
    return optimizer


def _adam(params: list[torch.Tensor], s: ServerSettings) -> torch.optim.Optimizer:
    betas = (float(s.betas[0]), float(s.betas[1]))
    if s.bias_correction:
        return start_second_moment(torch.optim.Adam(params, lr=s.lr, betas=betas, eps=s.tau), s.initial_v)
    return start_second_moment(PaperAdam(params, lr=s.lr, betas=betas, eps=s.tau), s.initial_v)


OptimizerFactory = Callable[[list[torch.Tensor], ServerSettings], torch.optim.Optimizer]

SERVER_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "fedavg": lambda params, s: torch.optim.SGD(params, lr=s.lr),
    "fedavgm": lambda params, s: torch.optim.SGD(params, lr=s.lr, momentum=s.momentum),
    "fedadam": _adam,
    "fedyogi": lambda params, s: Yogi(
        params,
        lr=s.lr,
        betas=(float(s.betas[0]), float(s.betas[1])),
        eps=s.tau,
        bias_correction=s.bias_correction,
        initial_v=s.initial_v,
    ),
    "fedadagrad": lambda params, s: torch.optim.Adagrad(
        params, lr=s.lr, eps=s.tau, initial_accumulator_value=s.initial_v
    ),
}


def check_server_optimizer(settings: ServerSettings, strategy: Strategy, method_name: str | None = None) -> None:
    """Refuse anything but plain FedAvg for a strategy whose global state is not an average."""
    if settings.is_default or strategy.supports_server_optimizer:
        return
    method = method_name or strategy.name
    why = (
        f"only server.optimizer=fedavg with server.lr=1 for method {method} (its global state is not an "
        "average of the clients' states, so its change is no pseudo-gradient)"
    )
    if settings.optimizer != "fedavg":
        raise ConfigError("server.optimizer", settings.optimizer, why)
    raise ConfigError("server.lr", settings.lr, why)


class ServerOptimizer:
    """Turns the strategy's aggregate into the new global state (checkpointed with the run).

    ``frozen_names``: global tensors the optimizer leaves as the strategy (and the
    callbacks after it) set them, e.g. DMR's phi; ``skips``: a rule naming more of them
    (the strategy's :meth:`~ubsmoe.fl.strategies.base.Strategy.server_optimizer_skips`).
    """

    def __init__(
        self,
        settings: ServerSettings | None = None,
        *,
        frozen_names: Iterable[str] = (),
        skips: Callable[[str], bool] | None = None,
    ) -> None:
        self.settings = settings or ServerSettings()
        if self.settings.optimizer not in SERVER_OPTIMIZERS:
            raise ConfigError("server.optimizer", self.settings.optimizer, f"one of {', '.join(SERVER_OPTIMIZERS)}")
        self.frozen = frozenset(frozen_names)
        self.skips = skips
        self.names: list[str] = []
        self.params: Tensors = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        """False for plain FedAvg (lr 1): the aggregate replaces the global state untouched."""
        return not self.settings.is_default

    def step(self, before: Tensors, server: ServerState) -> None:
        """``server.global_state`` (the strategy's aggregate) <- one optimizer step from ``before``."""
        if not self.active:
            return
        aggregate = dict(server.global_state)
        self._build(before, [n for n in sorted(aggregate) if not self.leaves(n)])
        assert self.optimizer is not None
        for name in self.names:
            x = self.params[name]
            x.copy_(before[name].to(torch.float64))
            x.grad = before[name].to(torch.float64) - aggregate[name].to(torch.float64)  # -Delta
        self.optimizer.step()
        for name in self.names:
            x = self.params[name]
            aggregate[name] = x.detach().to(aggregate[name].dtype).clone()
            x.grad = None
        server.global_state = aggregate

    def leaves(self, name: str) -> bool:
        """True for a global tensor the optimizer leaves as the strategy and the callbacks set it."""
        return name in self.frozen or (self.skips is not None and self.skips(name))

    def _build(self, like: Tensors, names: list[str]) -> None:
        if self.optimizer is not None:
            if names != self.names:
                raise ValueError(f"the global tensors changed between rounds: {names[:3]}... vs {self.names[:3]}...")
            return
        self.names = names
        self.params = {n: torch.zeros_like(like[n], dtype=torch.float64) for n in names}
        self.optimizer = SERVER_OPTIMIZERS[self.settings.optimizer]([self.params[n] for n in names], self.settings)
        if self._pending is not None:
            if self._pending["names"] != names:
                raise ValueError("the checkpointed server optimizer was built over other tensors")
            self.optimizer.load_state_dict(self._pending["optimizer"])
            self._pending = None

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return self._pending or {}
        return {"names": list(self.names), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the moments; the optimizer is rebuilt at the next step over the same tensors."""
        self.optimizer, self.params, self.names = None, {}, []
        self._pending = dict(state) if state else None


def build_server_optimizer(
    settings: ServerSettings, strategy: Strategy, *, frozen_names: Iterable[str] = (), method_name: str | None = None
) -> ServerOptimizer:
    """The server optimizer of a run, refused (ConfigError) for a strategy that cannot take it."""
    check_server_optimizer(settings, strategy, method_name)
    return ServerOptimizer(settings, frozen_names=frozen_names, skips=strategy.server_optimizer_skips)
