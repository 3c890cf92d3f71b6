"""Backbone adapters (DESIGN.md section 6): ``moefy`` (dense encoder cut into experts), ``native``
(a sparse decoder's own experts). ``model.adapter`` picks one by name from :data:`ADAPTERS`.

:mod:`ubsmoe.backbones.native` holds ``convert()`` (HF sparse decoder -> UB-SMoE blocks, by
reference); :mod:`ubsmoe.backbones.tiny` builds tiny random models of each family and an
offline tokenizer for tests and CPU demos.
"""

from __future__ import annotations

from collections.abc import Callable

from ubsmoe.backbones.base import BackboneAdapter, BuiltBackbone
from ubsmoe.errors import ConfigError


def _moefy() -> BackboneAdapter:
    from ubsmoe.backbones.moefy_adapter import MoefyAdapter

    return MoefyAdapter()


def _native() -> BackboneAdapter:
    from ubsmoe.backbones.native_adapter import NativeAdapter

    return NativeAdapter()


ADAPTERS: dict[str, Callable[[], BackboneAdapter]] = {"moefy": _moefy, "native": _native}


def build_adapter(name: str) -> BackboneAdapter:
    """The adapter registered under ``name`` (``model.adapter``)."""
    if name not in ADAPTERS:
        raise ConfigError("model.adapter", name, f"one of {sorted(ADAPTERS)}")
    return ADAPTERS[name]()


__all__ = ("ADAPTERS", "BackboneAdapter", "BuiltBackbone", "build_adapter")
