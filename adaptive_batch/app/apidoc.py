"""Render docs/api.md from the public names' signatures and docstrings.

    python -m adaptive_batch.app.apidoc > docs/api.md

A test compares the committed file with this output, so the reference never drifts from the code.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

MODULES = (
    "adaptive_batch",
    "adaptive_batch.policies",
    "adaptive_batch.contract",
    "adaptive_batch.probe",
    "adaptive_batch.nodes",
)
SKIP = {
    "__version__",
    "selection_rule_of",
    "sizing_rule_of",
    "probe_scope_of",
    "layer_rule_of",
    "plan_rule_of",
}


def _public(module_name: str) -> list[tuple[str, Any]]:
    """The module's public classes and functions (constants and aliases are documented where
    they are used)."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", [])
    objects = [(n, getattr(module, n)) for n in names if n not in SKIP]
    return [(n, o) for n, o in objects if inspect.isclass(o) or inspect.isfunction(o)]


def _signature(name: str, obj: Any) -> str:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    text = str(signature).replace("'", "")
    text = re.sub(r"<function (\w+) at 0x[0-9a-f]+>", r"\1", text)  # no memory addresses
    text = re.sub(r"ForwardRef\((\w+)\)", r"\1", text)
    if inspect.isclass(obj):
        text = text.removesuffix(" -> None")
    return f"{name}{text}"


def _methods(cls: type) -> list[tuple[str, Any]]:
    """The documented members of ``cls`` and of the library's own mixins it is built from (not
    its deprecated names), each once."""
    out, seen = [], set()
    own = [c for c in cls.__mro__ if c.__module__.startswith("adaptive_batch")]
    for base in (c for c in own if c is cls or not c.__module__.endswith("deprecated")):
        for name, member in vars(base).items():
            if name in seen or (
                name.startswith("_") and name not in ("__call__", "__iter__", "__len__")
            ):
                continue
            seen.add(name)
            if (callable(member) or isinstance(member, property)) and inspect.getdoc(member):
                out.append((name, member))
    return out


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python -m adaptive_batch.app.apidoc > docs/api.md`; a test",
        "keeps this file in step with the code.",
        "",
    ]
    documented: list[Any] = []
    for module_name in MODULES:
        lines += [f"## `{module_name}`", ""]
        module_doc = inspect.getdoc(importlib.import_module(module_name))
        if module_doc:
            lines += [module_doc.split("\n\n")[0], ""]
        for name, obj in _public(module_name):
            if any(obj is o for o in documented):
                continue  # documented under the first module that exports it
            documented.append(obj)
            kind = "class" if inspect.isclass(obj) else "function"
            lines += [f"### `{_signature(name, obj)}`", "", f"*{kind}*", ""]
            lines += [inspect.getdoc(obj) or "(no docstring)", ""]
            if inspect.isclass(obj):
                for method_name, member in _methods(obj):
                    if isinstance(member, property):
                        lines += [f"#### `{name}.{method_name}` (property)", ""]
                    else:
                        lines += [f"#### `{name}.{_signature(method_name, member)}`", ""]
                    lines += [inspect.getdoc(member) or "", ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
