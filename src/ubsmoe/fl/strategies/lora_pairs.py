"""Finding the LoRA (A, B) pairs of a trainable state and reshaping them to a client's rank.

The heterogeneous-rank baselines (HetLoRA, FlexLoRA, FLoRA) work on the product of each
adapted layer's pair, not on A and B separately, so they first need to know which two
tensors belong together. Names follow peft: ``<prefix>.lora_A.<adapter>.weight`` with
shape [r, in] and ``<prefix>.lora_B.<adapter>.weight`` with shape [out, r]; the bare
``<prefix>.lora_A.weight`` form is accepted too. The stacked per-expert tensors of the
sparse layer (``lora_A1`` ... with a leading expert dim) do not match and are left to
the sparse strategies.

Every client trains inside the rank-``r`` module with its components beyond ``r_c``
zeroed (see :class:`ubsmoe.smoe.lora.RankLimiter`), so "truncating to r_c" here means
keeping the shape and zeroing the tail, and "zero-padding" is what that already is.
:class:`LoraRankStrategy` is the part the rank baselines share: truncated payloads,
FedAvg of the tensors outside the pairs, and communication counted at rank r_c.

LoRA scaling (``method.lora_scaling``, :func:`ubsmoe.smoe.lora.client_lora_scaling`): a client's
adapter output is ``s_c B_c A_c`` with s_c = alpha / r (``max_rank``), alpha / r_c (``per_rank``,
FederatedScope's FlexLoRA: a stand-alone rank-r_c LoRA) or 2 (``constant``, FLoRA's and
FLoRIST's reference code: ``lora_alpha = 2 * r_c``). The strategies keep the global pairs in
units of s = alpha / r in every case: a received B_c is multiplied by ``s_c / s``
(:meth:`LoraRankStrategy.client_pairs`) and a sent one divided by it
(:meth:`LoraRankStrategy.configure_client`), so every aggregation rule below is written once.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Iterable, Mapping

import torch

from ubsmoe.fl.client import ClientPayload, ClientSpec, ClientUpdate, tensor_bytes
from ubsmoe.fl.server import ServerState
from ubsmoe.fl.strategies.base import Strategy, example_weights, weighted_mean
from ubsmoe.smoe.lora import client_lora_scaling

Tensors = dict[str, torch.Tensor]

# prefix, which factor, optional adapter name (peft's "default" or any other).
_LORA_NAME = re.compile(r"^(?P<prefix>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def find_lora_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``{prefix: (a_name, b_name)}`` for every peft-style LoRA pair among ``names``.

    Raises ``ValueError`` when an A has no B (or the reverse), or when one module carries
    two adapters: the baselines aggregate one adapter per layer, and silently picking one
    would hide a wiring mistake.
    """
    found: dict[str, dict[str, str]] = {}
    adapters: dict[str, set[str | None]] = {}
    for name in names:
        match = _LORA_NAME.match(name)
        if match is None:
            continue
        prefix = match["prefix"]
        slot = found.setdefault(prefix, {})
        if match["which"] in slot:
            which = match["which"]
            raise ValueError(f"layer {prefix!r} has two LoRA {which} tensors: {slot[which]!r}, {name!r}")
        slot[match["which"]] = name
        adapters.setdefault(prefix, set()).add(match["adapter"])
    pairs: dict[str, tuple[str, str]] = {}
    for prefix, slot in sorted(found.items()):
        if set(slot) != {"A", "B"}:
            raise ValueError(f"layer {prefix!r} has LoRA {sorted(slot)} but not both A and B: {sorted(slot.values())}")
        if len(adapters[prefix]) != 1:
            raise ValueError(f"layer {prefix!r} mixes LoRA adapter names {sorted(map(str, adapters[prefix]))}")
        pairs[prefix] = (slot["A"], slot["B"])
    return pairs


def pair_rank(a: torch.Tensor, b: torch.Tensor) -> int:
    """The rank dimension shared by A [r, in] and B [out, r] (checked)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"not a LoRA pair: A {tuple(a.shape)} should be [r, in] and B {tuple(b.shape)} [out, r]")
    return int(a.shape[0])


def resolve_rank(rank: int | None, full_rank: int) -> int:
    """r_c for a client (``None`` means the full rank), checked against the module's rank."""
    if rank is None:
        return full_rank
    if not 1 <= rank <= full_rank:
        raise ValueError(f"client rank {rank} must lie in [1, {full_rank}]")
    return int(rank)


