"""Tables laid out like SafeCLIP's Table 1 (ASR) and Table 2 (zero-shot / linear probe accuracy).

Every number is the mean over seeds, +- the sample standard deviation (ddof=1) when there are
two or more seeds; ``n=`` says how many seeds went into a cell when it differs from the grid's.
ASR cells add ``[low–high]``, the 95% Wilson interval of the rate pooled over the seeds.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

from clipguard.evaluation.intervals import wilson_interval
from clipguard.reporting.asr_keys import is_targeted_column


@dataclass
class Table:
    title: str
    header: list[list[str]]  # one or two header rows; the first may group columns (spans)
    rows: list[list[str]]
    spans: list[int] = field(default_factory=list)  # column spans of header[0] when grouped
    notes: list[str] = field(default_factory=list)


def mean_std(values: list[float]) -> tuple[float, float | None, int]:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), None, 0
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None, len(vals)
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var), len(vals)


def fmt(values: list[Any], *, percent: bool = True, expect_n: int | None = None) -> str:
    m, s, n = mean_std([None if v in ("", None) else float(v) for v in values])
    if n == 0:
        return "-"
    k = 100.0 if percent else 1.0
    text = f"{m * k:.1f}" + (f" ± {s * k:.1f}" if s is not None else "")
    if expect_n is not None and n != expect_n:
        text += f" (n={n})"
    return text


def _ordered(values: list[str], order: list[str] | None) -> list[str]:
    seen: list[str] = []
    for v in (order or []) + values:
        if v in values and v not in seen:
            seen.append(v)
    return seen


def _asr_columns(rows: list[dict[str, Any]], dataset: str) -> list[str]:
    cols: list[str] = []
    for r in rows:
        if r["dataset"] != dataset:
            continue
        for k, v in r.items():
            if k.startswith("asr.") and v not in (None, "") and k[4:] not in cols:
                cols.append(k[4:])
    return cols


def asr_column_groups(rows: list[dict[str, Any]]) -> tuple[list[tuple[str, list[str]]], list[list[str]], list[int]]:
    """Table 1's layout: (dataset, its ASR columns) groups, the two header rows (datasets over
    columns) and the datasets' column spans; datasets without an ASR column are left out."""
    datasets = _ordered([r["dataset"] for r in rows], None)
    groups = [(d, _asr_columns(rows, d)) for d in datasets]
    groups = [(d, cols) for d, cols in groups if cols]
    header = [["Dataset"] + [d for d, _ in groups], ["Method"] + [c for _, cols in groups for c in cols]]
    return groups, header, [1] + [len(cols) for _, cols in groups]


CLEAN_SUFFIX = " (clean data)"


def clean_label(method: str) -> str:
    return method + CLEAN_SUFFIX


def row_label(row: dict[str, Any]) -> str:
    """Table 1's row: the method, marked when it was trained on clean data (the base-rate row)."""
    return clean_label(row["method"]) if row.get("train_data") == "clean" else row["method"]


def n_seeds(rows: list[dict[str, Any]]) -> int:
    return len({str(r["seed"]) for r in rows})


def _target_count(rows: list[dict[str, Any]], col: str) -> str:
    """' (k/n)' for a targeted-poisoning column: targets taken out of targets tried, all seeds."""
    if not is_targeted_column(rows, col):
        return ""
    try:
        ns = [int(float(r[f"asr_n.{col}"])) for r in rows]
        ks = [round(float(r[f"asr.{col}"]) * n) for r, n in zip(rows, ns)]
    except (KeyError, TypeError, ValueError):
        return ""
    return f" ({sum(ks)}/{sum(ns)})"


