"""Known keys and group options, read from the config tree itself, so a typo never passes silently.

Hydra accepts ``+federation.roundz=3`` (it adds the key) and answers ``method=fedavg`` with
its own traceback. Here the config files are the schema: a group's allowed keys are the
union of the keys its option files define, the allowed options of a group are its files,
and both checks give the project's one-line :class:`~ubsmoe.errors.ConfigError` (key,
value, what is allowed) before anything is loaded.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ubsmoe.errors import ConfigError

# Groups that are not part of the composed run config (or are Hydra's own).
NOT_RUN_GROUPS = ("experiment", "sweeps", "hydra")


def config_dir() -> Path:
    """The config tree: the repository's ``configs/`` in a checkout, the copy bundled in the package otherwise."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "configs", here / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no configs/train.yaml beside {here} (a broken install?)")


def group_options(group: str, root: Path | None = None) -> list[str]:
    """The option names of a config group (its ``.yaml`` files), sorted."""
    folder = (root or config_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def run_groups(root: Path | None = None) -> list[str]:
    root = root or config_dir()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in NOT_RUN_GROUPS)


def flatten(value: Any, prefix: str = "", *, groups: bool = False) -> dict[str, Any]:
    """A nested mapping as ``{dotted.key: value}``: the leaves, and with ``groups`` every sub-mapping too."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        if groups and prefix:
            out[prefix] = value
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k), groups=groups))
    else:
        out[prefix] = value
    return out


def _load(path: Path) -> Any:
    """A config file's content without its ``defaults`` list (a group may also be a plain list, as ``tiers``)."""
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict):
        data.pop("defaults", None)
    return {} if data is None else data


@lru_cache(maxsize=4)
def known_keys(root: Path | None = None) -> dict[str, bool]:
    """Every known dotted key -> whether its children are open (a map that defaults to null or {})."""
    root = root or config_dir()
    found: dict[str, Any] = {}
    for key, value in _load(root / "train.yaml").items():
        found.update(flatten(value, key, groups=True))
    for group in run_groups(root):
        found[group] = {}
        for option in (root / group).glob("*.yaml"):
            content = _load(option)
            if not isinstance(content, dict):
                found[group] = content  # a list-valued group (tiers): a leaf
                continue
            for key, value in content.items():
                found.update(flatten(value, f"{group}.{key}", groups=True))
    known: dict[str, bool] = {}
    for key, value in found.items():
        is_open = value is None or value == {}
        known[key] = known.get(key, False) or is_open
    for group in run_groups(root):
        known[group] = False
    return known


def check_known_keys(cfg: DictConfig, root: Path | None = None) -> None:
    """Refuse any key of the composed config that no config file defines (a typo, or ``+key`` of nothing)."""
    known = known_keys(root)
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(raw, dict)
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key != "hydra":
            flat.update(flatten(value, key, groups=True))
    for key in sorted(flat, key=lambda k: (k.count("."), k)):
        _check_key(key, flat[key], known)


def _check_key(key: str, value: Any, known: dict[str, bool]) -> None:
    """A key is known, or lies inside an open map; otherwise one error with the allowed siblings."""
    if key in known:
        return
    parts = key.split(".")
    if any(known.get(".".join(parts[:i])) for i in range(1, len(parts))):
        return  # inside an open map (e.g. a user's file list)
    parent = ".".join(parts[:-1])
    if parent:
        siblings = sorted(k.split(".")[-1] for k in known if "." in k and k.rsplit(".", 1)[0] == parent)
    else:
        siblings = sorted(k for k in known if "." not in k)
    close = difflib.get_close_matches(parts[-1], siblings, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
    where = f"a key of {parent!r}" if parent else "a top-level key"
    raise ConfigError(key, value, f"{where}: one of {', '.join(siblings)}{hint}")


def _as_typed(text: str) -> Any:
    """A command-line value as YAML reads it (``3`` -> 3), for the error message."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# Keys whose value picks a group's preset: changing the key alone would keep the other
# preset's values (server.optimizer=fedadam with FedAvg's lr 1.0 and no tau), so the group
# itself must be chosen, which brings the preset's defaults.
PRESET_KEYS = {"server.optimizer": "server"}


def _check_preset_keys(overrides: list[str], root: Path) -> None:
    chosen = {o.split("=", 1)[0].lstrip("+"): o.split("=", 1)[1] for o in overrides if "=" in o}
    for key, group in PRESET_KEYS.items():
        value = chosen.get(key)
        if value is None or value == chosen.get(group):
            continue
        if value in group_options(group, root):
            allowed = f"set with {group}={value}, which brings that preset's defaults (lr, betas, tau, ...)"
        else:
            allowed = f"a preset chosen with {group}=<name>, one of {', '.join(group_options(group, root))}"
        raise ConfigError(key, value, allowed)


def check_group_overrides(overrides: list[str], root: Path | None = None) -> None:
    """Check ``group=option`` command-line overrides against the group's files, before Hydra composes.

    Sweep lists (``method=ubsmoe,fedit``) are checked option by option; Hydra's sweep
    functions (``choice(...)``, ``range(...)``) are left to Hydra.
    """
    root = root or config_dir()
    groups = {p.name for p in root.iterdir() if p.is_dir()} - {"sweeps", "hydra"}
    _check_preset_keys(overrides, root)
    for override in overrides:
        if "=" not in override or override.startswith("~"):
            continue
        key, value = override.split("=", 1)
        key = key.lstrip("+").split("@", 1)[0]
        if key.split(".")[0] == "hydra":
            continue
        if key not in groups:
            _check_key(key, _as_typed(value), known_keys(root))  # Hydra's own answer would be a traceback
            continue
        if "(" in value:
            continue
        allowed = group_options(key, root)
        for option in (v.strip() for v in value.split(",")):
            if option and option != "null" and option not in allowed:
                close = difflib.get_close_matches(option, allowed, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(key, option, f"one of {', '.join(allowed)}{hint}")
