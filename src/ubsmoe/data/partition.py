"""Split a training set across federated clients: Dirichlet label skew, or iid.

Every partitioner is a pure function of its arguments and ``seed`` (numpy's PCG64
generator), returns one sorted index array per client, and places every example in exactly
one client. The same seed therefore gives the same federation on every machine, which is
what lets two methods be compared on identical partitions.
"""

from __future__ import annotations

import numpy as np

from ubsmoe.errors import ConfigError
from ubsmoe.names import PARTITIONS

# How many times a Dirichlet draw that leaves some client below min_size is redrawn (with the
# same generator, so still deterministic) before examples are moved to the short clients.
MAX_REDRAWS = 20


def validate_partition_args(
    *, method: str, num_clients: int, alpha: float, min_size: int, num_examples: int
) -> None:
    """Raise ConfigError for arguments no partition can satisfy; cheap, so call it first."""
    if method not in PARTITIONS:
        raise ConfigError("federation.partition", method, "one of " + ", ".join(PARTITIONS))
    if method == "dirichlet" and not (alpha > 0):
        raise ConfigError(
            "federation.dirichlet_alpha", alpha, "a number > 0 (small = strong label skew, large = near iid)"
        )
    if min_size < 0:
        raise ConfigError("federation.min_client_size", min_size, "an integer >= 0")
    if num_clients < 1:
        raise ConfigError("federation.num_clients", num_clients, "an integer >= 1")
    if num_clients * min_size > num_examples:
        raise ConfigError(
            "federation.num_clients",
            num_clients,
            f"at most {num_examples // max(min_size, 1)} clients: there are {num_examples} training examples "
            f"and each client needs at least {min_size} (federation.min_client_size)",
        )


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A uniformly random split into client shares whose sizes differ by at most one."""
    validate_partition_args(method="iid", num_clients=num_clients, alpha=1.0, min_size=0, num_examples=num_examples)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, min_size: int, seed: int
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among clients in Dirichlet(alpha) proportions.

    For every class (in sorted label order) the class's indices are shuffled and cut at the
    cumulative proportions of one Dir(alpha, ..., alpha) draw over the clients. If a client
    ends up with fewer than ``min_size`` examples the whole draw is repeated, up to
    ``MAX_REDRAWS`` times, continuing the same generator. If the last draw is still short,
    examples are moved, deterministically, from the currently largest client (lowest id on
    ties) to the shortest one (lowest id on ties), taking the donor's most recently assigned
    examples, until every client has ``min_size``. The moves only top clients up, so the
    skew of the draw is otherwise kept.
    """
    labels = np.asarray(labels).reshape(-1)
    validate_partition_args(
        method="dirichlet", num_clients=num_clients, alpha=alpha, min_size=min_size, num_examples=labels.size
    )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == value) for value in np.unique(labels)]

    clients: list[list[np.ndarray]] = []
    for _ in range(MAX_REDRAWS + 1):
        clients = [[] for _ in range(num_clients)]
        for members in by_class:
            members = rng.permutation(members)
            proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = np.floor(np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
            for client, share in enumerate(np.split(members, cuts)):
                clients[client].append(share)
        if min(sum(s.size for s in shares) for shares in clients) >= min_size:
            break

    assigned = [np.concatenate(shares) if shares else np.empty(0, np.int64) for shares in clients]
    assigned = _top_up(assigned, min_size)
    return [np.sort(part).astype(np.int64) for part in assigned]


def _top_up(assigned: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Move examples from the largest clients to those below ``min_size`` (deterministic)."""
    assigned = list(assigned)
    while True:
        sizes = np.array([part.size for part in assigned])
        short = int(np.argmin(sizes))
        if sizes[short] >= min_size:
            return assigned
        donor = int(np.argmax(sizes))  # exists with spare examples because num_clients * min_size <= n
        moved = min(min_size - sizes[short], sizes[donor] - min_size)
        assigned[short] = np.concatenate([assigned[short], assigned[donor][-moved:]])
        assigned[donor] = assigned[donor][:-moved]


def bucketize_scores(scores: np.ndarray, num_buckets: int) -> np.ndarray:
    """Quantile bucket ids (0 .. num_buckets-1) of regression targets, to skew them like labels.

    Ties at a quantile edge go to the upper bucket, so heavily repeated scores (STS-B has
    many 0.0 and 5.0) can leave a bucket smaller than the others.
    """
    if num_buckets < 1:
        raise ConfigError("data.regression_buckets", num_buckets, "an integer >= 1")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if num_buckets == 1 or scores.size == 0:
        return np.zeros(scores.size, dtype=np.int64)
    edges = np.quantile(scores, np.linspace(0.0, 1.0, num_buckets + 1)[1:-1])
    return np.searchsorted(edges, scores, side="right").astype(np.int64)


def partition(
    labels: np.ndarray, *, method: str, num_clients: int, alpha: float, min_size: int, seed: int
) -> list[np.ndarray]:
    """Validate the arguments, then split ``labels``' examples with ``method`` ("dirichlet" or "iid")."""
    labels = np.asarray(labels).reshape(-1)
    validate_partition_args(
        method=method, num_clients=num_clients, alpha=alpha, min_size=min_size, num_examples=labels.size
    )
    if method == "iid":
        return iid_partition(labels.size, num_clients, seed)
    return dirichlet_partition(labels, num_clients, alpha, min_size, seed)
