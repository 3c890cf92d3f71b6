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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ubsmoe.errors import ConfigError
from ubsmoe.smoe.layer import Activation, MoEOptions, SparseMoE

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
ROUTER_INITS = ("centroid", "zeros")


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


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    first = int(torch.randint(points.shape[0], (1,), generator=generator))
    centers = [points[first]]
    closest = (points - centers[0]).square().sum(1)
    for _ in range(1, k):
        idx = int(torch.multinomial(closest / closest.sum(), 1, generator=generator))
        centers.append(points[idx])
        closest = torch.minimum(closest, (points - points[idx]).square().sum(1))
    return torch.stack(centers)


def balanced_assignment(distances: torch.Tensor) -> torch.Tensor:
    """Assign ``n`` points to ``k`` clusters of exactly ``n / k`` points, nearest first.

    Rounds: every unassigned point bids for its nearest open cluster; a cluster with room
    for all its bidders takes them, an oversubscribed one takes the nearest bidders up to
    its capacity and closes. At most ``k`` rounds.
    """
    n, k = distances.shape
    capacity = torch.full((k,), n // k, dtype=torch.long)
    labels = torch.full((n,), -1, dtype=torch.long)
    while bool((labels < 0).any()):
        pending = (labels < 0).nonzero().squeeze(1)
        open_mask = capacity > 0
        d = distances[pending].masked_fill(~open_mask, float("inf"))
        choice = d.argmin(1)
        for c in choice.unique().tolist():
            bidders = pending[choice == c]
            room = int(capacity[c])
            if bidders.numel() > room:
                nearest = distances[bidders, c].argsort(stable=True)[:room]
                bidders = bidders[nearest]
            labels[bidders] = c
            capacity[c] -= bidders.numel()
    return labels


def balanced_kmeans(
    points: torch.Tensor, num_clusters: int, generator: torch.Generator, iterations: int = 15
) -> torch.Tensor:
    """Labels ``[n]`` of a k-means clustering with every cluster of size ``n / num_clusters``."""
    n = points.shape[0]
    if n % num_clusters:
        raise ValueError(f"{num_clusters} clusters do not divide {n} points")
    if num_clusters == 1:
        return torch.zeros(n, dtype=torch.long)
    centers = _kmeans_plus_plus(points, num_clusters, generator)
    labels = None
    for _ in range(iterations):
        new_labels = balanced_assignment(torch.cdist(points, centers))
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        centers = torch.zeros_like(centers).index_add_(0, labels, points) / (n // num_clusters)
    return labels


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


@torch.no_grad()
def moefy_layer(
    layer: nn.Module,
    *,
    num_experts: int,
    router_init: str,
    options: MoEOptions,
    generator: torch.Generator,
    hidden_act=None,
) -> SparseMoE:
    """Replace one BERT-family layer's FFN by a :class:`SparseMoE` block (in place) and return it."""
    if router_init not in ROUTER_INITS:
        raise ConfigError("model.router_init", router_init, f"one of {list(ROUTER_INITS)}")
    first, second = layer.intermediate.dense, layer.output.dense
    w1, b1 = first.weight.detach().float(), first.bias.detach().float()
    w2, b2 = second.weight.detach().float(), second.bias.detach().float()
    if w1.shape[0] % num_experts:
        raise ConfigError(
            "model.num_experts", num_experts, f"a positive divisor of the FFN width {w1.shape[0]}"
        )
    perm = cluster_neurons(w1, b1, num_experts, generator)
    block = SparseMoE(
        w1[perm], b1[perm], w2[:, perm], b2,
        num_experts=num_experts, activation=_activation_for(layer, hidden_act), options=options, generator=generator,
    )  # fmt: skip
    if router_init == "centroid":
        block.router.weight.copy_(centroid_router(w1[perm], num_experts))
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
) -> dict[str, SparseMoE]:
    """MoEfy every FFN of ``backbone`` in place; returns ``{layer name: SparseMoE}``."""
    if router_init not in ROUTER_INITS:
        raise ConfigError("model.router_init", router_init, f"one of {list(ROUTER_INITS)}")
    generator = generator or torch.Generator().manual_seed(0)
    options = options or MoEOptions()
    hidden_act = getattr(getattr(backbone, "config", None), "hidden_act", None)
    blocks: dict[str, SparseMoE] = {}
    for name, layer in encoder_layers(backbone):
        blocks[name] = moefy_layer(
            layer, num_experts=num_experts, router_init=router_init, options=options, generator=generator,
            hidden_act=hidden_act,
        )  # fmt: skip
        if on_layer is not None:
            on_layer(name, blocks[name])
    return blocks
