"""
The docs prove their claims by naming tests: every test a document names exists, so a renamed
or removed test cannot leave a claim behind that nothing proves any more.
"""

from __future__ import annotations

import re

import settings
from tasks.releases import RELEASES

DOCUMENTS = [settings.PROJECT_DIR / "README.md", *sorted((settings.PROJECT_DIR / "docs").glob("*.md"))]


def test_every_test_the_docs_name_exists():
    defined = {
        name
        for path in (settings.PROJECT_DIR / "tests").rglob("test_*.py")
        for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)
    }
    named = {(path.name, name) for path in DOCUMENTS for name in re.findall(r"`(test_\w+)`", path.read_text())}
    assert len(named) > 20, "the docs name too few tests for this check to mean anything"
    missing = sorted((document, name) for document, name in named if name not in defined)
    assert missing == [], f"the docs name tests that do not exist: {missing}"


def test_every_link_between_documents_resolves():
    for path in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#:]+)\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


def test_the_readme_says_of_every_known_release_whether_it_is_tested():
    rows = [line for line in (settings.PROJECT_DIR / "README.md").read_text().splitlines() if line.startswith("| ")]
    for release in RELEASES:
        row = next((row for row in rows if release.title in row), None)
        assert row, f"README's table of supported systems does not name {release.title}"
        state = row.split("|")[2].strip()
        assert state.split(":")[0] == ("tested" if release.tested else "untested"), row
