"""The documentation's shape: a short README from which every user page is reachable, and no dead relative link.

The API reference itself is built by ``.ci/run`` (``sphinx-build -W``); this file needs no Sphinx.
"""

from __future__ import annotations

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK_RE = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
# pages written on other branches of issue #30's round (PACS: issue 31, explanations: issue 32): drop an entry
# once its page exists (the last test fails until then)
PENDING: set[str] = set()
# Sphinx's own pages: reached from docs/index.md, not from the README
SPHINX_ONLY = {"docs/index.md", "docs/api.md"}


def _text(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _links(rel: str) -> set[str]:
    """The repository files that ``rel`` links to, as paths relative to the repository root."""
    base = os.path.dirname(os.path.join(ROOT, rel))
    targets = (m.group(1) for m in LINK_RE.finditer(_text(rel)))
    return {os.path.relpath(os.path.normpath(os.path.join(base, t)), ROOT) for t in targets if "://" not in t}


def _pages() -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def test_readme_is_a_short_front_door():
    assert len(_text("README.md").splitlines()) <= 150


def test_every_user_page_is_linked_from_the_readme():
    linked = _links("README.md")
    missing = [p for p in _pages() if p not in linked and p not in SPHINX_ONLY]
    assert not missing, f"README.md does not link to {missing}"
    assert "bundle/docs/README.md" in linked  # the model card: the results users read


def test_relative_links_point_to_existing_files():
    dead = {
        (page, target)
        for page in ["README.md", "bundle/docs/README.md", *_pages()]
        for target in _links(page)
        if not os.path.exists(os.path.join(ROOT, target)) and target not in PENDING
    }
    assert not dead, f"dead links (page, target): {sorted(dead)}"


def test_pending_pages_are_still_pending():
    written = sorted(p for p in PENDING if os.path.exists(os.path.join(ROOT, p)))
    assert not written, f"{written} now exist: remove them from PENDING in tests/test_docs.py"
