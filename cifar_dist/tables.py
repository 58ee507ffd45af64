"""Plain-text tables for the terminal: the one formatter behind `compare`, the sweep's status and its dry run."""

from __future__ import annotations

import re

# A cell that reads as a number ("12", "-0.5", "73.20%", "1e-3", "-" for none): such columns are right-aligned.
_NUMERIC = re.compile(r"-|[+-]?\d[\d,_]*(\.\d+)?([eE][+-]?\d+)?%?")


def format_table(rows: list[list[str]], header: list[str] | None = None) -> str:
    """Columns two spaces apart, trailing spaces trimmed. The first column is left-aligned; any other
    column whose cells below the header all read as numbers is right-aligned, so digits line up."""
    table = [[str(c) for c in row] for row in ([header] if header else []) + rows]
    if not table:
        return ""
    body = table[1:] if header else table
    width = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = [i > 0 and bool(body) and all(_NUMERIC.fullmatch(row[i]) for row in body) for i in range(len(width))]
    return "\n".join("  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, width, right)).rstrip()
                     for row in table)
