"""The HTML leaderboard: one self-contained page (CSS and script inline, nothing fetched from the network).

Each (model pool, task pool) is one table. Numbers are right-aligned in tabular figures, a standard deviation in
small type below its mean, and long labels wrap, so an eight-task table fits a laptop screen without scrolling
sideways. The reference rows (pretrained model, experts) sit in their own shaded block above the methods and stay
there when the methods are sorted; every header sorts its column (click again to reverse); in each score column the
best method is bold and the second underlined (tied rows alike); each row opens (▸) to its full parameters
(non-default ones highlighted, with the default beside them), seeds and cell keys, every metric per task, the
versions that produced it and whatever the method reported (extras). Light and dark follow the system setting, and
a button switches between them.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from typing import Any

from mergebench_core.results.labels import TASK_SPECIFIC_MARK, TASK_SPECIFIC_NOTE
from mergebench_core.results.rows import Column, Row, Table

EXTRAS_LIMIT = 20_000
"""Characters of a row's extras shown in its detail view; longer ones are cut, with a note."""

_CSS = """
:root {
  --bg: #ffffff; --fg: #1d2330; --muted: #5d6677; --line: #d9dde5; --head: #f3f5f8; --ref: #f1f4fa;
  --ref-fg: #3b4a66; --hover: #f7f9fc; --accent: #1f5fbf; --best: #0b3d91; --detail: #fafbfd; --code: #f3f5f8;
  --changed: #fff3c4; --failed: #b42318;
  color-scheme: light;
}
@media (prefers-color-scheme: dark) {
  :root:not([data-theme="light"]) {
    --bg: #14171c; --fg: #e4e7ec; --muted: #9aa3b2; --line: #2e343e; --head: #1c2027; --ref: #1b2230;
    --ref-fg: #b9c6de; --hover: #1a1e25; --accent: #7eb0ff; --best: #a9c8ff; --detail: #171b21; --code: #1e232b;
    --changed: #4a3f12; --failed: #ff8a80;
    color-scheme: dark;
  }
}
:root[data-theme="dark"] {
  --bg: #14171c; --fg: #e4e7ec; --muted: #9aa3b2; --line: #2e343e; --head: #1c2027; --ref: #1b2230;
  --ref-fg: #b9c6de; --hover: #1a1e25; --accent: #7eb0ff; --best: #a9c8ff; --detail: #171b21; --code: #1e232b;
  --changed: #4a3f12; --failed: #ff8a80;
  color-scheme: dark;
}
* { box-sizing: border-box; }
body {
  margin: 0; padding: 2rem clamp(1rem, 3vw, 2.5rem); background: var(--bg); color: var(--fg);
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: .5rem 1.5rem; margin-bottom: 1.5rem; }
h1 { font-size: 1.6rem; margin: 0; font-weight: 650; letter-spacing: -.01em; }
h2 { font-size: 1.2rem; margin: 2.2rem 0 .6rem; font-weight: 620; }
h2 .unit { color: var(--muted); font-weight: 400; font-size: .9rem; margin-left: .4rem; }
h3 { font-size: .8rem; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin: 0 0 .4rem; }
.meta, .help { color: var(--muted); font-size: .9rem; margin: 0; }
.help { margin: .2rem 0 0; flex-basis: 100%; }
button { font: inherit; color: inherit; }
#theme {
  margin-left: auto; border: 1px solid var(--line); background: var(--head); border-radius: 6px;
  padding: .25rem .7rem; cursor: pointer;
}
.scroll { overflow-x: auto; border: 1px solid var(--line); border-radius: 8px; }
table.lb { border-collapse: collapse; width: 100%; font-size: .93rem; }
table.lb th, table.lb td { padding: .42rem .5rem; border-bottom: 1px solid var(--line); vertical-align: top; }
table.lb thead th {
  background: var(--head); font-weight: 600; position: sticky; top: 0; vertical-align: bottom; font-size: .92em;
  border-bottom: 2px solid var(--line);
}
table.lb thead th.num { text-align: right; }
table.lb thead th.text { text-align: left; }
button.sort {
  border: 0; background: none; padding: 0; cursor: pointer; font-weight: inherit; text-align: inherit;
}
button.sort::after { content: "\\2195"; color: var(--muted); opacity: .45; margin-left: .2rem; font-size: .8em; }
th[aria-sort="ascending"] button.sort::after { content: "\\25B2"; opacity: 1; color: var(--accent); }
th[aria-sort="descending"] button.sort::after { content: "\\25BC"; opacity: 1; color: var(--accent); }
button.sort:focus-visible, button.expand:focus-visible, #theme:focus-visible {
  outline: 2px solid var(--accent); outline-offset: 2px;
}
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.num .sd { display: block; color: var(--muted); font-size: .8em; line-height: 1.2; }
th.label { text-align: left; font-weight: 500; min-width: 11rem; max-width: 26rem; }
table.lb thead th.num { width: 1%; }
th.label .name { white-space: nowrap; }
th.label .set { color: var(--muted); font-weight: 400; }
th.label .mark { color: var(--accent); }
tbody.entry tr.main:hover { background: var(--hover); }
tbody.ref tr.main { background: var(--ref); color: var(--ref-fg); }
tbody.ref tr.main th.label { font-style: italic; }
tbody.refs-end tr.main th, tbody.refs-end tr.main td { border-bottom: 2px solid var(--muted); }
td.best { font-weight: 700; color: var(--best); }
td.second { text-decoration: underline; text-underline-offset: 3px; }
button.expand {
  border: 0; background: none; cursor: pointer; padding: 0 .35rem 0 0; color: var(--muted);
  display: inline-block; transition: transform .12s;
}
button.expand[aria-expanded="true"] { transform: rotate(90deg); color: var(--accent); }
tr.detail > td { background: var(--detail); padding: .9rem 1rem 1.1rem; }
.grid {
  display: flex; flex-wrap: wrap; align-items: flex-start; gap: 1.1rem 2.2rem;
  position: sticky; left: 1rem; max-width: min(100%, calc(100vw - 6rem));
}
.grid > section { flex: 0 1 auto; min-width: 0; max-width: 100%; overflow-x: auto; }
table.kv { border-collapse: collapse; font-size: .86rem; }
table.kv th, table.kv td { border: 0; padding: .1rem .8rem .1rem 0; text-align: left; vertical-align: top; }
table.kv th { color: var(--muted); font-weight: 500; }
table.kv td.num { text-align: right; }
tr.changed td, tr.changed th { background: var(--changed); }
.default { color: var(--muted); font-size: .85em; }
code, pre { font-family: ui-monospace, "SF Mono", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: .82rem; }
pre { background: var(--code); padding: .6rem .8rem; border-radius: 6px; max-height: 18rem; overflow: auto; margin: 0; }
.notes { color: var(--muted); font-size: .88rem; margin: .6rem 0 0; }
.notes p { margin: .15rem 0; }
details.failed { margin-top: .6rem; font-size: .88rem; }
details.failed summary { color: var(--failed); cursor: pointer; }
details.failed li { margin: .3rem 0; }
footer { margin-top: 2.5rem; color: var(--muted); font-size: .85rem; }
@media print { #theme { display: none; } tr.detail { display: none; } }
"""

