"""The one error type for bad user input.

Every check that guards a run raises :class:`ConfigError` before any work starts, so
the message names the key the user typed, the value they gave, and what is allowed.
``src/train.py`` prints it without a traceback (unless ``debug=true``).
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration or input error: key, value, and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key}={value!r} is not valid: {allowed}")