def pooled_ci(rows: list[dict[str, Any]], key: str, col: str) -> tuple[int, int, float, float] | None:
    """(successes, images, low, high): the 95% Wilson interval of the rate pooled over ``rows`` (the
    seeds of one table cell), from ``<key>_hits.<col>`` and ``asr_n.<col>``; None when a row lacks them."""
    try:
        ks = [int(float(r[f"{key}_hits.{col}"])) for r in rows]
        ns = [int(float(r[f"asr_n.{col}"])) for r in rows]
    except (KeyError, TypeError, ValueError):
        return None
    k, n = sum(ks), sum(ns)
    if not rows or n <= 0 or not 0 <= k <= n:
        return None
    lo, hi = wilson_interval(k, n)
    return k, n, lo, hi


def _ci_text(rows: list[dict[str, Any]], key: str, col: str) -> str:
    ci = pooled_ci(rows, key, col)
    return f" [{ci[2] * 100:.1f}–{ci[3] * 100:.1f}]" if ci is not None else ""


CI_NOTE = ("[low–high]: 95% Wilson score interval of the rate pooled over the seeds (successes and images "
           "summed); it covers the finite number of evaluation images, not the seed-to-seed spread that ± shows.")


def targets_by_seed(rows: list[dict[str, Any]], groups: list[tuple[str, list[str]]]) -> list[str]:
    """One note per ASR column whose target class changes with the seed (a grid's ``target: [..]``
    list): which class each seed's cells were attacked towards, so a mean over seeds is read as a
    mean over targets too."""
    notes = []
    for d, cols in groups:
        for c in cols:
            by_seed: dict[str, str] = {}
            for r in rows:
                name = r.get(f"asr_target.{c}")
                if r["dataset"] == d and name not in (None, ""):
                    by_seed.setdefault(str(r["seed"]), str(name))
            if len(set(by_seed.values())) > 1:
                seeds = sorted(by_seed, key=lambda s: (len(s), s))
                where = f"{d} " if len(groups) > 1 else ""
                notes.append(f"Target of {where}`{c}` per seed: "
                             + ", ".join(f"seed {s} {by_seed[s]}" for s in seeds) + ".")
    return notes


def asr_table(rows: list[dict[str, Any]], method_order: list[str] | None = None, *, key: str = "asr",
              title: str = "Table 1: attack success rate (ASR, %, lower is better)", ci: bool = True) -> Table:
    """Rows = methods; column groups = datasets; columns = attacks (like SafeCLIP Table 1).
    ``key`` picks the per-attack number: ``asr`` (zero-shot), ``asr_lp`` (linear probe) or
    ``asr_base`` (the untriggered images' rate of the target class). ``ci``: an ASR cell also
    shows the 95% Wilson interval of its rate pooled over the seeds (``pooled_ci``)."""
    ci = ci and key in ("asr", "asr_lp")
    labels = {id(r): row_label(r) for r in rows}
    order = [lab for m in (method_order or []) for lab in (clean_label(m), m)]
    methods = _ordered([labels[id(r)] for r in rows], order)
    ns = n_seeds(rows)
    groups, header, spans = asr_column_groups(rows)
    body = []
    for m in methods:
        line = [m]
        for d, cols in groups:
            for c in cols:
                sel = [r for r in rows if r["dataset"] == d and labels[id(r)] == m
                       and r.get(f"{key}.{c}") not in (None, "")]
                vals = [r.get(f"{key}.{c}") for r in sel]
                text = fmt(vals, expect_n=ns) + (_target_count(sel, c) if key == "asr" else "")
                line.append(text + (_ci_text(sel, key, c) if ci and sel else ""))
        body.append(line)
    metrics = sorted({str(r.get(k)) for r in rows for k in r if k.startswith("asr_metric.") and r.get(k)})
    on_val = any(r.get("split") == "val" for r in rows)
    notes = [f"Attack success rate in %, mean ± std over {ns} seed(s)"
             + (", on triggered images from the validation rows (split: val)." if on_val else "."),
             "Protocols: " + "; ".join(metrics) if metrics else "No attack in the grid."]
    if ci and any(pooled_ci([r], key, c) for r in rows for _, cols in groups for c in cols):
        notes.append(CI_NOTE)
    notes += targets_by_seed(rows, groups)
    if any(lab.endswith(CLEAN_SUFFIX) for lab in methods):
        notes.append(f"'{CLEAN_SUFFIX.strip()}' rows: the same method trained on the clean data, measured with "
                     "the same triggered images: the base rate an ASR is read against.")
    return Table(title, header, body, spans, notes)


