"""The documentation's relative links lead somewhere: every file and heading they name exists.

Tests check behaviour, not wording; this only checks that the pages' links are not broken.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO

PAGES = sorted([REPO / "README.md", REPO / "data_README.md", *(REPO / "docs").rglob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def links(page: Path) -> list[str]:
    """The targets of the page's Markdown links, outside fenced code blocks."""
    return LINK.findall(FENCE.sub("", page.read_text()))


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def test_the_front_page_links_the_reference_pages():
    targets = {t.split("#")[0] for t in links(REPO / "README.md")}
    assert {"docs/cli.md", "docs/data.md", "docs/run-folder.md", "docs/multi-gpu-and-sweeps.md",
            "docs/testing.md", "docs/performance.md", "data_README.md"} <= targets


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files_and_headings(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            broken.append(f"{target}: no heading with that anchor in {file.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)
