"""MoEfication: cut each dense FFN of a Hugging Face encoder into ``M`` experts.

The intermediate neurons of an FFN are clustered into ``M`` groups of equal size (balanced
k-means on their input weights), then permuted so that expert ``e`` owns the contiguous
neurons ``[e * d_e, (e + 1) * d_e)``: its rows of the first matrix and bias, its columns of
the second matrix. Neurons that respond to similar inputs end up in the same expert, which
is what lets a router pick a few experts per token without losing much.

For a BERT-family layer (``intermediate``: dense + activation; ``output``: dense, dropout,
LayerNorm of the residual) the :class:`~ubsmoe.smoe.layer.SparseMoE` block replaces
``intermediate`` and ``output.dense`` becomes an identity, so the backbone's dropout,
residual and LayerNorm are untouched. With ``K = M`` the converted model equals the original.

Two constructions (``method``): ``weights`` (above: clusters of input weights, needs no
data) and ``coactivation`` (:mod:`ubsmoe.smoe.coactivation`: clusters of neurons that fire
together on recorded text). With ``calibration`` batches (tokenized unlabeled text of the
task) a router can be fitted to the recorded activations (``router_init="fitted"``) and the
skipped experts' typical output added back (``skip_defaults``). Everything computed from
data is cached in ``cache_dir`` (:mod:`ubsmoe.smoe.moefy_cache`) under a key of the
backbone's FFN weights, ``M``, the calibration tokens, the construction and its seed, so
later runs read it from disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ubsmoe.errors import ConfigError
from ubsmoe.names import MOEFY_METHODS, ROUTER_INITS
from ubsmoe.smoe import coactivation as co
from ubsmoe.smoe.clustering import balanced_kmeans
from ubsmoe.smoe.layer import Activation, MoEOptions, SparseMoE
from ubsmoe.smoe.moefy_cache import CACHE_VERSION, LayerPlan, cached_plans

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


def _divisors(n: int, limit: int = 64) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def check_backbone_config(config, num_experts: int, backbone: str) -> None:
    """Refuse a backbone or expert count this module cannot convert, before loading weights."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            "model.backbone", backbone, f"a BERT-family encoder (model_type in {list(SUPPORTED_MODEL_TYPES)}), "
            f"got model_type={model_type!r}",
        )  # fmt: skip
    width = int(config.intermediate_size)
    if not isinstance(num_experts, int) or num_experts < 1 or width % num_experts:
        raise ConfigError(
            "model.num_experts", num_experts, f"a positive divisor of the FFN width {width}: {_divisors(width)}..."
        )


