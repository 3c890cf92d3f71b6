"""Data-driven MoEfication: experts from co-activation, routers fitted on recorded activations.

The weight-based construction (:func:`ubsmoe.smoe.moefy.cluster_neurons`) groups neurons
by the direction of their input weights and routes by the experts' centroids. Cutting
MiniLM's GELU FFNs that way leaves the K = M/4 model far from the dense one (mean-pooled
embedding cosine 0.60 on SST-2 validation sentences, measured by
``benchmarks/moefy_quality.py``). Three things built from a few thousand recorded tokens of
the task's own (unlabeled) training text close most of that gap; each is a pure-torch
function of the recorded tensors of one layer, so any backbone adapter can call them:

- :func:`cluster_by_coactivation`: neurons whose activations rise and fall together over
  the recorded tokens go into the same expert (balanced k-means on each neuron's
  normalised activation pattern), so a token's large activations concentrate in few experts;
- :func:`skip_defaults`: a GELU neuron that an expert skips is not silent, it sits near its
  typical (median) value, and the constant those values add up to is what dropping an
  expert loses on most tokens. The block adds that per-expert constant for every expert a
  token does not run (:attr:`~ubsmoe.smoe.layer.SparseMoE.skip_default`); with K = M no
  expert is skipped, so the dense FFN is reproduced exactly;
- :func:`fit_router`: a linear router fitted to predict, per token, which experts' outputs
  move furthest from their skip default (:func:`expert_gains`, also the oracle router's
  score): ridge regression of the per-token centred log gains. It is the trainable
  router's initial value.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator

import torch

from ubsmoe.smoe.clustering import balanced_kmeans
from ubsmoe.smoe.routing import Routing, route


def coactivation_features(u: torch.Tensor, max_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """One row per neuron: its activations over (at most ``max_tokens``) recorded tokens, centred, unit norm.

    Centring removes each neuron's resting level, so what is compared is when a neuron
    fires above or below it; unit norm compares patterns rather than magnitudes.
    """
    n = u.shape[0]
    if n > max_tokens:
        u = u.index_select(0, torch.randperm(n, generator=generator)[:max_tokens])
    features = (u - u.mean(0)).t().double()
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cluster_by_coactivation(
    u: torch.Tensor, num_experts: int, generator: torch.Generator, max_tokens: int = 2048
) -> torch.Tensor:
    """A permutation of the ``d`` neurons (columns of ``u [N, d]``) making each co-activation cluster contiguous."""
    labels = balanced_kmeans(coactivation_features(u, max_tokens, generator), num_experts, generator)
    return torch.argsort(labels, stable=True)


def skip_defaults(u: torch.Tensor, w2t: torch.Tensor) -> torch.Tensor:
    """``[M, h]``: each expert's output when every neuron sits at its median recorded activation.

    ``u [N, d]`` are the activations in expert order (permuted), ``w2t [M, d_e, h]`` the
    expert-stacked second matrix. The median, not the mean: a few tokens ([CLS], [SEP])
    drive some neurons to large values, and the mean then misrepresents the tokens on which
    the expert is skipped (measured: the mean made the K = M/4 embedding worse, the median
    better).
    """
    m, de, h = w2t.shape
    median = u.median(dim=0).values.to(w2t.dtype).view(m, de)
    return torch.einsum("md,mdh->mh", median, w2t)


def expert_outputs(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2t: torch.Tensor, act) -> torch.Tensor:
    """``[N, M, h]``: every expert's output on every token (no bias), for fitting and the oracle."""
    z = torch.einsum("nh,mdh->nmd", x, w1) + b1
    return torch.einsum("nmd,mdh->nmh", act(z), w2t)


def expert_gains(outputs: torch.Tensor, defaults: torch.Tensor | None) -> torch.Tensor:
    """``[N, M]``: how far each expert's output is from what the block adds when it is skipped.

    The error of skipping expert ``e`` on a token is ``||E_e(x) - c_e||`` (``c_e`` its skip
    default, zero without defaults); the oracle router keeps the ``K`` experts with the
    largest gains. Without defaults this is the expert's output norm.
    """
    if defaults is not None:
        outputs = outputs - defaults
    return outputs.norm(dim=-1)


def fit_router(x: torch.Tensor, gains: torch.Tensor, *, ridge: float = 1e-2) -> torch.Tensor:
    """Router weight ``[M, h]`` (no bias, as the block's router) whose logits rank each token's experts by ``gains``.

    Regression of the per-token centred log gains on the token (a ranking needs only their
    differences), with a ridge penalty relative to the inputs' mean square; closed form,
    under a second per layer on a few thousand tokens. A listwise ranking loss refined from
    this start (150 Adam steps) moved the K = M/4 embedding cosine by 0.001 for 7x the time,
    so the closed form is all there is.
    """
    x = x.double()
    targets = torch.log(gains.double() + 1e-6)
    targets = targets - targets.mean(dim=1, keepdim=True)
    h = x.shape[1]
    gram = x.t() @ x / x.shape[0]
    scale = float(gram.diagonal().mean())
    rhs = x.t() @ targets / x.shape[0]
    return torch.linalg.solve(gram + ridge * scale * torch.eye(h, dtype=x.dtype), rhs).t().float().contiguous()


def oracle_route(block, x: torch.Tensor) -> Routing:
    """The ceiling for any router of ``block`` (a SparseMoE): per token, the K experts with the largest gains.

    Runs every expert (so it costs the dense FFN): for evaluation only.
    """
    outputs = expert_outputs(x, block.w1, block.b1, block.w2t, block.activation.forward)
    return route(expert_gains(outputs, block.skip_default), block.k)


@contextlib.contextmanager
def oracle_routing(blocks: Iterable) -> Iterator[None]:
    """Within the context, every block routes with :func:`oracle_route` instead of its router."""
    blocks = list(blocks)
    for block in blocks:
        block.route = functools.partial(oracle_route, block)
    try:
        yield
    finally:
        for block in blocks:
            del block.route
