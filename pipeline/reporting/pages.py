"""Small standalone HTML pages for the report: the page itself, tables, red banners."""

from __future__ import annotations

import html
from collections.abc import Sequence

import pandas as pd

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 14px; color: #222;
       margin: 12px; background: #fff; }
h1 { font-size: 18px; margin: 0 0 8px 0; } h2 { font-size: 15px; margin: 16px 0 6px 0; }
table { border-collapse: collapse; margin: 6px 0 12px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num, th.num { text-align: right; }
.banner { background: #b00020; color: #fff; padding: 8px 12px; font-weight: bold; margin: 0 0 10px 0; }
.note { color: #555; } .failed { color: #b00020; font-weight: bold; }
"""


def html_page(title: str, body: str) -> str:
    """A standalone HTML page (the report shows each one in a frame of its own)."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def banner(lines: Sequence[str]) -> str:
    """Red banners, one per non-empty line."""
    return "".join(f'<div class="banner">{html.escape(line)}</div>\n' for line in lines if line)


def table_html(frame: pd.DataFrame, numeric: Sequence[str] = ()) -> str:
    """pandas' to_html with the page's styling; `numeric` columns are right-aligned."""
    text = frame.to_html(index=False, escape=True, border=0, na_rep="", classes="data")
    for column in numeric:
        text = text.replace(f"<th>{html.escape(column)}</th>", f'<th class="num">{html.escape(column)}</th>')
    return text
