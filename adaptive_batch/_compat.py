"""The module paths of adaptive_batch 0.1, still importable (with a ``DeprecationWarning``).

The library was regrouped into stage packages; code that imported a module by its old path
(``from adaptive_batch.sampler import fold_tail``) keeps working: the old name is an alias of
the module's new home. Public names are best imported from :mod:`adaptive_batch` itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED = {
    "adaptive_batch.sampler": "adaptive_batch.sample",
    "adaptive_batch.ledger": "adaptive_batch.sample.ledger",
    "adaptive_batch.buckets": "adaptive_batch.sample.buckets",
    "adaptive_batch.distributed": "adaptive_batch.sample.distributed",
    "adaptive_batch.indexed": "adaptive_batch.load.indexed",
    "adaptive_batch.batch_structure": "adaptive_batch.load.batch_structure",
    "adaptive_batch.head_gradients": "adaptive_batch.probe.head_gradients",
    "adaptive_batch.per_sample": "adaptive_batch.probe.per_sample",
    "adaptive_batch.probe_result": "adaptive_batch.contract.messages",
    "adaptive_batch.feedback": "adaptive_batch.contract.messages",
    "adaptive_batch.filter": "adaptive_batch.select.filter",
    "adaptive_batch.lr_coupling": "adaptive_batch.train.lr_coupling",
    "adaptive_batch.per_layer": "adaptive_batch.train.per_layer",
    "adaptive_batch._optional": "adaptive_batch.optional",
    "adaptive_batch.cli": "adaptive_batch.app.cli",
    "adaptive_batch.demo": "adaptive_batch.app.demo",
    "adaptive_batch.runner": "adaptive_batch.app.runner",
    "adaptive_batch.recipes": "adaptive_batch.app.recipes",
    "adaptive_batch.bench": "adaptive_batch.app.bench",
}


def new_name(old: str) -> str | None:
    """The module an old path now names (``None`` if it did not move)."""
    for before, after in MOVED.items():
        if old == before or old.startswith(before + "."):
            return after + old[len(before) :]
    return None


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object = None, target: object = None):  # type: ignore[override]
        target_name = new_name(fullname)
        if target_name is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=False)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        target = new_name(spec.name)
        assert target is not None
        warnings.warn(
            f"{spec.name} moved to {target}; import public names from adaptive_batch",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(target)

    def exec_module(self, module: ModuleType) -> None:
        pass


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
