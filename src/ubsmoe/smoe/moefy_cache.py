"""The disk cache of data-driven MoEfication: each layer's plan, computed once per construction key.

Recording activations and clustering them takes a while; :func:`cached_plans` writes the
result to ``cache_dir/moefy/<key>.pt`` (the key: :func:`ubsmoe.smoe.moefy.construction_key`)
and later runs read it back. A damaged file, or one written for another construction or
cache version, is ignored with a warning and rebuilt.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_VERSION = 1  # bump when what a cached construction means changes


@dataclass
class LayerPlan:
    """What the data decided for one layer: neuron order, router weight, skip defaults (``None`` = not data-driven)."""

    perm: torch.Tensor
    router: torch.Tensor | None = None
    skip_default: torch.Tensor | None = None


def _read_cached_plans(path: Path, key: str) -> dict[str, LayerPlan] | None:
    """The plans in a cache file, or ``None`` (with a warning) when it is damaged or not this construction's."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if raw.get("key") != key or raw.get("version") != CACHE_VERSION:
            raise ValueError("written for another construction or cache version")
        plans = {}
        for name, fields in raw["layers"].items():
            plan = LayerPlan(**fields)
            perm = plan.perm
            if perm.dim() != 1 or not torch.equal(torch.sort(perm).values, torch.arange(perm.numel())):
                raise ValueError(f"layer {name}: the neuron order is not a permutation")
            for tensor in (plan.router, plan.skip_default):
                if tensor is not None and not torch.isfinite(tensor).all():
                    raise ValueError(f"layer {name}: non-finite values")
            plans[name] = plan
        return plans
    except Exception as err:  # noqa: BLE001  (any damage: rebuild, the cache holds nothing unique)
        warnings.warn(f"ignoring the MoEfication cache file {path} ({err}); rebuilding it", stacklevel=3)
        return None


def cached_plans(cache_dir: str | Path | None, key: str, build: Callable[[], dict[str, LayerPlan]]) -> dict[str, LayerPlan]:
    """``build()`` once per key: the plans are written to ``cache_dir/moefy/<key>.pt`` and read back later."""
    if cache_dir is None:
        return build()
    path = Path(cache_dir) / "moefy" / f"{key}.pt"
    if path.is_file():
        cached = _read_cached_plans(path, key)
        if cached is not None:
            return cached
    plans = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    layers = {name: {"perm": p.perm, "router": p.router, "skip_default": p.skip_default} for name, p in plans.items()}
    torch.save({"key": key, "version": CACHE_VERSION, "layers": layers}, tmp)
    os.replace(tmp, path)
    return plans
