"""Backbone adapters: ``moefy`` (dense encoder cut into experts), ``native``
(a sparse decoder's own experts). ``model.adapter`` picks one by name from :data:`ADAPTERS`.

:mod:`ubsmoe.backbones.native_convert` holds ``convert()`` (HF sparse decoder -> UB-SMoE blocks, by
reference); :mod:`ubsmoe.backbones.tiny` builds tiny random models of each family and an
offline tokenizer for tests and CPU demos.
"""

from __future__ import annotations

from ubsmoe import names
from ubsmoe.backbones.base import BackboneAdapter, BuiltBackbone
from ubsmoe.backbones.moefy_adapter import MoefyAdapter
from ubsmoe.backbones.native_adapter import NativeAdapter
from ubsmoe.errors import ConfigError

ADAPTERS: dict[str, type[BackboneAdapter]] = {"moefy": MoefyAdapter, "native": NativeAdapter}
assert tuple(ADAPTERS) == names.ADAPTERS, "ubsmoe.names.ADAPTERS and ADAPTERS must list the same adapters"


def build_adapter(name: str) -> BackboneAdapter:
    """The adapter registered under ``name`` (``model.adapter``)."""
    if name not in ADAPTERS:
        raise ConfigError("model.adapter", name, f"one of {sorted(ADAPTERS)}")
    return ADAPTERS[name]()


__all__ = ("ADAPTERS", "BackboneAdapter", "BuiltBackbone", "build_adapter")