def truncate_pair(a: torch.Tensor, b: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """New tensors of the same shapes: the leading ``rank`` components (rows of A, columns of B), zeros after."""
    full = pair_rank(a, b)
    r = resolve_rank(rank, full)
    a_out, b_out = a.clone(), b.clone()
    a_out[r:] = 0
    b_out[:, r:] = 0
    return a_out, b_out


def leading_pair(a: torch.Tensor, b: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading ``rank`` components as the rank-``r_c`` matrices A [r_c, in], B [out, r_c] (views)."""
    r = resolve_rank(rank, pair_rank(a, b))
    return a[:r], b[:, :r]


def pad_pair(a: torch.Tensor, b: torch.Tensor, full_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad a rank-``r_c`` pair to ``full_rank`` components."""
    r = pair_rank(a, b)
    if r > full_rank:
        raise ValueError(f"cannot pad rank {r} down to {full_rank}")
    a_out = a.new_zeros((full_rank, a.shape[1]))
    b_out = b.new_zeros((b.shape[0], full_rank))
    a_out[:r] = a
    b_out[:, :r] = b
    return a_out, b_out


def pair_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B @ A in float64 (the weight update of the pair, before the LoRA scaling)."""
    pair_rank(a, b)
    return b.to(torch.float64) @ a.to(torch.float64)


def truncate_state(
    state: Mapping[str, torch.Tensor], pairs: Mapping[str, tuple[str, str]], rank: int | None
) -> Tensors:
    """A copy of ``state`` whose LoRA pairs keep only their leading ``rank`` components.

    Tensors that are not LoRA factors are shared, not copied (nobody mutates them in place).
    """
    out = dict(state)
    if rank is None:
        return out
    for a_name, b_name in pairs.values():
        out[a_name], out[b_name] = truncate_pair(state[a_name], state[b_name], rank)
    return out


def rank_limited_bytes(
    tensors: Mapping[str, torch.Tensor], pairs: Mapping[str, tuple[str, str]], rank: int | None
) -> int:
    """Bytes of ``tensors`` when each LoRA pair carries only its ``rank`` leading components.

    A rank-``r_c`` client really exchanges r_c * (in + out) numbers per adapted layer; the
    zeros beyond r_c exist only because the simulation keeps one rank-``r`` module.
    """
    lora_names = {name for pair in pairs.values() for name in pair}
    total = sum(t.numel() * t.element_size() for name, t in tensors.items() if name not in lora_names)
    for a_name, b_name in pairs.values():
        if a_name not in tensors:
            continue
        a, b = tensors[a_name], tensors[b_name]
        r = resolve_rank(rank, pair_rank(a, b))
        total += r * a.shape[1] * a.element_size() + r * b.shape[0] * b.element_size()
    return total


class LoraRankStrategy(Strategy):
    """What the three heterogeneous-rank baselines share.

    A client gets the global state with its LoRA pairs truncated to its rank r_c; the
    tensors outside the pairs (classification head, ...) are averaged with w_c = n_c / sum n;
    communication counts only the r_c components a client really exchanges. Subclasses
    decide how the pairs themselves are merged.
    """

    lora_scaling_mode: str = "max_rank"  # method.lora_scaling
    full_scaling: float = 1.0  # s = alpha / r, the full-rank adapters' scaling (the global pairs' units)

    def set_lora_scaling(self, mode: str, full_scaling: float | None = None) -> None:
        """How the clients' modules scale their adapters (``per_rank``, ``max_rank`` or ``constant``).

        ``full_scaling`` is s = alpha / r; the ratio s_c / s needs it only for ``constant``.
        """
        client_lora_scaling(mode, 1.0, 1, 1)  # validates the mode
        if mode == "constant" and full_scaling is None:
            raise ValueError("lora_scaling='constant' needs the full-rank scaling alpha / r")
        if full_scaling is not None:
            if not full_scaling > 0:
                raise ValueError(f"LoRA scaling must be positive, got {full_scaling}")
            self.full_scaling = float(full_scaling)
        self.lora_scaling_mode = mode

    def scale_ratio(self, rank: int | None, full_rank: int) -> float:
        """s_c / s: the client's LoRA scaling over the full-rank one (r / r_c per rank, 2 / s constant, else 1)."""
        s = self.full_scaling
        return client_lora_scaling(self.lora_scaling_mode, s * full_rank, full_rank, resolve_rank(rank, full_rank)) / s

    def client_rank(self, spec: ClientSpec) -> int | None:
        """The rank this client trains this round (``None``: full rank)."""
        return spec.rank

    def aggregate(self, server: ServerState, updates: list[ClientUpdate]) -> None:
        """FedAvg the tensors outside the pairs; merge each layer's pairs with :meth:`merge_pair`."""
        if not updates:
            raise ValueError(f"{self.name} needs at least one client update to aggregate")
        pairs = find_lora_pairs(server.global_state)
        ranks = [self.client_rank(u.spec) for u in updates]
        weights = example_weights(updates)
        new_state = self.average_other_tensors(server, updates, pairs)
        for prefix, (a_name, b_name) in pairs.items():  # sorted prefixes: a fixed order (FLoRA draws inits)
            global_a, global_b = server.global_state[a_name], server.global_state[b_name]
            client = self.client_pairs(updates, prefix, (a_name, b_name), ranks)
            a, b = self.merge_pair(prefix, client, weights, global_a, global_b)
            new_state[a_name], new_state[b_name] = a.to(global_a.dtype), b.to(global_b.dtype)
        self.after_merge(server, updates, pairs, ranks)
        server.global_state = {name: new_state[name] for name in server.global_state}

    @abstractmethod
    def merge_pair(
        self,
        prefix: str,
        client: list[tuple[torch.Tensor, torch.Tensor]],
        weights: torch.Tensor,
        global_a: torch.Tensor,
        global_b: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The new global (A, B) of one layer from the clients' rank-cut pairs and weights n_c / sum n."""

    def after_merge(
        self,
        server: ServerState,
        updates: list[ClientUpdate],
        pairs: Mapping[str, tuple[str, str]],
        ranks: list[int | None],
    ) -> None:
        """Hook run after the merge, while ``server`` still holds the state the clients received."""

    def configure_client(self, server: ServerState, spec: ClientSpec) -> ClientPayload:
        pairs = find_lora_pairs(server.global_state)
        state = self.to_client_units(truncate_state(server.global_state, pairs, self.client_rank(spec)), pairs, spec)
        return ClientPayload(state=state, pg_defaults=server.pg_defaults)

    def to_client_units(self, state: Tensors, pairs: Mapping[str, tuple[str, str]], spec: ClientSpec) -> Tensors:
        """Divide each B by s_c / s, so the client's scaling s_c reproduces the global update."""
        if self.lora_scaling_mode == "max_rank":
            return state
        out = dict(state)
        for a_name, b_name in pairs.values():
            ratio = self.scale_ratio(self.client_rank(spec), pair_rank(state[a_name], state[b_name]))
            out[b_name] = state[b_name] / ratio
        return out

    def payload_bytes(self, payload: ClientPayload, spec: ClientSpec) -> int:
        """Bytes the server really sends: r_c components per LoRA pair, everything else in full."""
        pairs = find_lora_pairs(payload.state)
        return rank_limited_bytes(payload.state, pairs, self.client_rank(spec)) + tensor_bytes(payload.pg_defaults)

    def update_bytes(self, update: ClientUpdate) -> int:
        """Bytes the client really sends back (same counting as :meth:`payload_bytes`)."""
        pairs = find_lora_pairs(update.state)
        return rank_limited_bytes(update.state, pairs, self.client_rank(update.spec)) + tensor_bytes(update.pg_defaults)

    @staticmethod
    def average_other_tensors(
        server: ServerState, updates: list[ClientUpdate], pairs: Mapping[str, tuple[str, str]]
    ) -> Tensors:
        """FedAvg (weights n_c) of every global tensor that is not a LoRA factor."""
        lora_names = {name for pair in pairs.values() for name in pair}
        weights = example_weights(updates)
        return {
            name: weighted_mean([u.state[name] for u in updates], weights)
            for name in server.global_state
            if name not in lora_names
        }

    def client_pairs(
        self, updates: list[ClientUpdate], prefix: str, names: tuple[str, str], ranks: list[int | None]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each client's (A_c [r_c, in], B_c [out, r_c]) for one layer, cut to the rank it trained.

        Cutting (rather than trusting the zeros) keeps anything a client left beyond r_c
        out of the aggregate. B_c comes back in units of the full-rank scaling (times s_c / s).
        """
        a_name, b_name = names
        out = []
        for update, rank in zip(updates, ranks, strict=True):
            if a_name not in update.state or b_name not in update.state:
                raise KeyError(f"client {update.spec.client_id} sent no LoRA pair for layer {prefix!r}")
            a, b = leading_pair(update.state[a_name], update.state[b_name], rank)
            ratio = self.scale_ratio(rank, pair_rank(update.state[a_name], update.state[b_name]))
            out.append((a, b if ratio == 1.0 else b * ratio))
        return out
