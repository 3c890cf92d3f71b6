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

Communication (:meth:`FLoRA.payload_bytes`): in the paper the server broadcasts the
round's stacked modules, sum_c r_c * (in + out) numbers per layer, not the dense delta;
the count here charges a client the newest stack (a client that merged every broadcast
needs only that) plus its rank-r_c pair and the other tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ubsmoe.fl.client import ClientPayload, ClientSpec, tensor_bytes
from ubsmoe.fl.server import ServerState
from ubsmoe.fl.strategies.lora_pairs import (
    LoraRankStrategy,
    find_lora_pairs,
    pair_rank,
    rank_limited_bytes,
    truncate_state,
)
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
    """A new LoRA pair of the same shapes: A ~ U(-1/sqrt(in), 1/sqrt(in)) from ``generator``, B = 0."""
    bound = lora_a_bound(a_like.shape[1])
    a = (torch.rand(a_like.shape, generator=generator, dtype=torch.float64) * (2 * bound) - bound).to(a_like.dtype)
    return a, torch.zeros_like(b_like)


class FLoRA(LoraRankStrategy):
    """Stack the clients' pairs, merge the exact product into the base weights, restart LoRA each round.

    ``scaling`` is the LoRA scaling alpha / r the clients' modules apply (it enters the
    dense delta, so it must match the model); ``seed`` seeds the re-initialisation of A.
    """

    name = "flora"
    # The aggregate is merged into the frozen weights and the pair restarts from a fresh
    # init every round: there is no averaged state whose change a server optimizer could step.
    supports_server_optimizer = False

    def __init__(self, *, scaling: float, seed: int) -> None:
        if not scaling > 0:
            raise ValueError(f"LoRA scaling must be positive, got {scaling}")
        self.scaling = float(scaling)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.merged: Tensors = {}  # prefix -> cumulative dense delta [out, in]
        self.stack_ranks: dict[str, int] = {}  # prefix -> rank of the newest broadcast stack

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
        state = truncate_state(server.global_state, pairs, self.client_rank(spec))
        return ClientPayload(state=state, pg_defaults=server.pg_defaults, base_deltas=self.base_deltas(server))

    def payload_bytes(self, payload: ClientPayload, spec: ClientSpec) -> int:
        """Rank-r_c pair, other tensors, and the newest stack in place of the dense base deltas."""
        pairs = find_lora_pairs(payload.state)
        total = rank_limited_bytes(payload.state, pairs, self.client_rank(spec)) + tensor_bytes(payload.pg_defaults)
        for prefix, (a_name, b_name) in pairs.items():
            a, b = payload.state[a_name], payload.state[b_name]
            total += self.stack_ranks.get(prefix, 0) * (a.shape[1] * a.element_size() + b.shape[0] * b.element_size())
        return total

    def merge_pair(
        self,
        prefix: str,
        client: list[tuple[torch.Tensor, torch.Tensor]],
        weights: torch.Tensor,
        global_a: torch.Tensor,
        global_b: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the exact stacked product to the merged delta; the global pair restarts fresh."""
        a_stacked, b_stacked = stack(
            [(a.to(torch.float64), b.to(torch.float64)) for a, b in client], weights * self.scaling
        )
        delta = b_stacked @ a_stacked
        previous = self.merged.get(prefix)
        total = delta if previous is None else previous.to(torch.float64) + delta
        self.merged[prefix] = total.to(global_a.dtype)
        self.stack_ranks[prefix] = int(a_stacked.shape[0])
        return fresh_lora_pair(global_a, global_b, self.generator)

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
