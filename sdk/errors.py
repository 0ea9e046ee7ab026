"""Exceptions raised by the lowra SDK.

Every error subclasses ``LowraError`` so callers can catch the SDK's failures in
one place, and also the matching built-in type so generic handlers keep working.
``LowraError`` itself comes from the device runtime (the dependency points that
way), so one ``except LowraError`` catches refusals from both sides.
"""

from __future__ import annotations

from lowra.device_runtime.errors import ConfigError, LowraError

__all__ = [
    "AdapterFileError",
    "BaseModelNotFoundError",
    "BudgetError",
    "ConfigError",
    "DatasetError",
    "LowraError",
]


class BaseModelNotFoundError(LowraError, FileNotFoundError):
    """The base model could not be found or converted."""


class DatasetError(LowraError, ValueError):
    """A user dataset is missing, malformed or too small."""


class AdapterFileError(LowraError, ValueError):
    """An adapter folder is missing files, malformed, or cannot be written."""


class BudgetError(LowraError, ValueError):
    """A bit budget that no storable choice meets (or that is outside what the widths allow)."""
