"""Tables as text: aligned columns, CSV or Markdown, from one ``Table`` type.

A table is a ``(title, rows)`` pair, rows being dicts with the same keys, so the numbers can
be checked by tests and rendered in any of the three formats alike.
"""
from __future__ import annotations

import csv
import io
import math
import re
from typing import NamedTuple


class Table(NamedTuple):
    title: str
    rows: list[dict]


def natural(value) -> tuple:
    """A sort key for mixed values, numbers first, names by their numbered parts: cnn5's
    cut 2, then layer2 before layer10, features.9 before features.10."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, ())
    parts = re.split(r"(\d+)", str(value))
    return (1, 0, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))


def format_value(value, missing: str = "-") -> str:
    """One value as the text of a table entry: floats with 2 decimals unless they hold more
    (SSIM, MSE); NaN/None as ``missing``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = f"{value:.2f}"
        return text if float(text) == value else f"{value:.6g}"
    return str(value)


def columns(rows: list[dict]) -> list[str]:
    """Every key of any row, in the order they first appear."""
    return list(dict.fromkeys(k for row in rows for k in row))


def _numeric(rows: list[dict], column: str) -> bool:
    values = [r.get(column) for r in rows if r.get(column) is not None]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def render(tabs: list[Table], fmt: str = "text", extra: list[str] = ()) -> str:
    """``fmt``: text (aligned), csv (``# title`` line, header, rows per table) or markdown;
    ``extra`` lines (notes) follow the tables in text and markdown."""
    out = []
    for title, rows in tabs:
        cols = columns(rows)
        if fmt == "csv":
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(cols)
            writer.writerows([format_value(r.get(c), "") for c in cols] for r in rows)
            out.append(f"# {title}\n{buf.getvalue()}")
            continue
        grid = [[format_value(r.get(c)) for c in cols] for r in rows]
        right = [_numeric(rows, c) for c in cols]
        if fmt == "markdown":
            lines = [f"### {title}", "", "| " + " | ".join(cols) + " |",
                     "|" + "|".join("---:" if r else "---" for r in right) + "|"]
            lines += ["| " + " | ".join(line) + " |" for line in grid]
        else:
            widths = [max([len(c), *(len(line[i]) for line in grid)])
                      for i, c in enumerate(cols)]
            fit = [lambda s, w=w, r=r: s.rjust(w) if r else s.ljust(w)
                   for w, r in zip(widths, right)]
            lines = [title, "  ".join(f(c) for f, c in zip(fit, cols)).rstrip(),
                     "  ".join("-" * w for w in widths)]
            lines += ["  ".join(f(s) for f, s in zip(fit, line)).rstrip() for line in grid]
        out.append("\n".join(lines) + "\n")
    if extra and fmt != "csv":
        lead = "Note: " if fmt == "text" else "**Note:** "
        out.append("\n".join([lead + extra[0], *extra[1:]]) + "\n")
    return "\n".join(out)
