"""Every reference to a document resolves inside the repository: the file and its anchor."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["README.md", "docs", "rlhfkit", "tests", "configs", "benchmarks", "examples", "Makefile"]
# docs/NAME.md or docs/NAME.md#anchor, as code and prose cite them
CITATION = re.compile(r"docs/([\w.-]+\.md)(#[\w-]+)?")
# markdown links to a local file: [text](path) or [text](path#anchor)
LINK = re.compile(r"\]\((?!https?:|#|mailto:)([^)\s#]+)(#[^)\s]+)?\)")
# a citation list such as "docs/pitfalls.md#9, #10, #11"
MORE_ANCHORS = re.compile(r"docs/([\w.-]+\.md)#[\w-]+((?:(?:, | and )#[\w-]+)+)")


def _files() -> list[Path]:
    out = []
    for name in SOURCES:
        path = ROOT / name
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += [p for p in path.rglob("*") if p.suffix in (".py", ".md", ".yaml", ".jinja") and p.is_file()]
    return [p for p in out if p != Path(__file__).resolve()]  # this file's patterns are not citations


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = doc.read_text(encoding="utf-8")
    ids = set(re.findall(r'<a id="([^"]+)"></a>', text))
    return ids | {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_cited_document_and_anchor_exists():
    problems, checked = [], 0
    for path in _files():
        text = path.read_text(encoding="utf-8", errors="replace")
        refs = [(ROOT / "docs" / name, anchor) for name, anchor in CITATION.findall(text)]
        for name, rest in MORE_ANCHORS.findall(text):
            refs += [(ROOT / "docs" / name, a) for a in re.findall(r"#[\w-]+", rest)]
        if path.suffix == ".md":
            refs += [((path.parent / target).resolve(), anchor) for target, anchor in LINK.findall(text)]
        for target, anchor in refs:
            checked += 1
            where = path.relative_to(ROOT)
            if not target.exists():
                problems.append(f"{where}: {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target} missing")
            elif anchor and target.suffix == ".md" and anchor[1:] not in _anchors(target):
                problems.append(f"{where}: {target.name}{anchor} has no such anchor")
    assert checked >= 20  # the pitfall citations alone are more
    assert not problems, "\n".join(problems)


def test_the_pitfalls_cited_are_the_fifteen_documented():
    anchors = _anchors(ROOT / "docs" / "pitfalls.md")
    assert {str(n) for n in range(1, 16)} <= anchors
    cited = set()
    for path in _files():
        text = path.read_text(encoding="utf-8", errors="replace")
        cited |= {a for _, a in CITATION.findall(text) if a and _ == "pitfalls.md"}
    assert cited and all(a[1:] in anchors for a in cited)
