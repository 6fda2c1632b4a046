"""Tables as text: aligned columns for the console and GitHub markdown for the report files, built one way for the
data table, make data's report.md and make eval's report.md."""

from __future__ import annotations


def text_table(rows: list[list[str]], left: int = 1, gap: str = "  ") -> list[str]:
    """`rows` (the first is the header) as lines of aligned columns: the first `left` columns flush left, the others
    (numbers) flush right, each as wide as its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [gap.join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]


def cell(text: str) -> str:
    """`text` safe inside a markdown table cell: a `|` escaped, a line break a space."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[list[str]], left: int = 1) -> list[str]:
    """`rows` (the first is the header) as a GitHub markdown table: the first `left` columns left-aligned, the
    others right-aligned; every cell escaped."""
    header, *body = rows
    align = "|" + "".join(" --- |" if i < left else " ---: |" for i in range(len(header)))
    return ["| " + " | ".join(cell(c) for c in header) + " |", align,
            *("| " + " | ".join(cell(c) for c in r) + " |" for r in body)]
