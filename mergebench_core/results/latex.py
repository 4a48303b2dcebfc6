"""The LaTeX leaderboard: a booktabs table that fits the page it is pasted into.

An eight-task table with seeds is far wider than a column, and wider than a page: by default it is a `table*` (the
full text width of a two-column paper; an ordinary `table` in a one-column one), set compactly (narrow column gaps,
the ± std in small type), and scaled down to the line width when it is still too wide — never up. The preamble
needs `\\usepackage{booktabs}` and `\\usepackage{graphicx}` (for the scaling).
"""

from __future__ import annotations

from collections.abc import Sequence

from mergebench_core.results.labels import TASK_SPECIFIC_NOTE, settings_text
from mergebench_core.results.rows import Row, Table

FLOATS = ("table*", "table")
"""`table*` spans both columns of a two-column paper (the default: eight tasks do not fit one); `table` takes one."""

_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                   "±": r"$\pm$", "×": r"$\times$", "…": r"\ldots{}"}
SHRINK_TO_LINE = r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%"
"""Scales the tabular down to the line width when it is wider, and leaves it alone when it fits (graphicx's \\width
is the natural width of the box being scaled)."""
WRAP_LABELS_AT = 32
"""Labels longer than this (in characters) wrap, within a label column `LABEL_COLUMN` wide."""
LABEL_COLUMN = "p{14em}"
WRAPPED_LABEL = r"\raggedright\hangindent=1em "
"""Begins a wrapped label: ragged right, continuation lines indented so that each row's start stands out."""


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


def _label(r: Row) -> str:
    text = latex_escape(r.name) + (r"$^\dagger$" if r.task_specific else "")
    settings = r.settings
    return text + (f" ({latex_escape(', '.join(settings))})" if settings else "")


def _key(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in name)


def latex_table(table: Table, float_env: str = "table*") -> str:
    """A booktabs table: numbers right-aligned, each row's ± std on a line of small type below its means (rows of
    several seeds only, so columns stay one number wide), a rule after the reference rows, the best method bold and
    the second underlined in each marked column (`Table.marks`); labels longer than `WRAP_LABELS_AT` characters
    wrap; the whole scaled down to the line width when still wider."""
    if float_env not in FLOATS:
        raise ValueError(f"LaTeX float {float_env!r}: use one of {', '.join(FLOATS)}")
    cols = table.columns
    wrap = max((len(r.label()) for r in table.rows), default=0) > WRAP_LABELS_AT
    spec = (LABEL_COLUMN if wrap else "l") + ("r" if table.aggregated else "") + "r" * len(cols)
    header = ["Method", *([r"$n$"] if table.aggregated else []), *(latex_escape(c.header) for c in cols)]
    marks = {c.id: table.marks(c) for c in cols}

    def lines_of(r: Row) -> list[str]:
        label = _label(r)
        cells = [WRAPPED_LABEL + label if wrap else label, *([str(r.n)] if table.aggregated else [])]
        stds = ["", *([""] if table.aggregated else [])]
        for c in cols:
            stat = c.stat(r)
            value = c.fmt(stat.mean)
            mark = marks[c.id].get(id(r)) if r.kind != "reference" else None
            if value and mark == 1:
                value = rf"\textbf{{{value}}}"
            elif value and mark == 2:
                value = rf"\underline{{{value}}}"
            cells.append(value)
            stds.append(rf"{{\scriptsize$\pm${c.fmt(stat.std)}}}" if stat.std is not None else "")
        out = [" & ".join(cells) + r" \\"]
        if any(stds):
            out.append(" & ".join(stds) + r" \\[1pt]")
        return out

    marked = any(marks.values())
    caption = latex_escape(table.title)
    if marked:
        caption += r". Best method in \textbf{bold}, second \underline{underlined}"
    if table.aggregated:
        caption += r"; mean over $n$ seeds, with the sample standard deviation ($\pm$) below"
    lines = [f"% {table.title}", r"% needs \usepackage{booktabs} and \usepackage{graphicx}",
             rf"\begin{{{float_env}}}[t]", r"\centering", r"\small", rf"\caption{{{caption}.}}",
             rf"\label{{tab:{_key(table.modelpool)}-{_key(table.taskpool)}}}",
             r"\setlength{\tabcolsep}{3pt}", SHRINK_TO_LINE, rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(header) + r" \\", r"\midrule"]
    lines += [x for r in table.references for x in lines_of(r)]
    if table.references and table.methods:
        lines.append(r"\midrule")
    lines += [x for r in table.methods for x in lines_of(r)]
    lines += [r"\bottomrule", r"\end{tabular}}"]
    if table.task_specific:
        note = TASK_SPECIFIC_NOTE[0].upper() + TASK_SPECIFIC_NOTE[1:]
        lines += [r"\par\smallskip", rf"{{\footnotesize $^\dagger$\,{note}.\par}}"]
    lines.append(rf"\end{{{float_env}}}")
    lines += [f"% FAILED {c.method} {settings_text(c.params) if c.params else ''} seed={c.seed}: "
              f"{(c.error or '').splitlines()[0] if c.error else ''}" for c in table.failed]
    return "\n".join(lines)


def latex_tables(tables: Sequence[Table], float_env: str = "table*") -> str:
    return "\n\n".join(latex_table(t, float_env) for t in tables)
