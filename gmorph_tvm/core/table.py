"""Markdown tables, rendered in one place (benchmark comparisons, ``gmorph-tvm bench`` rows)."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: Sequence[bool] | None = None,
                   title: str | None = None) -> str:
    """``header`` and ``rows`` (cells already formatted) as a markdown table; ``numeric[i]`` right-aligns
    column ``i`` (default: every column but the first); ``title`` is printed bold above it."""
    numeric = [i > 0 for i in range(len(header))] if numeric is None else list(numeric)
    if len(numeric) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError(f"a table of {len(header)} columns got rows of {sorted({len(r) for r in rows})} cells")
    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" if right else "---" for right in numeric) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