def accuracy_table(rows: list[dict[str, Any]], method_order: list[str] | None = None) -> Table:
    """Rows = methods; per dataset and training-data condition (attack): zero-shot and linear-probe
    top-1; last column: mean difference to the first method (the undefended CLIP), like Table 2."""
    datasets = _ordered([r["dataset"] for r in rows], None)
    methods = _ordered([r["method"] for r in rows], method_order)
    ns = n_seeds(rows)
    has_lp = any(r.get("linear_probe_top1") not in (None, "") for r in rows)
    tasks = [("zeroshot_top1", "0-shot")] + ([("linear_probe_top1", "lin-prb")] if has_lp else [])
    groups = []
    for d in datasets:
        attacks = _ordered([r["attack"] for r in rows if r["dataset"] == d], None)
        groups.extend((d, a) for a in attacks)
    header0 = ["Data (attack)"] + [f"{d} ({a})" for d, a in groups] + ["Δ vs " + (methods[0] if methods else "")]
    spans = [1] + [len(tasks)] * len(groups) + [len(tasks)]
    header1 = ["Method"] + [t for _ in groups for _, t in tasks] + [t for _, t in tasks]

    def values(m: str, d: str, a: str, key: str) -> list[float]:
        return [float(r[key]) for r in rows if r["method"] == m and r["dataset"] == d and r["attack"] == a
                and r.get(key) not in (None, "")]

    body = []
    for m in methods:
        line = [m]
        for d, a in groups:
            for key, _ in tasks:
                line.append(fmt(values(m, d, a, key), expect_n=ns))
        for key, _ in tasks:
            diffs = []
            for d, a in groups:
                mine, ref = mean_std(values(m, d, a, key))[0], mean_std(values(methods[0], d, a, key))[0]
                if not (math.isnan(mine) or math.isnan(ref)):
                    diffs.append(mine - ref)
            line.append(f"{sum(diffs) / len(diffs) * 100:+.1f}" if diffs and m != methods[0] else "-")
        body.append(line)
    split = "validation rows held out of training" if any(r.get("split") == "val" for r in rows) else "test split"
    notes = [f"Top-1 accuracy in % on the clean {split}, mean ± std over {ns} seed(s); the column "
             "group names the training data each model saw (clean, or poisoned by that attack).",
             "lin-prb: logistic regression on frozen image features of a held-aside clean training subset."]
    return Table("Table 2: clean accuracy (top-1, %, higher is better)", [header0, header1], body, spans, notes)


def safe_set_table(rows: list[dict[str, Any]], method_order: list[str] | None = None) -> Table | None:
    rows = [r for r in rows if r.get("final_safe_poison_recall") not in (None, "")]
    if not rows:
        return None
    methods = _ordered([r["method"] for r in rows], method_order)
    keys = _ordered([f"{r['dataset']} ({r['attack']})" for r in rows], None)
    body = []
    for m in methods:
        line = [m]
        for k in keys:
            sel = [r for r in rows if r["method"] == m and f"{r['dataset']} ({r['attack']})" == k]
            line.append(f"{fmt([r['final_safe_fraction'] for r in sel])} / "
                        f"{fmt([r['final_safe_poison_recall'] for r in sel])}" if sel else "-")
        body.append(line)
    return Table("Safe set in the last epoch: % of data / % of the poisoned pairs it kept",
                 [["Method"] + keys], body, [], ["From strategy.selected() and the attack manifest (diagnostics "
                                                "only; the defence never sees the manifest)."])


