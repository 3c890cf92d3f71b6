"""FLoRA (Wang et al., 2024): exact aggregation of heterogeneous-rank LoRA by stacking.

Paper: "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations".

Stacking makes LoRA aggregation exact: with A_c [r_c, in] scaled by w_c = n_c / sum n and
stacked along the rank dimension, and the B_c [out, r_c] stacked along their columns,

    [B_1 ... B_C] @ [w_1 A_1; ...; w_C A_C] = sum_c w_c B_c A_c,

whatever the ranks (:func:`stack`). In the paper the server sends the stacked modules to
the clients, which add their product to the frozen base weights and start the next round
from freshly initialised local LoRA modules. The global model here keeps rank ``r``, so
the same is done with two pieces of state:

- ``merged[prefix]``: the cumulative dense update of each adapted layer, sum over rounds of
  s * B_stack A_stack (s = alpha / r, the LoRA scaling the clients applied). Every payload
  carries it as ``<prefix>.base_delta`` [out, in]: the model must set its frozen weight to
  W0 + base_delta (absolute, not added on top of a previous delta).
- the global LoRA pair: re-initialised after every round, A from peft's default
  (kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) drawn from the
  strategy's own seeded generator, B zero. Clients get it truncated to their rank r_c.

Tensors outside the pairs (head, ...) are averaged with n_c, as in FedAvg.

Fresh adapters (``method.flora_init``): ``independent`` (the reference) gives each client
its own fresh A, drawn from (seed, round, client); ``shared`` gives every client the same
one, re-drawn by the server after each round (the project's first version).

Communication: every client must merge every round's stack to keep W0 + sum of updates
in sync, so the server broadcasts the round's stack, sum_c r_c * (in + out) numbers per
layer, to every client of the federation (:meth:`FLoRA.broadcast_bytes`; the loop charges
it to all clients, sampled or not), never the dense delta. A sampled client's own payload
(:meth:`FLoRA.payload_bytes`) is the tensors outside the pairs; its fresh LoRA pair is
drawn from a seed, so it costs no bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ubsmoe.fl.client import ClientPayload, ClientSpec, tensor_bytes
from ubsmoe.fl.server import ServerState
from ubsmoe.fl.strategies.base import StrategyContext
from ubsmoe.fl.strategies.lora_pairs import (
    LoraRankStrategy,
    find_lora_pairs,
    pair_rank,
    truncate_state,
)
from ubsmoe.seeding import derive_seed
from ubsmoe.settings import MethodSettings
from ubsmoe.smoe.lora import lora_a_bound

Tensors = dict[str, torch.Tensor]

BASE_DELTA_SUFFIX = "base_delta"


def base_delta_name(prefix: str) -> str:
    """Payload name of the merged dense update of the layer ``prefix``."""
    return f"{prefix}.{BASE_DELTA_SUFFIX}"


def stack(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor | Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_stacked [sum r_c, in], B_stacked [out, sum r_c]) with B_stacked @ A_stacked = sum_c w_c B_c A_c.

    ``pairs`` are the clients' (A_c [r_c, in], B_c [out, r_c]), ranks free to differ; the
    weights scale the A blocks. Kept in the dtype of the inputs.
    """
    if not pairs:
        raise ValueError("nothing to stack")
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (len(pairs),):
        raise ValueError(f"{len(pairs)} pairs but weights of shape {tuple(w.shape)}")
    for a, b in pairs:
        pair_rank(a, b)
    a_stacked = torch.cat([(float(wc) * a.to(torch.float64)).to(a.dtype) for (a, _), wc in zip(pairs, w, strict=True)])
    b_stacked = torch.cat([b for _, b in pairs], dim=1)
    return a_stacked, b_stacked