def encoder_layers(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer layers of a BERT-family model, with their module names."""
    base = getattr(backbone, "base_model", backbone)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None:
        raise ValueError(f"{type(backbone).__name__} has no encoder.layer: not a BERT-family encoder")
    prefix = "" if base is backbone else next(n for n, m in backbone.named_modules() if m is base) + "."
    out = []
    for i, layer in enumerate(layers):
        inter, output = getattr(layer, "intermediate", None), getattr(layer, "output", None)
        if not isinstance(getattr(inter, "dense", None), nn.Linear) or not isinstance(
            getattr(output, "dense", None), nn.Linear
        ):
            raise ValueError(f"layer {i} has no intermediate.dense / output.dense Linear: cannot MoEfy it")
        out.append((f"{prefix}encoder.layer.{i}", layer))
    return out


def cluster_neurons(w1: torch.Tensor, b1: torch.Tensor, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """A permutation of the ``d`` neurons that makes each expert's neurons contiguous.

    Neurons are described by their input weights and bias, normalised so that clustering
    groups neurons by the direction they respond to rather than by their magnitude.
    """
    features = torch.cat([w1, b1[:, None]], dim=1).double()
    features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = balanced_kmeans(features, num_experts, generator)
    return torch.argsort(labels, stable=True)


def centroid_router(w1_permuted: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Router rows = each expert's mean input-weight vector, scaled to unit norm.

    Unnormalised centroids let one expert's large-norm centroid win almost every token
    (94% of a layer's tokens at K = 2 of 8, measured); unit norm routes by direction.
    """
    d, h = w1_permuted.shape
    centroids = w1_permuted.view(num_experts, d // num_experts, h).mean(1)
    return centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _activation_for(layer: nn.Module, hidden_act) -> Activation:
    module = layer.intermediate.intermediate_act_fn
    return Activation(hidden_act if isinstance(hidden_act, str) else None, module)


def needs_calibration(method: str, router_init: str, skip_defaults: bool) -> bool:
    """Whether this construction reads recorded activations (and so needs calibration batches)."""
    return method == "coactivation" or router_init == "fitted" or bool(skip_defaults)


def check_moefy_args(method: str, router_init: str) -> None:
    if method not in MOEFY_METHODS:
        raise ConfigError("model.moefy.method", method, f"one of {list(MOEFY_METHODS)}")
    if router_init not in ROUTER_INITS:
        raise ConfigError("model.router_init", router_init, f"one of {list(ROUTER_INITS)}")


@torch.no_grad()
def record_ffn_activations(
    backbone: nn.Module, calibration: list[dict[str, torch.Tensor]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the FFN inputs ``x [N, h]`` and activations ``u [N, d]`` of every non-padding token.

    One forward pass of the unmodified backbone per batch, in eval mode (no dropout), with
    hooks on each layer's ``intermediate`` (dense + activation) module.
    """
    layers = encoder_layers(backbone)
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name, _ in layers}
    mask_box: list[torch.Tensor] = []

    def hook(name: str):
        def fn(_module, inputs, output):
            valid = mask_box[0].reshape(-1)
            records[name].append((inputs[0].reshape(-1, inputs[0].shape[-1])[valid].float(),
                                  output.reshape(-1, output.shape[-1])[valid].float()))  # fmt: skip

        return fn

    handles = [layer.intermediate.register_forward_hook(hook(name)) for name, layer in layers]
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    try:
        for batch in calibration:
            mask = batch["attention_mask"].to(device)
            mask_box[:] = [mask.bool()]
            kwargs = {k: batch[k].to(device) for k in ("input_ids", "token_type_ids") if k in batch}
            backbone(attention_mask=mask, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training)
    return {name: (torch.cat([x for x, _ in r]).cpu(), torch.cat([u for _, u in r]).cpu()) for name, r in records.items()}


def _ffn_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    first, second = layer.intermediate.dense, layer.output.dense
    return (first.weight.detach().float().cpu(), first.bias.detach().float().cpu(),
            second.weight.detach().float().cpu(), second.bias.detach().float().cpu())  # fmt: skip


def construction_key(
    backbone: nn.Module, calibration: list[dict[str, torch.Tensor]], *, num_experts: int, method: str,
    router_init: str, skip_defaults: bool, seed: int,
) -> str:  # fmt: skip
    """Cache key: a hash of the FFN weights, the calibration tokens and every setting of the construction."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{method}|{num_experts}|{router_init}|{bool(skip_defaults)}|{seed}".encode())
    for _, layer in encoder_layers(backbone):
        for tensor in _ffn_weights(layer):
            digest.update(tensor.contiguous().numpy().tobytes())
    for batch in calibration:
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            if name in batch:
                digest.update(name.encode())
                digest.update(batch[name].detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def plan_layers(
    backbone: nn.Module, calibration: list[dict[str, torch.Tensor]], *, num_experts: int, method: str,
    router_init: str, skip_defaults: bool, seed: int,
) -> dict[str, LayerPlan]:  # fmt: skip
    """Record activations on ``calibration`` and decide every layer's experts, router and skip defaults."""
    activations = record_ffn_activations(backbone, calibration)
    generator = torch.Generator().manual_seed(seed)
    hidden_act = getattr(getattr(backbone, "config", None), "hidden_act", None)
    plans = {}
    for name, layer in encoder_layers(backbone):
        x, u = activations[name]
        w1, b1, w2, _ = _ffn_weights(layer)
        d, h = w1.shape
        m, de = num_experts, d // num_experts
        if method == "coactivation":
            perm = co.cluster_by_coactivation(u, m, generator)
        else:
            perm = cluster_neurons(w1, b1, m, generator)
        w1s, b1s, w2t = w1[perm].view(m, de, h), b1[perm].view(m, de), w2[:, perm].t().reshape(m, de, h)
        defaults = co.skip_defaults(u[:, perm], w2t) if skip_defaults else None
        router = None
        if router_init == "fitted":
            act = _activation_for(layer, hidden_act).forward
            router = co.fit_router(x, co.expert_gains(co.expert_outputs(x, w1s, b1s, w2t, act), defaults))
        plans[name] = LayerPlan(perm=perm, router=router, skip_default=defaults)
    return plans


@torch.no_grad()
def moefy_layer(
    layer: nn.Module,
    *,
    num_experts: int,
    router_init: str,
    options: MoEOptions,
    generator: torch.Generator,
    hidden_act=None,
    plan: LayerPlan | None = None,
) -> SparseMoE:
    """Replace one BERT-family layer's FFN by a :class:`SparseMoE` block (in place) and return it.

    Without ``plan`` the neurons are clustered by their weights (drawing from ``generator``);
    with one, its order, fitted router and skip defaults are used.
    """
    if router_init not in ROUTER_INITS:
        raise ConfigError("model.router_init", router_init, f"one of {list(ROUTER_INITS)}")
    first, second = layer.intermediate.dense, layer.output.dense
    w1, b1 = first.weight.detach().float(), first.bias.detach().float()
    w2, b2 = second.weight.detach().float(), second.bias.detach().float()
    if w1.shape[0] % num_experts:
        raise ConfigError(
            "model.num_experts", num_experts, f"a positive divisor of the FFN width {w1.shape[0]}"
        )
    perm = cluster_neurons(w1, b1, num_experts, generator) if plan is None else plan.perm
    block = SparseMoE(
        w1[perm], b1[perm], w2[:, perm], b2,
        num_experts=num_experts, activation=_activation_for(layer, hidden_act), options=options, generator=generator,
    )  # fmt: skip
    if router_init == "centroid":
        block.router.weight.copy_(centroid_router(w1[perm], num_experts))
    elif router_init == "fitted":
        if plan is None or plan.router is None:
            raise ValueError("router_init='fitted' needs a LayerPlan with a fitted router (calibration data)")
        block.router.weight.copy_(plan.router)
    if plan is not None and plan.skip_default is not None:
        block.set_skip_default(plan.skip_default)
    # Which original neuron each row of the experts is: what an export needs to rebuild the
    # experts from the backbone alone (not saved with the module's state: it is fixed).
    block.register_buffer("neuron_order", perm.clone(), persistent=False)
    block.to(first.weight.device)
    layer.intermediate = block
    layer.output.dense = nn.Identity()
    return block


def moefy(
    backbone: nn.Module,
    *,
    num_experts: int,
    router_init: str = "centroid",
    options: MoEOptions | None = None,
    generator: torch.Generator | None = None,
    on_layer: Callable[[str, SparseMoE], None] | None = None,
    method: str = "weights",
    calibration: Iterable[dict[str, torch.Tensor]] | None = None,
    skip_defaults: bool = False,
    cache_dir: str | Path | None = None,
) -> dict[str, SparseMoE]:
    """MoEfy every FFN of ``backbone`` in place; returns ``{layer name: SparseMoE}``.

    ``method`` groups the neurons (``weights`` | ``coactivation``). ``coactivation``,
    ``router_init="fitted"`` and ``skip_defaults`` read activations recorded on
    ``calibration`` (batches with ``input_ids``, ``attention_mask`` and optionally
    ``token_type_ids``); their result is cached in ``cache_dir`` (``None`` = no cache).
    Without any of them the construction is the weight-based one, draw for draw.
    """
    check_moefy_args(method, router_init)
    generator = generator or torch.Generator().manual_seed(0)
    options = options or MoEOptions()
    hidden_act = getattr(getattr(backbone, "config", None), "hidden_act", None)
    plans: dict[str, LayerPlan] = {}
    if needs_calibration(method, router_init, skip_defaults):
        batches = list(calibration or [])
        if not batches:
            raise ValueError(
                f"MoEfication method={method!r}, router_init={router_init!r}, skip_defaults={skip_defaults} "
                "needs calibration batches (tokenized training text)"
            )
        settings = dict(num_experts=num_experts, method=method, router_init=router_init, skip_defaults=skip_defaults,
                        seed=int(torch.randint(2**62, (1,), generator=generator)))  # fmt: skip
        key = construction_key(backbone, batches, **settings)
        plans = cached_plans(cache_dir, key, lambda: plan_layers(backbone, batches, **settings))
    blocks: dict[str, SparseMoE] = {}
    for name, layer in encoder_layers(backbone):
        blocks[name] = moefy_layer(
            layer, num_experts=num_experts, router_init=router_init, options=options, generator=generator,
            hidden_act=hidden_act, plan=plans.get(name),
        )  # fmt: skip
        if on_layer is not None:
            on_layer(name, blocks[name])
    return blocks