def _pair_cells(rows: list[dict[str, Any]], methods: list[str], groups: list[tuple[str, str]], left: str,
                prefix: str, ns: int) -> list[list[str]]:
    """One line per method; per (dataset, column) group, "left / prefix+column" (mean ± std over the
    method's rows of that dataset that have a value for the column), or "-" when none has."""
    body = []
    for m in methods:
        line = [m]
        for d, col in groups:
            sel = [r for r in rows if r["method"] == m and r["dataset"] == d
                   and r.get(prefix + col) not in (None, "")]
            line.append(f"{fmt([r.get(left) for r in sel], expect_n=ns)} / "
                        f"{fmt([r[prefix + col] for r in sel], expect_n=ns)}" if sel else "-")
        body.append(line)
    return body


def first_split_table(rows: list[dict[str, Any]], method_order: list[str] | None = None) -> Table | None:
    """Pair-selecting defences (SafeCLIP) at their first split after the warm-up: the AUROC of the
    pair score as a poison detector / % of each ASR column's poisons admitted to the first safe set."""
    prefix = "first_split_poisons."
    rows = [r for r in rows if any(k.startswith(prefix) and r[k] not in (None, "") for k in r)]
    if not rows:
        return None
    methods = _ordered([r["method"] for r in rows], method_order)
    groups = _ordered([(r["dataset"], k[len(prefix):]) for r in rows for k in r
                       if k.startswith(prefix) and r[k] not in (None, "")], None)
    ns = n_seeds(rows)
    body = _pair_cells(rows, methods, groups, "first_split_auroc", prefix, ns)
    epochs = sorted({str(r.get("first_split_epoch")) for r in rows})
    return Table("First split after the warm-up: AUROC of the pair score as a poison detector / % of the "
                 "column's poisons in the first safe set",
                 [["Method"] + [f"{d} ({c})" for d, c in groups]], body, [],
                 [f"In %, mean ± std over {ns} seed(s); first split at epoch {', '.join(epochs)}. The score is the "
                  "defence's own ranking score (SafeCLIP: rank_by, by default the pair's similarity minus its "
                  "image's mean similarity to its 10 best sampled captions; RoCLIP: its first pool epoch's "
                  "agreement of each image's pooled caption with its own caption, and the poisons that kept "
                  "their own caption); AUROC over all the poisons of the "
                  "attack's data (SafeCLIP's density veto, density_z, shows in the admissions, not in the AUROC). An "
                  "AUROC near 50 means the score no longer tells the poisons apart.",
                  "From the diagnostics only (the defence never sees the manifest); the first_split figures show "
                  "the same scores as histograms (lowest seed)."])


def detection_table(rows: list[dict[str, Any]]) -> Table | None:
    """Rows = detector (with its non-default options) on a base model; column groups = dataset and
    ASR column; AUROC and TPR@1%FPR, mean ± std over seeds. ``rows``: ``merge.detection_rows``.
    A detector run twice on the same base model, data and seed (a scan-only cell and a
    detect-then-train cell) counts once."""
    seen: set[tuple] = set()
    uniq = []
    for r in rows:
        key = (r["dataset"], r["column"], str(r["seed"]), r["label"], r["base"], r.get("base_fingerprint"))
        if key not in seen:
            seen.add(key)
            uniq.append(r)
    if not uniq:
        return None
    groups = _ordered([(r["dataset"], r["column"]) for r in uniq], None)
    labels = _ordered([f"{r['label']} on {r['base']}" for r in uniq], None)
    ns = n_seeds(uniq)
    tasks = [("auroc", "AUROC"), ("tpr@1%fpr", "TPR@1%FPR")]
    header0 = ["Data (attack)"] + [f"{d} ({c})" for d, c in groups]
    spans = [1] + [len(tasks)] * len(groups)
    header1 = ["Detector"] + [t for _ in groups for _, t in tasks]
    body = []
    for lab in labels:
        line = [lab]
        for d, c in groups:
            sel = [r for r in uniq if r["dataset"] == d and r["column"] == c and f"{r['label']} on {r['base']}" == lab]
            for key, _ in tasks:
                line.append(fmt([r.get(key) for r in sel], expect_n=ns))
        body.append(line)
    notes = [f"In %, mean ± std over {ns} seed(s); '(n=k)': k seeds. Each detector scores the poisoned training "
             "set with the final model of the pre-training method after 'on' (trained on that very data, or on "
             "the held-aside clean rows for a 'data: held-aside' entry); "
             "positives: the column's poisoned pairs, negatives: the clean pairs.",
             "TPR@1%FPR: the share of the poisons flagged by a threshold that flags at most 1% of the clean pairs."]
    return Table("Detection: AUROC and TPR at 1% FPR (%, higher is better)", [header0, header1], body, spans, notes)