_SCRIPT = """
(function () {
  "use strict";
  function key(entry, col, numeric) {
    var cell = entry.rows[0].cells[col];
    var raw = cell ? cell.getAttribute("data-v") : null;
    if (numeric) {
      var v = raw === null || raw === "" ? NaN : parseFloat(raw);
      return v;
    }
    return (raw !== null ? raw : cell.textContent).toLowerCase();
  }
  document.querySelectorAll("table.lb").forEach(function (table) {
    var heads = table.querySelectorAll("thead th[aria-sort]");
    table.querySelectorAll("thead button.sort").forEach(function (button) {
      button.addEventListener("click", function () {
        var th = button.parentElement;
        var col = parseInt(button.getAttribute("data-col"), 10);
        var numeric = button.getAttribute("data-type") === "num";
        var now = th.getAttribute("aria-sort");
        var dir = now === "descending" ? "ascending" : now === "ascending" ? "descending"
          : button.getAttribute("data-first");
        heads.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
        th.setAttribute("aria-sort", dir);
        var entries = Array.prototype.slice.call(table.querySelectorAll("tbody.entry:not(.ref)"));
        entries.sort(function (a, b) {
          var x = key(a, col, numeric), y = key(b, col, numeric), order;
          if (numeric) {
            if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y) || a.dataset.i - b.dataset.i; }
            order = x - y;
          } else {
            order = x < y ? -1 : x > y ? 1 : 0;
          }
          if (dir === "descending") { order = -order; }
          return order || a.dataset.i - b.dataset.i;
        });
        entries.forEach(function (e) { table.appendChild(e); });
      });
    });
  });
  document.addEventListener("click", function (event) {
    var button = event.target.closest("button.expand");
    if (!button) { return; }
    var detail = document.getElementById(button.getAttribute("aria-controls"));
    var open = button.getAttribute("aria-expanded") === "true";
    button.setAttribute("aria-expanded", open ? "false" : "true");
    detail.hidden = open;
  });
  var theme = document.getElementById("theme");
  theme.addEventListener("click", function () {
    var root = document.documentElement;
    var dark = root.getAttribute("data-theme") ? root.getAttribute("data-theme") === "dark"
      : window.matchMedia("(prefers-color-scheme: dark)").matches;
    root.setAttribute("data-theme", dark ? "light" : "dark");
  });
}());
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _json_text(value: Any, indent: int = 0, width: int = 88) -> str:
    """JSON indented like `json.dumps(indent=2)`, except that anything fitting on its line stays on one line."""
    flat = json.dumps(value, default=str, ensure_ascii=False)
    if not isinstance(value, (dict, list)) or not value or len(flat) + indent <= width:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {_json_text(v, indent + 2, width)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if not any(isinstance(v, (dict, list)) for v in value):  # numbers: as many on a line as fit
        lines, line = [], ""
        for text in (json.dumps(v, default=str, ensure_ascii=False) for v in value):
            if line and len(pad) + len(line) + len(text) + 2 > width:
                lines.append(line + ",")
                line = ""
            line += (", " if line else "") + text
        return "[\n" + "\n".join(pad + x for x in [*lines, line]) + "\n" + " " * indent + "]"
    items = [pad + _json_text(v, indent + 2, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


def _kv(rows: Sequence[tuple[str, str]], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def _label_html(r: Row) -> str:
    mark = f'<span class="mark" title="{_e(TASK_SPECIFIC_NOTE)}">{TASK_SPECIFIC_MARK}</span>' if r.task_specific else ""
    settings = r.settings
    extra = f' <span class="set">({_e(", ".join(settings))})</span>' if settings else ""
    return f'<span class="name">{_e(r.name)}</span>{mark}{extra}'


def _num_cell(column: Column, r: Row, rank: int | None) -> str:
    stat = column.stat(r)
    cls = "num" + {1: " best", 2: " second"}.get(rank or 0, "")
    title = {1: ' title="best in this column"', 2: ' title="second in this column"'}.get(rank or 0, "")
    value = "" if stat.mean is None else repr(float(stat.mean))
    text = _e(column.fmt(stat.mean))
    if stat.std is not None:
        text += f'<span class="sd"> ± {_e(column.fmt(stat.std))}</span>'
    return f'<td class="{cls}" data-v="{value}"{title}>{text}</td>'


def _params_html(r: Row) -> str:
    if not r.params:
        return '<p class="meta">none</p>'
    rows = []
    for k, v in r.params.items():
        changed = k in r.shown_params
        default = ""
        if changed and r.defaults is not None:
            default = (f' <span class="default">default {_e(_value_text(r.defaults[k]))}</span>'
                       if k in r.defaults else ' <span class="default">not a parameter of the installed method</span>')
        rows.append(f'<tr{" class=changed" if changed else ""}><th>{_e(k)}</th>'
                    f"<td><code>{_e(_value_text(v))}</code>{default}</td></tr>")
    return f'<table class="kv">{"".join(rows)}</table>'


def _cells_html(r: Row) -> str:
    head = "<tr><th>seed</th><th>Avg.</th><th>Norm.</th><th>Merge (s)</th><th>Peak MB</th><th>cell key</th></tr>"
    body = []
    for c in r.cells:
        pct = (lambda v: "" if v is None else f"{100 * v:.1f}")
        sec = (lambda v, d=2: "" if v is None else f"{v:.{d}f}")
        body.append(f'<tr><td class="num">{c.seed}</td><td class="num">{pct(c.mean)}</td>'
                    f'<td class="num">{pct(c.normalized_mean)}</td><td class="num">{sec(c.merge_seconds)}</td>'
                    f'<td class="num">{sec(c.peak_memory_mb, 0)}</td><td><code>{_e(c.cell_key)}</code> '
                    f'<span class="default">{_e(time.strftime("%Y-%m-%d %H:%M", time.gmtime(c.created_at)))} UTC'
                    f"</span></td></tr>")
    return f'<table class="kv">{head}{"".join(body)}</table>'


def _metrics_html(r: Row, tasks: Sequence[str]) -> str:
    names = list(dict.fromkeys(m for t in tasks for m in r.metrics.get(t, {})))
    if not names:
        return ""
    head = "<tr><th>task</th>" + "".join(f"<th>{_e(m)}</th>" for m in names) + "</tr>"
    body = []
    for t in tasks:
        cells = []
        for m in names:
            s = r.metrics.get(t, {}).get(m)
            text = "" if s is None or s.mean is None else f"{s.mean:.4g}" + ("" if not s.std else f" ± {s.std:.2g}")
            cells.append(f'<td class="num">{_e(text)}</td>')
        body.append(f"<tr><th>{_e(t)}</th>{''.join(cells)}</tr>")
    return f'<table class="kv">{head}{"".join(body)}</table>'


def _extras_html(r: Row) -> str:
    extras: Any = r.cells[0].extras if r.n == 1 else {str(c.seed): c.extras for c in r.cells}
    if not extras or (r.n > 1 and not any(c.extras for c in r.cells)):
        return '<p class="meta">none reported</p>'
    text = _json_text(extras)
    note = ""
    if len(text) > EXTRAS_LIMIT:
        note = f'<p class="meta">first {EXTRAS_LIMIT:,} of {len(text):,} characters (`mergebench show` has all)</p>'
        text = text[:EXTRAS_LIMIT] + "\n…"
    return f"<pre>{_e(text)}</pre>{note}"


def _detail(table: Table, r: Row, detail_id: str, span: int) -> str:
    run = [("seeds", _e(", ".join(map(str, r.seeds))) + f" (n={r.n})")]
    if r.preference is not None:
        run.append(("preference", f"<code>{_e(_value_text(r.preference))}</code>"))
    if r.eval_limit is not None:
        run.append(("eval limit", _e(r.eval_limit)))
    if r.task_specific:
        run.append(("model", _e(TASK_SPECIFIC_NOTE)))
    if r.eval_seconds.mean is not None:
        run.append(("eval (s)", _e(f"{r.eval_seconds.mean:.2f}")))
    versions = r.versions
    parts = [
        f"<section><h3>Parameters</h3>{_params_html(r)}</section>" if r.kind != "reference" else "",
        f"<section><h3>Run</h3>{_kv(run)}</section>",
        f"<section><h3>Cells</h3>{_cells_html(r)}</section>",
        f"<section><h3>Metrics per task</h3>{_metrics_html(r, table.tasks)}</section>",
        "<section><h3>Versions</h3>" + (_kv([(k, f"<code>{_e(v)}</code>") for k, v in versions.items()])
                                         if versions else '<p class="meta">not recorded</p>') + "</section>",
        f"<section><h3>Extras</h3>{_extras_html(r)}</section>",
    ]
    return (f'<tr class="detail" id="{detail_id}" hidden><td colspan="{span}"><div class="grid">'
            f'{"".join(parts)}</div></td></tr>')


def _table_html(table: Table, t: int) -> str:
    cols = table.columns
    span = 1 + int(table.aggregated) + len(cols)
    heads = [('<th scope="col" class="text" aria-sort="none"><button type="button" class="sort" data-col="0" '
              'data-type="text" data-first="ascending">Method</button></th>')]
    if table.aggregated:
        heads.append('<th scope="col" class="num" aria-sort="none" title="number of seeds"><button type="button" '
                     'class="sort" data-col="1" data-type="num" data-first="descending">n</button></th>')
    offset = 1 + int(table.aggregated)
    for i, c in enumerate(cols):
        first = "descending" if c.higher_is_better else "ascending"
        title = f' title="{_e(table.primary[c.task].get("metric", "accuracy"))}"' if c.task else ""
        heads.append(f'<th scope="col" class="num" aria-sort="none"{title}><button type="button" class="sort" '
                     f'data-col="{offset + i}" data-type="num" data-first="{first}">{_e(c.header)}</button></th>')
    ranks = {c.id: table.marks(c) for c in cols}
    bodies = []
    for i, r in enumerate(table.rows):
        ref = r.kind == "reference"
        last_ref = ref and i == len(table.references) - 1 and bool(table.methods)
        detail_id = f"t{t}-d{i}"
        cells = [(f'<th scope="row" class="label" data-v="{_e(r.label().lower())}"><button type="button" '
                  f'class="expand" aria-expanded="false" aria-controls="{detail_id}" title="details">▸</button>'
                  f"{_label_html(r)}</th>")]
        if table.aggregated:
            cells.append(f'<td class="num" data-v="{r.n}">{r.n}</td>')
        cells += [_num_cell(c, r, None if ref else ranks[c.id].get(id(r))) for c in cols]
        cls = "entry" + (" ref" if ref else "") + (" refs-end" if last_ref else "")
        bodies.append(f'<tbody class="{cls}" data-i="{i}"><tr class="main">{"".join(cells)}</tr>'
                      f"{_detail(table, r, detail_id, span)}</tbody>")
    notes = [n for n in table.notes() if not n.startswith("FAILED")]
    notes_html = "".join(f"<p>{_e(n)}</p>" for n in notes)
    failed = ""
    if table.failed:
        items = "".join(f"<li><strong>{_e(c.method)}</strong> <code>{_e(_value_text(c.params))}</code> seed {c.seed}: "
                        f"{_e(c.error or '')}</li>" for c in table.failed)
        failed = (f'<details class="failed"><summary>{len(table.failed)} failed cell(s)</summary><ul>{items}</ul>'
                  "</details>")
    unit = _e(table.title[len(f"{table.modelpool} on {table.taskpool} ("):-1])
    return (f'<section class="board" id="table-{t}"><h2>{_e(table.modelpool)} on {_e(table.taskpool)}'
            f'<span class="unit">{unit}</span></h2><div class="scroll"><table class="lb"><thead><tr>'
            f'{"".join(heads)}</tr></thead>{"".join(bodies)}</table></div>'
            f'<div class="notes">{notes_html}</div>{failed}</section>')


def render_html(tables: Sequence[Table], title: str = "mergebench leaderboard") -> str:
    """The whole page for `tables` (from `tables.build_tables`)."""
    from mergebench_core import __version__

    body = "".join(_table_html(tb, i) for i, tb in enumerate(tables)) or '<p class="meta">no results</p>'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="generator" content="mergebench {_e(__version__)}">
<title>{_e(title)}</title>
<link rel="icon" href="data:,">
<style>{_CSS}</style>
</head>
<body>
<header><h1>{_e(title)}</h1>
<p class="meta">{len(tables)} table(s) · mergebench {_e(__version__)}</p>
<button id="theme" type="button" title="switch between light and dark">◐ light / dark</button>
<p class="help">Click a column header to sort by it (again to reverse); ▸ opens a row's parameters, seeds, versions and
extras. In each score column, the best method is <strong>bold</strong> and the second <u>underlined</u> (tied
rows alike); reference rows stay on top.</p>
</header>
<main>
{body}
</main>
<script>{_SCRIPT}</script>
</body>
</html>
"""
