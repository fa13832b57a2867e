"""A tiny two-format document builder: every call adds the same content to an HTML page and a Markdown file.

The HTML is self-contained (inline CSS, images as data: URIs, no scripts, no external URLs) so a report mailed
or archived by CI reads offline. Every piece of text is escaped: labels, error messages and model paths come from
users and backends.
"""

from __future__ import annotations

import base64
import html
import math
import re
import urllib.parse
from pathlib import Path
from typing import Any

import pandas as pd

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #0CD79F; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; border: 1px solid #eee; box-sizing: border-box; }
figure { display: inline-block; max-width: 100%; margin: .4em .8em .4em 0; vertical-align: top; }
figure.half { max-width: calc(50% - 1.2em); }
@media (max-width: 900px) { figure.half { max-width: 100%; } }
.warn { background: #fff4e5; border-left: 4px solid #EBB839; padding: .5em 1em; }
.fail { background: #fdecef; border-left: 4px solid #F0496E; padding: .5em 1em; }
.pass { background: #e8fbf5; border-left: 4px solid #0CD79F; padding: .5em 1em; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; white-space: pre-wrap; }
nav a { margin-right: 1em; }
"""

# "0.85", "1e-05", "128K", "≥128K", "50%", "108 µs": right-aligned
_NUMERIC = re.compile(r"^[<≥]?-?[\d.,]+(e[-+]?\d+)?[KM]?%?( (s|ms|µs))?$")


def fmt(value: Any) -> str:
    """A table cell as text: blank for missing, 4 significant digits for floats, lists joined."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return str(value)


# CommonMark 0.31 section 2.4: any ASCII punctuation may be backslash-escaped and then renders as itself. These are
# the ones that can start markup inside a line: links and images ([ ]; "!" is harmless once "[" is escaped), raw
# HTML and autolinks (< before a letter, "/", "!" or "?", or with a ">" later on the line: an e-mail autolink may
# start with a digit), entity references (& before "name;" or "#123;"), code (`), emphasis (* and _ at a word edge;
# GFM leaves intraword _ alone), strikethrough (~), math on GitHub ($), table cells (|), headings (#), and the
# backslash itself. Everything else stays as typed, so the .md reads as plain text: "a >= b", "<4K", "R&D", "x!".
_MD_INLINE = re.compile(r"[\\`*\[\]~$|#]|<(?=[A-Za-z/!?]|[^\n]*>)|&(?=#?\w+;)|(?<![^\W_])_|_(?![^\W_])")
# Block markup that only counts at the start of a line: block quotes, list items, setext underlines, ordered lists
# ("1. ").
_MD_LINE_START = re.compile(r"^([->+=]|\d{1,9}(?=[.)](?:\s|$)))")


def md_escape(text: str) -> str:
    """Text that renders as itself in CommonMark/GFM, also inside a table cell: markup characters are
    backslash-escaped (so a label like ``![x](https://host/img.png)`` is text, not a remote image), and line
    breaks become ``<br>`` (the one piece of HTML added, so that a cell or paragraph stays one line)."""
    out = _MD_INLINE.sub(lambda m: "\\" + m.group(0), text.replace("\r\n", "\n").replace("\r", "\n"))
    return "<br>".join(_MD_LINE_START.sub(_escape_line_start, line.lstrip()) for line in out.split("\n"))


def _escape_line_start(m: re.Match[str]) -> str:
    # A backslash before a digit is not an escape: for "1. " it goes before the "." instead.
    return m.group(0) + "\\" if m.group(0)[0].isdigit() else "\\" + m.group(0)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


class Document:
    def __init__(self, title: str) -> None:
        self.title = title
        self.html: list[str] = []
        self.md: list[str] = [f"# {md_escape(title)}", ""]
        self.sections: list[tuple[str, str]] = []

    def section(self, title: str) -> None:
        anchor = slug(title)
        self.sections.append((anchor, title))
        self.html.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')
        self.md += [f"## {md_escape(title)}", ""]

    def subsection(self, title: str) -> None:
        self.html.append(f"<h3>{html.escape(title)}</h3>")
        self.md += [f"### {md_escape(title)}", ""]

    def para(self, text: str, css: str | None = None) -> None:
        cls = f' class="{css}"' if css else ""
        self.html.append(f"<p{cls}>{html.escape(text)}</p>")
        self.md += [f"> {md_escape(text)}" if css else md_escape(text), ""]

    def pre(self, text: str) -> None:
        self.html.append(f"<pre>{html.escape(text)}</pre>")
        # A fence longer than any run of backticks inside, so the text cannot close it (CommonMark 4.5).
        fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))
        self.md += [fence, text, fence, ""]

    def table(self, df: pd.DataFrame, collapsed: str | None = None) -> None:
        """A table; with ``collapsed`` (a summary line) the HTML puts it in a closed <details> element."""
        if df.empty:
            self.para("(none)")
            return
        cols = [str(c) for c in df.columns]
        rows = [[fmt(v) for v in r] for r in df.itertuples(index=False)]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f'<td class="num">{html.escape(v)}</td>' if _NUMERIC.match(v)
                             else f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in rows)
        table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        if collapsed:
            table = f"<details><summary>{html.escape(collapsed)}</summary>{table}</details>"
        self.html.append(table)
        if collapsed:
            self.md += [f"**{md_escape(collapsed)}**", ""]
        self.md.append("| " + " | ".join(md_escape(c) for c in cols) + " |")
        self.md.append("|" + "|".join("---" for _ in cols) + "|")
        self.md += ["| " + " | ".join(md_escape(v) for v in r) + " |" for r in rows]
        self.md.append("")

    def image(self, png: Path, alt: str, md_dir: Path, half: bool = False) -> None:
        """Embedded in the HTML as a data: URI; linked by relative path from the Markdown. ``half``: at most half
        the page wide in the HTML, so that two such plots (a heatmap per run) sit side by side."""
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        cls = ' class="half"' if half else ""
        self.html.append(f'<figure{cls}><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></figure>')
        rel = png.resolve().relative_to(md_dir.resolve()).as_posix() if png.resolve().is_relative_to(
            md_dir.resolve()) else png.resolve().as_posix()
        # Percent-encoded, so that spaces or parentheses in an --out folder cannot end the link destination.
        self.md += [f"![{md_escape(alt)}]({urllib.parse.quote(rel)})", ""]

    def render_html(self) -> str:
        nav = " ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in self.sections)
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
                f"<title>{html.escape(self.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
                f"<h1>{html.escape(self.title)}</h1>\n<nav>{nav}</nav>\n" + "\n".join(self.html)
                + "\n</body>\n</html>\n")

    def render_md(self) -> str:
        return "\n".join(self.md).rstrip() + "\n"
