"""The project's Markdown documents: every relative link resolves, and they speak about the project.

A relative link must name an existing file (or folder), and an anchor must name a heading of the
target document (GitHub's heading ids). The documents describe the project as it is, so they never
refer to work sessions or issue numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").rglob("*.md")])

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
_FORBIDDEN = re.compile(r"\bsessions?\b|\bissues?\s*(?:#|no\.?|number)?\s*\d+|#\d+\b", re.I)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (where brackets are code, not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _anchor(heading: str) -> str:
    """GitHub's id of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = _anchor(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """The relative links of ``path`` that name no existing file, or no heading of their target."""
    broken = []
    for target in _LINK.findall(_prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target} (no such heading)")
    return broken


def forbidden_words(text: str) -> list[str]:
    return sorted({m.group(0) for m in _FORBIDDEN.finditer(text)})


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == [], f"{path.relative_to(ROOT)}: broken links"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_speak_about_the_project(path):
    assert forbidden_words(path.read_text(encoding="utf-8")) == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Use the `fused` loss: a guide\n\n## Two\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Title\n[ok](docs/a.md) [ok](docs/a.md#use-the-fused-loss-a-guide) [ok](#title) [web](https://x.org/y)\n"
        "[missing](docs/b.md) [bad anchor](docs/a.md#three) `[code](nowhere.md)`\n"
        "```python\nx = f[0](nowhere.md)\n```\n")
    assert broken_links(doc) == ["docs/b.md (no such file)", "docs/a.md#three (no such heading)"]
    assert forbidden_words("Measured in session 8, as issue 3 asked (see #12).") == ["#12", "issue 3", "session"]
    assert forbidden_words("The sessions of issue #4.") == ["issue #4", "sessions"]
    assert forbidden_words("A training step; the issues below; 3 steps.") == []
