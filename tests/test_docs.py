"""The docs stay in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

from adaptive_batch.app.apidoc import render

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_is_generated_from_the_current_docstrings():
    committed = (ROOT / "docs" / "api.md").read_text()
    assert committed == render(), (
        "docs/api.md is stale: run python -m adaptive_batch.app.apidoc > docs/api.md"
    )


def test_relative_links_in_readme_and_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_complete_programs_in_the_docs_run():
    # Blocks that start with "import torch" are whole programs (the rest are fragments showing
    # the lines a loop changes): each runs as written.
    import runpy
    import tempfile

    programs = [
        block
        for page in sorted((ROOT / "docs").glob("*.md"))
        for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)
        if block.startswith("import torch\n")
    ]
    assert programs  # the sequence-model example in probe.md at least
    for program in programs:
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
            file.write(program)
        runpy.run_path(file.name, run_name="__main__")