def fresh_lora_pair(
    a_like: torch.Tensor, b_like: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A new LoRA pair of the same shapes: A ~ U(-1/sqrt(in), 1/sqrt(in)) from ``generator``, B = 0.

    Drawn on the CPU generator (the same numbers whatever the server's device), then placed beside ``a_like``.
    """
    bound = lora_a_bound(a_like.shape[1])
    a = torch.rand(a_like.shape, generator=generator, dtype=torch.float64) * (2 * bound) - bound
    a = a.to(device=a_like.device, dtype=a_like.dtype)
    return a, torch.zeros_like(b_like)


class FLoRA(LoraRankStrategy):
    """Stack the clients' pairs, merge the exact product into the base weights, restart LoRA each round.

    ``scaling`` is the full-rank LoRA scaling alpha / r (it enters the dense delta, so it must
    match the model; each client's own scaling s_c is folded in, ``lora_scaling="constant"``
    being the reference's s_c = 2); ``seed``
    seeds the fresh adapters; ``init`` is ``independent`` (one per client) or ``shared``.
    """

    # The aggregate is merged into the frozen weights and the pair restarts from a fresh
    # init every round: there is no averaged state whose change a server optimizer could step.
    supports_server_optimizer = False

    @classmethod
    def from_settings(cls, method: MethodSettings, ctx: StrategyContext) -> FLoRA:
        return cls(scaling=ctx.lora_scaling, seed=ctx.seed, lora_scaling=method.lora_scaling, init=method.flora_init)

    def __init__(self, *, scaling: float, seed: int, lora_scaling: str = "max_rank", init: str = "shared") -> None:
        if not scaling > 0:
            raise ValueError(f"LoRA scaling must be positive, got {scaling}")
        if init not in ("independent", "shared"):
            raise ValueError(f"init={init!r} must be 'independent' or 'shared'")
        self.scaling = float(scaling)
        self.seed = int(seed)
        self.init = init
        self.set_lora_scaling(lora_scaling, scaling)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.merged: Tensors = {}  # prefix -> cumulative dense delta [out, in]
        self.stack_ranks: dict[str, int] = {}  # prefix -> rank of the newest broadcast update

    def base_deltas(self, server: ServerState) -> Tensors:
        """``<prefix>.base_delta`` for every adapted layer (zeros before the first merge)."""
        out = {}
        for prefix, (a_name, b_name) in find_lora_pairs(server.global_state).items():
            a, b = server.global_state[a_name], server.global_state[b_name]
            delta = self.merged.get(prefix)
            out[base_delta_name(prefix)] = (
                delta.to(a.dtype) if delta is not None else a.new_zeros((b.shape[0], a.shape[1]))
            )
        return out

    def configure_client(self, server: ServerState, spec: ClientSpec) -> ClientPayload:
        pairs = find_lora_pairs(server.global_state)
        state = dict(server.global_state)
        if self.init == "independent" and spec.client_id >= 0:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "fresh", server.round, spec.client_id))
            for a_name, b_name in pairs.values():  # sorted prefixes: a fixed draw order
                state[a_name], state[b_name] = fresh_lora_pair(state[a_name], state[b_name], generator)
        state = self.to_client_units(truncate_state(state, pairs, self.client_rank(spec)), pairs, spec)
        return ClientPayload(state=state, pg_defaults=server.pg_defaults, base_deltas=self.base_deltas(server))

    def payload_bytes(self, payload: ClientPayload, spec: ClientSpec) -> int:
        """The tensors outside the pairs (the fresh pair is drawn from a seed; the update is broadcast)."""
        del spec
        pairs = find_lora_pairs(payload.state)
        lora_names = {name for pair in pairs.values() for name in pair}
        others = {k: v for k, v in payload.state.items() if k not in lora_names}
        return tensor_bytes(others) + tensor_bytes(payload.pg_defaults)

    def broadcast_bytes(self, server: ServerState) -> int:
        """Bytes of the newest round's update, which every client of the federation receives."""
        total = 0
        for prefix, (a_name, b_name) in find_lora_pairs(server.global_state).items():
            a, b = server.global_state[a_name], server.global_state[b_name]
            total += self.stack_ranks.get(prefix, 0) * (a.shape[1] * a.element_size() + b.shape[0] * b.element_size())
        return total

    def round_update(
        self, client: list[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_g, B_g) broadcast this round, float64, with s * B_g A_g the dense update: FLoRA's exact stack."""
        return stack([(a.to(torch.float64), b.to(torch.float64)) for a, b in client], weights)

    def merge_pair(
        self,
        prefix: str,
        client: list[tuple[torch.Tensor, torch.Tensor]],
        weights: torch.Tensor,
        global_a: torch.Tensor,
        global_b: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the round's update s * B_g A_g to the merged delta; the global pair restarts fresh."""
        a_g, b_g = self.round_update(client, weights)
        delta = self.scaling * (b_g @ a_g)
        previous = self.merged.get(prefix)
        total = delta if previous is None else previous.to(torch.float64) + delta
        self.merged[prefix] = total.to(global_a.dtype)
        self.stack_ranks[prefix] = int(a_g.shape[0])
        return fresh_lora_pair(global_a, global_b, self.generator)

    def place(self, device: torch.device) -> None:
        """The merged deltas live on the server's device (a checkpoint is loaded on the CPU)."""
        self.merged = {k: v.to(device) for k, v in self.merged.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "merged": {k: v.clone() for k, v in self.merged.items()},
            "stack_ranks": dict(self.stack_ranks),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.merged = {k: v.clone() for k, v in state.get("merged", {}).items()}
        self.stack_ranks = {k: int(v) for k, v in state.get("stack_ranks", {}).items()}
        if "generator" in state:
            self.generator.set_state(state["generator"])
