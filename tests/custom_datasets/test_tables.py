"""The one table helper: text columns as written out by hand here, markdown tables read back by a CommonMark + GFM
table parser (markdown-it-py), cell for cell, alignment included."""

from markdown_it import MarkdownIt

from custom_datasets._tables import markdown_table, text_table

ROWS = [["source", "type", "rows", "tokens"], ["pairs", "instruct", "8,000", "1,234,567"], ["text", "text", "2", "578"]]


def test_text_columns_are_flush_left_then_flush_right():
    assert text_table(ROWS, left=2) == [
        "source  type       rows     tokens",
        "pairs   instruct  8,000  1,234,567",
        "text    text          2        578",
    ]


def _parsed(lines: list[str]) -> tuple[list[list[str]], list[str]]:
    tokens = MarkdownIt("commonmark").enable("table").parse("\n".join(lines) + "\n")
    rows, row, aligns = [], None, []
    for t in tokens:
        if t.type == "tr_open":
            row = []
        elif t.type in ("th_open", "td_open"):
            if t.type == "th_open":
                aligns.append((t.attrGet("style") or "").removeprefix("text-align:") or "left")
        elif t.type == "inline" and row is not None:
            row.append(t.content)
        elif t.type == "tr_close":
            rows.append(row)
            row = None
    return rows, aligns


def test_a_markdown_table_reads_back_as_its_cells_with_a_pipe_and_a_line_break_in_one():
    rows = [*ROWS, ["a|b", "two\nlines", "1", "2"]]
    parsed, aligns = _parsed(markdown_table(rows, left=2))
    assert parsed == [*ROWS, ["a|b", "two lines", "1", "2"]]
    assert aligns == ["left", "left", "right", "right"]
    html = MarkdownIt("commonmark").enable("table").render("\n".join(markdown_table(rows, left=2)) + "\n")
    assert "<td>a|b</td>" in html and html.count("<tr>") == 4
