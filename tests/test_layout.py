"""The package layout shows the data flow, and no import crosses a boundary it should not.

Zones: ``contract`` (messages and protocols), the stages ``sample``, ``load``, ``probe``,
``select``, ``train``, ``policies``, ``observe`` (loggers listening to the sampler),
``integrations`` (Lightning, Accelerate), the shared helpers (``errors``, ``optional``), the
top-level facade (``__init__``, ``nodes``), and the application wing ``app``. Every import of every module
is read from its source (``ast``), resolved, and checked:

* the library never imports the app wing; the app imports no private name of the library;
* the contract imports nothing else of the library; an observer only the contract;
* policies import only the contract (and never ``torch.utils.data``);
* a stage imports no policy and not the facade, and another package only through its public
  names (``from ..load import ChunkAssembler``, not ``from ..load.chunks import ...``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adaptive_batch"
STAGES = ("sample", "load", "probe", "select", "train")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def zone(name: str) -> str:
    parts = name.split(".")
    if parts[0] != "adaptive_batch":
        return "external"
    if len(parts) == 1 or parts[1] == "nodes":
        return "top"
    if parts[1] in ("errors", "optional"):
        return "shared"
    return parts[1]


def imports_of(path: Path, root: Path) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` for each import in the file, resolved; a name
    that is itself a module counts as importing that module."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def exists(module: str) -> bool:
        base = root.parent / module.replace(".", "/")
        return (base / "__init__.py").exists() or base.with_suffix(".py").exists()

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append(
                    (target, None, node.lineno)
                    if exists(target)
                    else (base, alias.name, node.lineno)
                )
    return found


def violations(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        source = module_name(path, root)
        here = zone(source)
        for target, name, line in imports_of(path, root):
            there = zone(target)
            where = f"{source}:{line} imports {target}" + (f".{name}" if name else "")
            if there == "external":
                if target.startswith("torch.utils.data") and here in ("policies", "contract"):
                    problems.append(f"{where}: rules never touch torch.utils.data")
            elif here == "app":
                parts = [*target.split(".")[1:], name or ""]
                hidden = [p for p in parts if p.startswith("_") and not p.endswith("__")]
                if hidden and there != "app":
                    problems.append(f"{where}: the app uses the library's public names only")
            elif there == "app":
                problems.append(f"{where}: the library never imports the app wing")
            elif here == "contract" and there not in ("contract", "shared"):
                problems.append(f"{where}: the contract depends on nothing else")
            elif here == "observe" and there not in ("observe", "contract", "shared"):
                problems.append(f"{where}: an observer knows only the contract")
            elif here == "policies" and there not in ("policies", "contract", "shared"):
                problems.append(f"{where}: policies know only the contract")
            elif here in STAGES and there in ("top", "policies"):
                problems.append(f"{where}: a stage knows no policy and not the facade")
            elif (
                here in (*STAGES, "policies")
                and there not in (here, "shared")
                and len(target.split(".")) > 2
            ):
                problems.append(f"{where}: use the package's public names, not its modules")
    return problems


def test_no_import_crosses_a_boundary():
    assert violations(PACKAGE) == []


def test_the_check_catches_each_kind_of_crossing(tmp_path):
    root = tmp_path / "adaptive_batch"
    files = {
        "__init__.py": "",
        "app/__init__.py": "from .._compat import install\n",
        "contract/__init__.py": "from ..sample import AdaptiveBatchSampler\n",
        "policies/__init__.py": "import torch.utils.data\nfrom ..probe import HeadProbe\n",
        "sample/__init__.py": "from ..app import cli\nfrom ..load.chunks import ChunkAssembler\n",
        "load/__init__.py": "from ..policies import EDBA\nfrom ..contract import Feedback\n",
        "load/chunks.py": "",
        "probe/__init__.py": "",
        "_compat.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    found = "\n".join(violations(root))
    for expected in (
        "app:1 imports adaptive_batch._compat.install: the app uses",
        "contract:1 imports adaptive_batch.sample.AdaptiveBatchSampler: the contract",
        "policies:1 imports torch.utils.data: rules never",
        "policies:2 imports adaptive_batch.probe.HeadProbe: policies know only",
        "sample:1 imports adaptive_batch.app.cli: the library never imports",
        "sample:2 imports adaptive_batch.load.chunks.ChunkAssembler: use the package's public",
        "load:1 imports adaptive_batch.policies.EDBA: a stage knows no policy",
    ):
        assert expected in found, expected
    assert "load:2" not in found  # the contract's public names are fine


def test_the_stages_are_packages_in_the_flow():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == {"contract", *STAGES, "policies", "observe", "integrations", "app"}
    for number, stage in enumerate(("sample", "load", "probe", "select", "train"), start=1):
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text())) or ""
        assert doc.startswith(f"Stage {number}, {stage}:"), stage


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p, PACKAGE)
)
def test_modules_stay_small(path):
    # One concept per module (torchdata's nodes are 50-200 lines; a few of ours run longer).
    assert len(path.read_text().splitlines()) <= 400, module_name(path, PACKAGE)
