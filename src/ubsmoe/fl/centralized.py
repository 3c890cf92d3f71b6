"""``federation=centralized``: the same model trained on the pooled data, the upper bound of one tier.

Expressed with the federated engine itself, not a second training loop: one client that
holds the whole training set (``num_clients = clients_per_round = 1``), every round
running ``clients_per_round * local_steps`` steps of the federated experiment it is
compared with, so it sees the same number of examples per round, and the same number of
rounds (so evaluations line up). Only the tier named by ``federation.tier`` exists, so the
model is trained and evaluated at that tier's K (or rank): run it once per tier (and with
``method=fedit`` for the dense bound); ``python -m ubsmoe.compare --centralized`` does that.
The aggregation of one client's update is that update itself for every strategy here.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from ubsmoe.settings import Tier


def centralize(cfg: DictConfig, tiers: list[Tier]) -> tuple[DictConfig, list[Tier]]:
    """The config (changed in place) and tiers of the centralized run equivalent to ``cfg``.

    Nothing changes unless ``federation.centralized``. ``cfg`` was validated (:func:`ubsmoe.validate.validate` checks the tier name and that the
    budget is in local steps).
    """
    if not OmegaConf.select(cfg, "federation.centralized", default=False):
        return cfg, tiers
    federation = cfg.federation
    with open_dict(federation):
        federation.local_steps = int(federation.local_steps) * int(federation.clients_per_round)
        federation.num_clients = 1
        federation.clients_per_round = 1
        federation.partition = "iid"
        federation.min_client_size = 1
    tier = next(t for t in tiers if t.name == federation.tier)
    with open_dict(cfg):  # the run's config names only its tier: every process and a resume agree
        cfg.tiers = [{"name": tier.name, "beta": tier.beta, "share": 1.0}]
    return cfg, [Tier(name=tier.name, beta=tier.beta, share=1.0)]
