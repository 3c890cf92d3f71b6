"""Checks of raw config values: each failure is one :class:`~ubsmoe.errors.ConfigError` (key, value, what is allowed).

The building blocks of :mod:`ubsmoe.validate`; they read one key of a composed config
each, so a check of a new key is one line there.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from ubsmoe.errors import ConfigError


def get(cfg: DictConfig, key: str) -> Any:
    """The value at ``key`` (a missing mandatory value is OmegaConf's error)."""
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def require_int(cfg: DictConfig, key: str, minimum: int, maximum: int | None = None) -> int:
    value = get(cfg, key)
    upper = "" if maximum is None else f" and at most {maximum}"
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
        maximum is not None and value > maximum
    ):
        raise ConfigError(key, value, f"an integer at least {minimum}{upper}")
    return value


def require_float(
    cfg: DictConfig,
    key: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    value = get(cfg, key)
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    allowed = f"a number in {interval}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, allowed)
    v = float(value)
    if (low is not None and (v < low or (low_open and v == low))) or (
        high is not None and (v > high or (high_open and v == high))
    ):
        raise ConfigError(key, value, allowed)
    return v


def require_choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> str:
    value = get(cfg, key)
    if value not in choices:
        raise ConfigError(key, value, f"one of {', '.join(choices)}")
    return value


def require_bool(cfg: DictConfig, key: str) -> bool:
    value = get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


def optional(cfg: DictConfig, key: str, default: Any) -> Any:
    """A key that older configs may not have (its documented default then)."""
    return OmegaConf.select(cfg, key, default=default)
