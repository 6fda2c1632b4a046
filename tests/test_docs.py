"""The README stays a short front page and every link in it and in docs/ resolves: files, and headings by
GitHub's anchor rule. Every make target is documented, every preset is in the README's table."""

import re

from markdown_it import MarkdownIt
from support import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _tokens(path):
    return MarkdownIt("commonmark").enable("table").parse(path.read_text(encoding="utf-8"))


def _links(path) -> list[str]:
    out = []
    for tok in _tokens(path):
        for child in tok.children or []:
            if child.type == "link_open":
                out.append(child.attrGet("href"))
            elif child.type == "image":
                out.append(child.attrGet("src"))
    return out


def anchors(path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation but hyphens and spaces removed, spaces to hyphens."""
    toks = _tokens(path)
    out = set()
    for i, tok in enumerate(toks):
        if tok.type == "heading_open":
            text = "".join(c.content for c in toks[i + 1].children or [] if c.type in ("text", "code_inline"))
            out.add(re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-"))
    return out


def test_every_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for href in _links(page):
            if re.match(r"[a-z]+://", href):
                continue  # outside the repo: not checked offline
            target, _, anchor = href.partition("#")
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                broken.append(f"{page.name}: {href} (no {path})")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{page.name}: {href} (no heading #{anchor} in {path.name})")
    assert not broken, broken


def test_the_readme_is_short_and_links_every_page_of_docs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 200
    linked = {(REPO / h.partition("#")[0]).resolve() for h in _links(REPO / "README.md") if not h.startswith("http")}
    assert set(PAGES[1:]) <= linked, set(PAGES[1:]) - linked


def test_every_make_target_and_every_preset_is_documented():
    targets = re.findall(r"^([a-z][a-z-]*):.*##", (REPO / "Makefile").read_text(), re.M)
    reference = (REPO / "docs" / "make-targets.md").read_text(encoding="utf-8")
    assert len(targets) > 15 and [t for t in targets if f"`make {t}" not in reference] == []
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    presets = [p.stem for p in (REPO / "configs").glob("*.yaml")]
    assert presets and [p for p in presets if f"| `{p}`" not in readme] == []
