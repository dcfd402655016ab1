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
