"""Where the federation's tensors live: the one device rule.

A client's update is a message: where the loop receives it, every tensor it carries is
detached and moved once to the server's device (:func:`move_tensors`, called through
:meth:`ubsmoe.fl.client.ClientUpdate.to`). The server state (global trainable tensors,
DMR's phi, PG defaults, FLAME's tier scales, the server optimizer's moments, a strategy's
own tensors such as FLoRA's merged deltas) lives on that device alone: ``server.device``,
CPU by default. A payload is moved to the client's device where the client loads it.
So no strategy or aggregation helper ever sees two devices, whatever backend ran the
clients and wherever their module sits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ubsmoe.errors import ConfigError


def move_tensors(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor inside it (nested mappings, lists, tuples) detached and on ``device``.

    Anything that is not a tensor or a container of tensors is returned as it is, so a
    malformed reply still reaches validation, which rejects it with a reason.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, Mapping):
        return {key: move_tensors(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move_tensors(item, device) for item in value)
    return value


def server_device(name: str) -> torch.device:
    """The device of ``server.device``; ``cuda`` on a machine without CUDA is a configuration error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("server.device", name, "cpu on a machine without a CUDA device")
    return torch.device(name)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (CPU for a module without any)."""
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")
