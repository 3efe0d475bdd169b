"""``report.md`` (tables + linked PNGs) and a self-contained ``report.html`` (PNGs embedded)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from clipguard.io import atomic_path, write_text
from clipguard.reporting.merge import (
    detection_rows,
    load_cells,
    merge_rows,
    write_detection_csv,
    write_results_csv,
)
from clipguard.reporting.tables import (
    Table,
    accuracy_table,
    asr_table,
    detect_filter_table,
    detection_table,
    first_split_table,
    safe_set_table,
    to_html,
    to_markdown,
    to_text,
)
from clipguard.reporting.verdict import verdict_table

CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:center}
th{background:#eee}td:first-child{text-align:left;font-weight:bold}.note{color:#555;font-size:90%}
img{max-width:100%}code{background:#f4f4f4;padding:1px 4px}"""


FIRST_SPLIT_NOTE = ("The first_split figures, one per attack and pair-selecting defence: the defence's pair "
                    "scores at its first split after the warm-up (SafeCLIP: the first mixed epoch), clean against "
                    "poisoned pairs, lowest seed, as the run wrote them (similarity_hist_epochNN.png in its run "
                    "folder). The x-axis is the defence's ranking score (SafeCLIP's rank_by; by default the "
                    "relative score, not the raw cosine similarity); the dashed line is the cut of the first safe set.")


def method_order(out: Path, cells: list[dict[str, Any]]) -> list[str]:
    """Methods in the order of the grid (plan.json), else pre-training before fine-tuning."""
    plan = out / "plan.json"
    order: list[str] = []
    if plan.is_file():
        for c in json.loads(plan.read_text()).get("cells", []):
            if c["method"] not in order:
                order.append(c["method"])
    for stage in ("pretrain", "finetune"):
        for c in cells:
            if c["stage"] == stage and c["method"] not in order:
                order.append(c["method"])
    return order


def trained(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells that trained a model (scan-only cells have detection metrics only)."""
    return [c for c in cells if c.get("stage") != "scan"]


def build_tables(cells: list[dict[str, Any]], order: list[str]) -> list[Table]:
    scans = detection_table(detection_rows(cells))
    _, rows = merge_rows(trained(cells))
    if not rows:
        return [scans] if scans is not None else []
    tables = [asr_table(rows, order)]
    if any(r.get(k) not in (None, "") for r in rows for k in r if k.startswith("asr_base.")):
        base = asr_table(rows, order, key="asr_base",
                         title="Table 1b: base rate - the same held-out images WITHOUT the trigger predicted as "
                               "the target (%); an ASR near it means the backdoor did not take")
        base.notes = [base.notes[0].replace("Attack success rate", "Base rate")]
        tables.append(base)
    verdict = verdict_table(rows, order)
    if verdict is not None:
        tables.append(verdict)
    tables.append(accuracy_table(rows, order))
    for extra in (safe_set_table(rows, order), first_split_table(rows, order), detect_filter_table(rows, order),
                  scans):
        if extra is not None:
            tables.append(extra)
    return tables


def terminal_tables(out: str | Path) -> str:
    out = Path(out)
    cells = load_cells(out)
    if not cells:
        return "no finished cells yet\n"
    return "\n".join(to_text(t) for t in build_tables(cells, method_order(out, cells)))


def _meta(out: Path) -> dict[str, Any]:
    p = out / "bench.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def write_report(out: str | Path) -> dict[str, Path]:
    """Re-derive everything from ``out/cells/*.json``: results.csv, plots, report.md, report.html."""
    from clipguard.reporting.plots import first_split_histograms, histogram_plot, safe_set_plot

    out = Path(out)
    cells = load_cells(out)
    csv_path = write_results_csv(out, cells)
    det_path = write_detection_csv(out, detection_rows(cells))
    order = method_order(out, cells)
    tables = build_tables(cells, order) if cells else []
    models = trained(cells)
    figs = ({**safe_set_plot(models, order), **histogram_plot(models, order),
             **first_split_histograms(out, models, order)} if models else {})
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for name, png in figs.items():
        with atomic_path(plots / f"{name}.png") as tmp:
            tmp.write_bytes(png)
    meta = _meta(out)
    title = f"clipguard benchmark: {meta.get('name', out.name)}"
    intro = [f"Config: `{meta.get('config', '?')}`; {len(cells)} finished cell(s) of {meta.get('n_cells', '?')}; "
             f"model `{meta.get('model', '?')}`; seeds {meta.get('seeds', '?')}."]
    if meta.get("command"):
        intro.append(f"Command: `{meta['command']}`")
    if meta.get("wall_s") is not None:
        intro.append(f"Wall time of the last invocation: {meta['wall_s']:.0f} s "
                     f"({meta.get('cells_run', '?')} cell(s) run, {meta.get('cells_skipped', '?')} reused).")
    md = [f"# {title}", ""] + [f"{line}  " for line in intro] + [""]
    md += [to_markdown(t) for t in tables]
    notes = [FIRST_SPLIT_NOTE] if any(n.startswith("first_split__") for n in figs) else []
    if figs:
        md.append("## Figures\n")
        md += [f"{n}\n" for n in notes]
        md += [f"![{n}](plots/{n}.png)\n" for n in figs]
    md.append("Per-cell JSON: `cells/`; merged: `results.csv`"
              + ("; detection metrics per detector: `detection.csv`" if det_path else "") + ".\n")
    write_text(out / "report.md", "\n".join(md))

    e = html.escape
    body = [f"<h1>{e(title)}</h1>"] + [f"<p>{e(line)}</p>" for line in intro]
    body += [to_html(t) for t in tables]
    if figs:
        body.append("<h2>Figures</h2>")
        body += [f"<p class=note>{e(n)}</p>" for n in notes]
        for n, png in figs.items():
            body.append(f'<figure><img alt="{e(n)}" src="data:image/png;base64,'
                        f'{base64.b64encode(png).decode()}"><figcaption>{e(n)}</figcaption></figure>')
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    write_text(out / "report.html", page)
    paths = {"results": csv_path, "markdown": out / "report.md", "html": out / "report.html"}
    if det_path is not None:
        paths["detection"] = det_path
    return paths
