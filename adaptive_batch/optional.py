"""Optional dependencies, imported only where a feature needs them."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or fail with the install command that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the package {module.split('.')[0]!r}: "
            f"pip install 'adaptive-batch[{extra}]'"
        ) from error
