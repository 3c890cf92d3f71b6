"""Conversion of a transformers 5 sparse decoder into UB-SMoE sparse blocks, by reference.

The adapter that uses it is :mod:`ubsmoe.backbones.native_adapter`.

:func:`convert` replaces every sparse ``layer.mlp`` of an OLMoE, Qwen2-MoE, Qwen3-MoE or
Mixtral model by a :class:`~ubsmoe.smoe.native_layer.NativeSparseMoE` that holds the
backbone's own router and expert modules (the same Parameters: the converted model's memory
is the original's plus the adapters). Dense MLP layers (Qwen's ``mlp_only_layers``,
``decoder_sparse_step``) are left as they are.

What differs between the families is only how the router's probabilities become gates and
whether a shared expert runs; each family is one entry of :data:`FAMILY_RULES`, a function
of the model's config, so adding a family is adding a row (and a tiny config in ``tiny.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ubsmoe.errors import ConfigError
from ubsmoe.names import EXPERT_KERNELS, GATE_NORMS
from ubsmoe.settings import Tier
from ubsmoe.smoe.flops import DecoderDims
from ubsmoe.smoe.layer import Activation, MoEOptions
from ubsmoe.smoe.native_layer import NativeRouting, NativeSparseMoE


def _top_k_rule(config) -> NativeRouting:
    """OLMoE, Qwen2-MoE, Qwen3-MoE: renormalise the top-k weights exactly when ``norm_topk_prob``."""
    return NativeRouting(top_k=int(config.num_experts_per_tok), renormalize=bool(config.norm_topk_prob))


def _mixtral_rule(config) -> NativeRouting:
    """Mixtral always renormalises, and may jitter its input in training (``router_jitter_noise``)."""
    return NativeRouting(
        top_k=int(config.num_experts_per_tok),
        renormalize=True,
        jitter=float(getattr(config, "router_jitter_noise", 0.0) or 0.0),
    )


FAMILY_RULES: dict[str, Callable[[object], NativeRouting]] = {
    "olmoe": _top_k_rule,
    "qwen2_moe": _top_k_rule,
    "qwen3_moe": _top_k_rule,
    "mixtral": _mixtral_rule,
}
SUPPORTED_MODEL_TYPES = tuple(FAMILY_RULES)


def num_experts_of(config) -> int:
    """``E`` from a supported config (``num_experts`` or Mixtral's ``num_local_experts``)."""
    value = getattr(config, "num_local_experts", None) if config.model_type == "mixtral" else None
    return int(value if value is not None else config.num_experts)


def check_native_config(config, k_max: int | None = None, backbone: str | None = None) -> NativeRouting:
    """Refuse a model type or ``k_max`` this adapter cannot use, from the config alone (no weights)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILY_RULES:
        raise ConfigError(
            "model.backbone", backbone if backbone is not None else model_type,
            f"a natively sparse decoder with model_type in {list(SUPPORTED_MODEL_TYPES)}, got model_type={model_type!r}",
        )  # fmt: skip
    rule = FAMILY_RULES[model_type](config)
    e = num_experts_of(config)
    if k_max is not None and (isinstance(k_max, bool) or not isinstance(k_max, int) or not 1 <= k_max <= e):
        raise ConfigError("model.k_max", k_max, f"null (the model's top-k, {rule.top_k}) or an integer in [1, {e}]")
    return rule


def sparse_layer_indices(config) -> list[int]:
    """Indices of the layers whose MLP is sparse (Qwen's ``mlp_only_layers`` / ``decoder_sparse_step``)."""
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = int(getattr(config, "decoder_sparse_step", None) or 1)
    return [i for i in range(int(config.num_hidden_layers)) if i not in dense and (i + 1) % step == 0]


def decoder_dims(config, attention_lora: tuple[tuple[int, int], ...] = ()) -> DecoderDims:
    """The :class:`~ubsmoe.smoe.flops.DecoderDims` of a supported config (no weights needed)."""
    check_native_config(config)
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    shared = int(getattr(config, "shared_expert_intermediate_size", None) or 0)
    return DecoderDims(
        num_layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        vocab=int(config.vocab_size),
        num_experts=num_experts_of(config),
        expert_size=int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size),
        sparse_layers=len(sparse_layer_indices(config)),
        dense_intermediate=int(config.intermediate_size),
        shared_expert_size=shared,
        shared_expert_gate=shared > 0,
        attention_lora=tuple(attention_lora),
    )


def k_for_beta(k_max: int, beta: float) -> int:
    """``K_c = max(1, floor(K_max * beta))``: :meth:`ubsmoe.settings.Tier.num_experts_active` applied to K_max."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < float(beta) <= 1.0:
        raise ConfigError("tiers.beta", beta, "a compute budget in (0, 1]")
    return Tier(name="", beta=float(beta), share=1.0).num_experts_active(k_max)


def _is_sparse_mlp(mlp: nn.Module) -> bool:
    experts = getattr(mlp, "experts", None)
    gate = getattr(mlp, "gate", None)
    return (
        experts is not None
        and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
        and isinstance(getattr(gate, "weight", None), torch.Tensor)
    )


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of each decoder layer of a ``*ForCausalLM`` or ``*Model``."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and all(hasattr(m, "mlp") for m in module):
            return [(f"{name}.{i}", layer) for i, layer in enumerate(module)]
    raise ValueError(f"{type(model).__name__} has no decoder layers with an `mlp`")


def native_blocks(model: nn.Module) -> dict[str, NativeSparseMoE]:
    """``{module name: block}`` of every converted sparse block, in layer order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NativeSparseMoE)}