def detect_filter_table(rows: list[dict[str, Any]], method_order: list[str] | None = None) -> Table | None:
    """Detect-then-train methods: % of the training pairs kept / % of each column's poisons kept."""
    rows = [r for r in rows if r.get("detect_kept_fraction") not in (None, "")]
    if not rows:
        return None
    methods = _ordered([r["method"] for r in rows], method_order)
    prefix = "detect_poisons_kept."
    groups = []
    for r in rows:
        for k in r:
            if k.startswith(prefix) and (r["dataset"], k[len(prefix):]) not in groups:
                groups.append((r["dataset"], k[len(prefix):]))
    ns = n_seeds(rows)
    body = _pair_cells(rows, methods, groups, "detect_kept_fraction", prefix, ns)
    return Table("Detect-then-train: % of the training pairs kept / % of the column's poisons kept",
                 [["Method"] + [f"{d} ({c})" for d, c in groups]], body, [],
                 [f"Mean ± std over {ns} seed(s). The detector's keep rule (or keep_fraction) decided; the "
                  "manifest only counts the poisons kept (the detector never sees it)."])


# ---------------------------------------------------------------------------- rendering
def to_markdown(t: Table) -> str:
    lines = [f"**{t.title}**", ""]
    if len(t.header) == 2 and t.spans:
        top = []
        for name, span in zip(t.header[0], t.spans):
            top.extend([name] + [""] * (span - 1))
        lines.append("| " + " | ".join(top) + " |")
        lines.append("|" + "---|" * len(top))
        lines.append("| " + " | ".join(f"**{h}**" for h in t.header[1]) + " |")
    else:
        lines.append("| " + " | ".join(t.header[-1]) + " |")
        lines.append("|" + "---|" * len(t.header[-1]))
    for r in t.rows:
        lines.append("| " + " | ".join(r) + " |")
    lines.append("")
    lines.extend(f"_{n}_" for n in t.notes)
    return "\n".join(lines) + "\n"


def to_html(t: Table) -> str:
    e = html.escape
    out = [f"<h3>{e(t.title)}</h3>", "<table>"]
    if len(t.header) == 2 and t.spans:
        out.append("<tr>" + "".join(f'<th colspan="{s}">{e(h)}</th>' for h, s in zip(t.header[0], t.spans)) + "</tr>")
    out.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header[-1]) + "</tr>")
    for r in t.rows:
        out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
    out.append("</table>")
    out.extend(f"<p class=note>{e(n)}</p>" for n in t.notes)
    return "\n".join(out)


def to_text(t: Table) -> str:
    """Fixed-width rendering for the terminal."""
    head = t.header[-1]
    if len(t.header) == 2 and t.spans:
        head = []
        names = []
        for name, span in zip(t.header[0], t.spans):
            names.extend([name] * span)
        head = [f"{n}:{h}" if n not in ("Dataset", "Data (attack)") else h for n, h in zip(names, t.header[1])]
    grid = [head] + t.rows
    widths = [max(len(str(r[i])) for r in grid) for i in range(len(head))]
    lines = [t.title, "  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in t.rows]
    lines += [f"  {n}" for n in t.notes]
    return "\n".join(lines) + "\n"
