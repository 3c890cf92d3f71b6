"""Balanced k-means: clusters of exactly equal size, as the expert kernels need equal-width experts.

Used to group an FFN's neurons into experts, by their input weights
(:func:`ubsmoe.smoe.moefy.cluster_neurons`) or by their recorded activations
(:func:`ubsmoe.smoe.coactivation.cluster_by_coactivation`).
"""

from __future__ import annotations

import torch


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