def convert(
    model: nn.Module,
    *,
    k_max: int | None = None,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    dmr: bool = True,
    kappa: float = 1.0,
    np_ratio: float = 2.0,
    num_candidates: int | None = None,
    pg_router: bool = True,
    pg_expert_sink: bool = True,
    pg_momentum: float = 0.9,
    balance_loss: bool = False,
    num_tiers: int = 0,
    options: MoEOptions | None = None,
    generator: torch.Generator | None = None,
    lora_dtype: torch.dtype = torch.float32,
    router_dtype: torch.dtype | None = None,
    expert_kernel: str = "auto",
    gate_norm: str = "model",
    freeze_base: bool = True,
) -> nn.Module:
    """Replace each sparse ``layer.mlp`` of ``model`` (in place) by a :class:`NativeSparseMoE`; return ``model``.

    ``k_max`` (default: the model's top-k) bounds ``set_k``; blocks start at ``min(top_k, k_max)``.
    ``options`` (a :class:`~ubsmoe.smoe.layer.MoEOptions`), when given, replaces the individual
    option arguments. With ``freeze_base`` every tensor of the original model is frozen except
    the routers, which become trainable; phi (with DMR), the expert LoRA and the tier scales are
    trainable. The config's ``output_router_logits`` is switched off: Hugging Face's auxiliary
    loss would ignore a client's K and phi (use ``balance_loss`` instead).

    ``num_candidates`` is DMR's absolute N_p (None: ``ceil(np_ratio * K_c)``); ``pg_expert_sink``
    collects the missed-token sums of the PG expert signal (``method.pg.expert_mode:
    missed_tokens``, the default); ``expert_kernel`` (``auto | grouped | loop``) picks the
    expert products (:func:`ubsmoe.smoe.native_kernels.products_class`); ``gate_norm``
    (``model | renormalize``) how the K_c gates are normalised
    (the choice is explained in :mod:`ubsmoe.smoe.native_layer`).
    """
    config = model.config
    rule = check_native_config(config, k_max)
    if options is None:
        options = MoEOptions(
            lora_rank=lora_rank, lora_alpha=lora_alpha, dmr=dmr, kappa=kappa, np_ratio=np_ratio,
            num_candidates=num_candidates, pg_router=pg_router, pg_expert_sink=pg_expert_sink, pg_momentum=pg_momentum,
            balance_loss=balance_loss, num_tiers=num_tiers,
        )  # fmt: skip
    if isinstance(options.lora_rank, bool) or not isinstance(options.lora_rank, int) or options.lora_rank < 0:
        raise ConfigError("model.lora.rank", options.lora_rank, "an integer >= 0 (0 = no expert LoRA)")
    if options.np_ratio < 1.0:
        raise ConfigError("method.dmr.np_ratio", options.np_ratio, "a number >= 1 (the candidates contain the top K)")
    if not 0.0 <= options.pg_momentum < 1.0:
        raise ConfigError("method.pg.default_momentum", options.pg_momentum, "a number in [0, 1)")
    if options.num_candidates is not None and (isinstance(options.num_candidates, bool) or options.num_candidates < 1):
        raise ConfigError("method.dmr.num_candidates", options.num_candidates, "null or an integer >= 1")
    if expert_kernel not in EXPERT_KERNELS:
        raise ConfigError("model.expert_kernel", expert_kernel, f"one of {list(EXPERT_KERNELS)}")
    if gate_norm not in GATE_NORMS:
        raise ConfigError("model.gate_norm", gate_norm, f"one of {list(GATE_NORMS)}")
    if any(isinstance(m, NativeSparseMoE) for m in model.modules()):
        raise ValueError("model is already converted")
    generator = generator or torch.Generator().manual_seed(0)
    if freeze_base:
        model.requires_grad_(False)
    hidden_act = getattr(config, "hidden_act", None)
    converted = 0
    for _, layer in decoder_layers(model):
        mlp = layer.mlp
        if not _is_sparse_mlp(mlp):
            continue
        experts = mlp.experts
        experts.gate_up_proj.requires_grad_(False)
        experts.down_proj.requires_grad_(False)
        if router_dtype is not None and mlp.gate.weight.dtype != router_dtype:
            mlp.gate.weight.data = mlp.gate.weight.data.to(router_dtype)
        mlp.gate.weight.requires_grad_(True)
        shared = getattr(mlp, "shared_expert", None)
        shared_gate = getattr(mlp, "shared_expert_gate", None)
        for frozen in (shared, shared_gate):
            if frozen is not None:
                frozen.requires_grad_(False)
        activation = Activation(hidden_act if isinstance(hidden_act, str) else None, experts.act_fn)
        layer.mlp = NativeSparseMoE(
            mlp.gate, experts, rule=rule, activation=activation, k_max=k_max, shared_expert=shared,
            shared_expert_gate=shared_gate, options=options, generator=generator, lora_dtype=lora_dtype,
            gate_norm=gate_norm, expert_kernel=expert_kernel,
        )  # fmt: skip
        converted += 1
    if converted == 0:
        raise ValueError(f"{type(model).__name__} has no sparse MoE layer to convert")
    config.output_router_logits = False
    return model
