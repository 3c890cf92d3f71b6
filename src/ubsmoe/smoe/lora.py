"""LoRA for the sparse layer (one adapter per expert) and, through peft, for dense modules.

Per-expert LoRA tensors carry the expert index as their leading dimension
(``A1 [M, r, h]``, ``B1 [M, d_e, r]``, ``A2 [M, r, d_e]``, ``B2 [M, h, r]``), so a server can
aggregate them expert by expert along dim 0 without knowing anything about the layer.
Attention projections (and, for dense baselines, the FFN matrices) get ordinary LoRA
modules from peft; :class:`RankLimiter` turns any of these rank-``r`` adapters into an exact
rank-``r_c`` adapter for heterogeneous-rank clients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def lora_a_bound(fan_in: int) -> float:
    """Half-width of the uniform init of a LoRA ``A`` (kaiming-uniform with a = sqrt(5), as peft)."""
    return 1.0 / math.sqrt(fan_in)


class ExpertLoRA(nn.Module):
    """Stacked LoRA adapters of the two matrices of ``M`` experts, one rank for all.

    ``lora_A1 [M, r, h]``, ``lora_B1 [M, first_out, r]`` adapt each expert's first matrix
    (``first_out`` = the expert width d, or 2d for a gated decoder expert's fused gate_up);
    ``lora_A2 [M, r, d]``, ``lora_B2 [M, h, r]`` its second. ``B`` starts at zero so the
    adapted layer starts equal to the frozen one; ``A`` is drawn from ``generator`` with
    peft's bound, so the initialisation depends on the run's init seed only.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        expert_size: int,
        rank: int,
        alpha: float,
        generator: torch.Generator | None = None,
        *,
        first_out: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.scaling = alpha / rank
        m, h, d = num_experts, hidden_size, expert_size
        self.lora_A1 = nn.Parameter(torch.empty(m, rank, h, dtype=dtype))
        self.lora_B1 = nn.Parameter(torch.zeros(m, d if first_out is None else first_out, rank, dtype=dtype))
        self.lora_A2 = nn.Parameter(torch.empty(m, rank, d, dtype=dtype))
        self.lora_B2 = nn.Parameter(torch.zeros(m, h, rank, dtype=dtype))
        self.reset_parameters(generator)
        if device is not None:
            self.to(device)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for a in (self.lora_A1, self.lora_A2):
            bound = lora_a_bound(a.shape[-1])
            a.copy_(torch.rand(a.shape, generator=generator) * (2 * bound) - bound)
        self.lora_B1.zero_()
        self.lora_B2.zero_()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.lora_A1, self.lora_B1, self.lora_A2, self.lora_B2

    def rank_dims(self) -> list[tuple[nn.Parameter, int]]:
        """Each tensor with the dimension that indexes the rank (for :class:`RankLimiter`)."""
        return [(self.lora_A1, 1), (self.lora_B1, 2), (self.lora_A2, 1), (self.lora_B2, 2)]


class RankLimiter:
    """Restricts rank-``r`` LoRA tensors to their first ``r_c`` components, exactly.

    The components beyond ``r_c`` are zeroed and their gradients masked, so the module
    trains precisely a rank-``r_c`` adapter while keeping the rank-``r`` shapes the server
    aggregates (HetLoRA-style truncation and zero-padding live on the server side).
    """

    def __init__(self, tensors: Iterable[tuple[nn.Parameter, int]], full_rank: int) -> None:
        self.full_rank = full_rank
        self.rank = full_rank
        self._tensors = list(tensors)
        self._masks: dict[int, torch.Tensor] = {}
        for param, dim in self._tensors:
            if param.shape[dim] != full_rank:
                raise ValueError(f"tensor of shape {tuple(param.shape)} has no rank {full_rank} at dim {dim}")
            param.register_hook(self._make_hook(param, dim))

    def _mask(self, param: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [1] * param.dim()
        shape[dim] = self.full_rank
        keep = torch.arange(self.full_rank, device=param.device) < self.rank
        return keep.view(shape).to(param.dtype)

    def _make_hook(self, param: nn.Parameter, dim: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self.rank >= self.full_rank:
                return grad
            return grad * self._mask(grad, dim)

        return hook

    def set_rank(self, rank: int) -> None:
        if not 1 <= rank <= self.full_rank:
            raise ValueError(f"rank={rank} must lie in [1, {self.full_rank}]")
        self.rank = rank
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the components beyond the active rank (after a state was loaded, say)."""
        if self.rank >= self.full_rank:
            return
        for param, dim in self._tensors:
            param.narrow(dim, self.rank, self.full_rank - self.rank).zero_()


def attention_target_names(module: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the attention Linear modules whose names end with one of ``targets``."""
    names = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and ".attention." in f".{name}." and any(
            name == t or name.endswith("." + t) for t in targets
        ):
            names.append(name)
    return names


def ffn_target_names(module: nn.Module) -> list[str]:
    """Full names of the two FFN Linear modules of each layer (``intermediate.dense``, ``output.dense``)."""
    names = []
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear) or ".attention." in f".{name}.":
            continue
        if name.endswith("intermediate.dense") or name.endswith("output.dense"):
            names.append(name)
    return names


def inject_peft_lora(
    module: nn.Module,
    target_names: list[str],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    generator: torch.Generator | None = None,
) -> list[tuple[nn.Parameter, int]]:
    """Put peft LoRA adapters on the Linear modules named exactly ``target_names``.

    Returns every adapter tensor with its rank dimension. ``A`` is re-drawn from
    ``generator`` with peft's own distribution, so the init depends on the run's seed and
    not on the global RNG. Freezing is left to the caller (peft's injection only adds modules).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not target_names:
        return []
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_names), bias="none")
    inject_adapter_in_model(config, module)
    found: list[tuple[nn.Parameter, int]] = []
    with torch.no_grad():
        for sub in module.modules():
            lora_a = getattr(sub, "lora_A", None)
            if not isinstance(lora_a, nn.ModuleDict) or "default" not in lora_a:
                continue
            a = lora_a["default"].weight  # [r, in]
            b = sub.lora_B["default"].weight  # [out, r]
            bound = lora_a_bound(a.shape[1])
            a.copy_(torch.rand(a.shape, generator=generator) * (2 * bound) - bound)
            b.zero_()
            found.extend([(a, 0), (b, 1)])
    return found


def peft_lora_layers(module: nn.Module) -> list[nn.Module]:
    """Every peft LoRA layer (one with a ``default`` adapter) inside ``module``."""
    return [
        sub
        for sub in module.modules()
        if isinstance(getattr(sub, "lora_A", None), nn.ModuleDict) and "default" in sub.lora_A
    ]


CONSTANT_LORA_SCALING = 2.0  # lora_scaling=constant: FLoRA's and FLoRIST's reference code build lora_alpha = 2 * r_c


def client_lora_scaling(mode: str, alpha: float, full_rank: int, rank: int) -> float:
    """The LoRA scaling s_c a rank-``rank`` client applies under ``method.lora_scaling=mode``.

    ``per_rank``: alpha / r_c (a stand-alone rank-r_c LoRA with the project's alpha, as
    FederatedScope's FlexLoRA); ``max_rank``: alpha / r for every rank; ``constant``: 2 for
    every rank, whatever alpha, as FLoRA's and FLoRIST's reference code (each client's peft
    LoRA is built with ``lora_alpha = 2 * r_c``). The model and the rank strategies both
    read it here, so the two always agree.
    """
    if not 1 <= rank <= full_rank:
        raise ValueError(f"client rank {rank} must lie in [1, {full_rank}]")
    if mode == "per_rank":
        return alpha / rank
    if mode == "max_rank":
        return alpha / full_rank
    if mode == "constant":
        return CONSTANT_LORA_SCALING
    raise ValueError(f"lora_scaling={mode!r} must be 'per_rank', 'max_rank' or 'constant'")


def set_peft_scaling(layers: Iterable[nn.Module], scaling: float) -> None:
    """Set the LoRA scaling (peft's ``alpha / r``) of the ``default`` adapter of each layer.

    A rank-``r_c`` client trained inside the rank-``r`` module gets :func:`client_lora_scaling`
    here: with the components beyond ``r_c`` zeroed, the module then computes exactly what a
    stand-alone rank-``r_c`` peft LoRA of that scaling does.
    """
    for layer in layers:
        layer.scaling["default"] = float(scaling)
