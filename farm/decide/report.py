"""What a sweep found, read back from MLflow: the Pareto table and plot (`farm pareto NAME`, and the driver at
the end of a job), the sweep report (`farm report NAME`: one self-contained HTML page and its Markdown,
logged to the sweep's parent run), and `farm status`.

The report: per target, the front plots (quality, size and task accuracy against decode speed); every cell
with its speed-ups against both baselines (PyTorch eager fp32, and the fastest full-precision runtime cell of
the same target) and its memory-roofline efficiency; the cells that failed and why, and those whose
benchmark was disturbed; thread scaling and the serve curves where the sweep measured them; and checks of
orderings the field knows (F16 ~ Q8_0 < Q4_K_M, data-aware int4 <= data-free int4 at one group size).
"""

from __future__ import annotations

import base64
import html
import math
import tempfile
import time
from pathlib import Path

from farm.decide import pareto, plots
from farm.record import queries
from farm.sweep.metrics import better, front_constraints, later

COLUMNS = ["perplexity", "kl_div", "top1_agree", "prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb",
           "size_mb"]
FULL_PRECISION = ("fp32", "F32")  # the levels a 'fastest full-precision runtime' baseline is chosen from
DATA_FREE = ("rtn", "hqq", "k_quant")  # int4 algorithms that read no calibration data


def _front(spec: dict, rows: list[dict]) -> dict:
    return pareto.front(rows, spec["objectives"], front_constraints(spec), later=later())


def _constraint_lines(spec: dict, rows: list[dict], target: str, x: str, y: str) -> list[tuple[str, float, str]]:
    base = next((r for r in rows if r["baseline"] and r["target"] == target), None)
    out = []
    for c in front_constraints(spec):
        for axis, metric in (("x", x), ("y", y)):
            if c["metric"] != metric:
                continue
            for key in ("max", "min"):
                if c.get(key) is not None:
                    out.append((axis, c[key], f"constraint: {metric} {key} {c[key]}"))
            for key in ("max_ratio_to_baseline", "min_ratio_to_baseline"):
                if c.get(key) is not None and base and metric in base["metrics"]:
                    out.append((axis, c[key] * base["metrics"][metric], f"constraint: {c[key]} x baseline"))
    return out


def pareto_report(name: str, run_id: str | None = None) -> dict:
    c, exp, parent = queries.latest_sweep_run(name, run_id)
    spec = queries.sweep_spec(c, parent)
    rows = queries.cell_rows(c, exp, parent)
    status = _front(spec, rows)
    text = _table(spec, rows, status)
    objectives = list(spec["objectives"])
    promote = spec["promote"]
    direction = spec["objectives"].get(promote["metric"], better(promote["metric"]))
    best = pareto.pick(rows, status, promote["metric"], direction)
    with tempfile.TemporaryDirectory() as d:
        plot = None
        if len(objectives) >= 2 and rows:
            x, y = objectives[1], objectives[0]
            plot = Path(d) / "pareto.png"
            targets = sorted({r["target"] for r in rows})
            mine = [r for r in rows if r["target"] == targets[0]]
            if not plots.front_plot(mine, status, x, y, plot, f"{name}: Pareto front on target '{targets[0]}'",
                                    _constraint_lines(spec, rows, targets[0], x, y)):
                plot = None
        queries.record_pareto(c, parent, rows, status, text, plot, baselines(rows),
                               description(name, spec, rows, status, best))
    return {"parent": parent.info.run_id, "experiment": exp.experiment_id, "rows": rows, "status": status,
            "table": text, "best": best, "spec": spec}


def stored_front(name: str, run_id: str | None = None) -> dict | None:
    """The front as the job recorded it on its parent run (pareto.json: every row with its verdict), read back
    rather than computed again; None when the job recorded none (it ended before its last step)."""
    import json

    c, exp, parent = queries.latest_sweep_run(name, run_id)
    with tempfile.TemporaryDirectory() as d:
        try:
            data = json.loads(Path(c.download_artifacts(parent.info.run_id, "pareto.json", d)).read_text())
        except Exception:  # noqa: BLE001 (no such artifact)
            return None
    verdict = ("feasible", "reason", "pareto")
    rows = [{k: v for k, v in r.items() if k not in verdict} for r in data]
    status = {r["id"]: {k: r[k] for k in verdict} for r in data}
    spec = queries.sweep_spec(c, parent)
    promote = spec["promote"]
    best = pareto.pick(rows, status, promote["metric"], spec["objectives"].get(promote["metric"], better(promote["metric"])))
    return {"parent": parent.info.run_id, "experiment": exp.experiment_id, "rows": rows, "status": status,
            "table": _table(spec, rows, status), "best": best, "spec": spec}


def front_of(name: str, run_id: str | None = None) -> dict:
    """The sweep's front: as recorded by its job, else computed now (and recorded)."""
    return stored_front(name, run_id) or pareto_report(name, run_id)


def _table(spec: dict, rows: list[dict], status: dict) -> str:
    longs = ["perplexity_near", "perplexity_far"] if (spec.get("data") or {}).get("long_window_tokens") else []
    return pareto.table(rows, status, COLUMNS[:3] + longs + COLUMNS[3:] + ["roofline_efficiency"]
                        + [c for hook in _hooks("columns") for c in hook(spec)])


def _hooks(name: str) -> list:
    """The stage kinds' own contributions to the report (farm/stages/<kind>.py: columns, report)."""
    from farm.stages import STAGES

    return [getattr(m, name) for m in STAGES.modules() if callable(getattr(m, name, None))]


def description(name: str, spec: dict, rows: list[dict], status: dict, best: dict | None) -> str:
    """The sweep in a few lines of Markdown: the experiment's and the parent run's MLflow description."""
    base = spec.get("base", {}).get("model", "?")
    front = [r for r in rows if status[r["id"]]["pareto"]]
    lines = [f"**{name}**: a farm sweep of `{base}` — {len(rows)} cells finished, {len(front)} on the Pareto "
             f"front of {', '.join(f'{k} ({v})' for k, v in spec['objectives'].items())}.",
             "", "Front: " + (", ".join(f"`{r['label']}`" for r in front) or "empty")]
    if best:
        m = best["metrics"]
        lines += ["", f"Champion by {spec['promote']['metric']}: `{best['label']}` — decode "
                  f"{m.get('decode_tok_s', float('nan')):.1f} tok/s, perplexity {m.get('perplexity', float('nan')):.3f}, "
                  f"{m.get('size_mb', float('nan')):.1f} MB (measured on {best.get('hostname') or '?'} at "
                  f"{best.get('measured_at') or '?'})."]
    lines += ["", "The sweep's report: `report.html` in this run's artifacts (`farm report " + name + "`)."]
    return "\n".join(lines)


def baselines(rows: list[dict]) -> dict[str, dict]:
    """id -> speed-ups of decode against the target's PyTorch eager fp32 baseline and against its fastest
    full-precision runtime cell (base model, fp32 level of any format), with which cell that was."""
    out = {}
    for target in {r["target"] for r in rows}:
        group = [r for r in rows if r["target"] == target and not r.get("contaminated")]
        torch = next((r for r in group if r["baseline"]), None)
        full = [r for r in group if r.get("pipeline", "none") == "none" and r.get("quant") in FULL_PRECISION
                and "decode_tok_s" in r["metrics"]]
        fastest = max(full, key=lambda r: r["metrics"]["decode_tok_s"], default=None)
        for r in rows:
            if r["target"] != target or "decode_tok_s" not in r["metrics"]:
                continue
            d = r["metrics"]["decode_tok_s"]
            out[r["id"]] = {
                "speedup_vs_torch": d / torch["metrics"]["decode_tok_s"] if torch else None,
                "speedup_vs_best_fp32": d / fastest["metrics"]["decode_tok_s"] if fastest else None,
                "best_fp32": fastest["label"] if fastest else None}
    return out


def ordering_checks(rows: list[dict]) -> list[dict]:
    """Orderings the field knows, checked where the sweep has the cells: within one target, pipeline and
    runtime setting. {"check", "cells", "ok": True|False, "detail"}."""
    from farm.export import FORMATS

    out = []
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r.get("format"), r["target"], r.get("pipeline"), r.get("runtime")), {})[r.get("quant")] = r
    for (fmt, target, pipeline, _), by_level in sorted(groups.items(), key=str):
        hook = getattr(FORMATS.get(fmt), "orderings", None) if fmt in FORMATS else None
        if hook:  # a format's own expectations of its levels (farm/export/<format>_export.py: orderings)
            out += hook(by_level, f"{fmt}, pipeline {pipeline}, target {target}")
    free: dict[tuple, dict] = {}
    aware: dict[tuple, list[dict]] = {}
    for r in rows:
        alg = r.get("algorithm")
        if not alg or "int4" not in str(r.get("quant")) or "perplexity" not in r["metrics"]:
            continue
        key = (r["target"], r.get("pipeline"), r.get("format"), r.get("group_size"))
        if alg in DATA_FREE:
            if alg == "rtn" or key not in free:
                free[key] = r
        else:
            aware.setdefault(key, []).append(r)
    for key, cells in sorted(aware.items(), key=str):
        if key not in free:
            continue
        f = free[key]
        for a in cells:
            x, y = a["metrics"]["perplexity"], f["metrics"]["perplexity"]
            out.append({"check": "perplexity: data-aware int4 <= data-free int4 (same group size)",
                        "cells": f"{a['label']} vs {f['label']}", "ok": x <= y * 1.001,
                        "detail": f"{a.get('algorithm')} {x:.4g} vs {f.get('algorithm')} {y:.4g}"})
    return out


# --- the page ---------------------------------------------------------------------------------------------

CELL_COLUMNS = [("perplexity", "ppl", ".3f"), ("kl_div", "KL", ".4f"), ("top1_agree", "top-1", ".3f"),
                ("task_acc_mean", "task acc", ".3f"), ("decode_tok_s", "decode tok/s", ".1f"),
                ("prefill_tok_s", "prefill tok/s", ".0f"), ("ttft_ms", "TTFT ms", ".0f"),
                ("size_mb", "MB", ".1f"), ("peak_rss_mb", "RSS MB", ".0f"),
                ("roofline_efficiency", "roofline", ".0%")]


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _cell_table(rows: list[dict], status: dict, speed: dict) -> tuple[list[str], list[list[str]]]:
    head = ["cell"] + [h for _, h, _ in CELL_COLUMNS] + ["× torch", "× best fp32", "status"]
    body = []
    for r in sorted(rows, key=lambda r: (r["target"], not status[r["id"]]["pareto"], r["label"])):
        s, sp = status[r["id"]], speed.get(r["id"], {})
        state = "front" if s["pareto"] else ("feasible" if s["feasible"] else f"excluded: {s['reason']}")
        body.append([r["label"]] + [_fmt(r["metrics"].get(k), f) for k, _, f in CELL_COLUMNS]
                    + [_fmt(sp.get("speedup_vs_torch"), ".2f"), _fmt(sp.get("speedup_vs_best_fp32"), ".2f"), state])
    return head, body


def _md_table(head: list[str], body: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body])


def _html_table(head: list[str], body: list[list[str]]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + cells + "</tbody></table>")


def build(name: str, out_dir: Path, run_id: str | None = None, rep: dict | None = None) -> dict:
    """Write report.html (self-contained: the figures inline) and report.md (+ its PNGs) into out_dir and log
    them to the sweep's parent run (`rep`: pareto_report's result, when the caller has it). Returns
    {"html", "md", "parent", "checks", "figures"}."""
    rep = rep or front_of(name, run_id)
    c, _, parent = queries.latest_sweep_run(name, rep["parent"])
    spec, rows, status = rep["spec"], rep["rows"], rep["status"]
    failed = [r for r in queries.cell_runs(parent) if r.info.status == "FAILED"]
    speed = baselines(rows)
    checks = ordering_checks(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = []  # (title, file name)
    objectives = list(spec["objectives"])
    y = objectives[0]
    for target in sorted({r["target"] for r in rows}):
        mine = [r for r in rows if r["target"] == target]
        for metric in [y] + [m for m in ("size_mb", "task_acc_mean") if m != y]:
            f = f"front-{target}-{metric}.png"
            title = f"target '{target}': {plots.label_of(metric)} vs decode speed"
            if plots.front_plot(mine, status, "decode_tok_s", metric, out_dir / f, title,
                                _constraint_lines(spec, rows, target, "decode_tok_s", metric)):
                figures.append((title, f))
        f = f"threads-{target}.png"
        if plots.threads_plot(mine, out_dir / f, f"target '{target}': thread scaling of decode"):
            figures.append((f"target '{target}': thread scaling", f))
    from farm.stages import STAGES

    for title, f in [x for m in STAGES.modules() for x in getattr(m, "FIGURES", ())]:
        try:  # a later phase's figure on the parent run (e.g. latency vs throughput), where the sweep had one
            c.download_artifacts(parent.info.run_id, f, str(out_dir))
            figures.append((title, f))
        except Exception:  # noqa: BLE001, S110 (no such phase in this sweep)
            pass
    head, body = _cell_table(rows, status, speed)
    fail_rows = [[r.data.tags.get("farm.label", r.info.run_name),
                  (r.data.tags.get("farm.error", "").splitlines() or [""])[0][:300]] for r in failed]
    dirty = [[r["label"], _fmt(r["metrics"].get("foreign_cpus"), ".2f")] for r in rows if r.get("contaminated")]
    check_rows = [["pass" if k["ok"] else "FAIL", k["check"], k["cells"], k["detail"]] for k in checks]
    hosts = sorted({(r.get("hostname") or "?") for r in rows})
    when = sorted(r["measured_at"] for r in rows if r.get("measured_at"))
    best = rep["best"]
    roof = [(r["label"], r["metrics"]["roofline_efficiency"], r["metrics"].get("mem_bandwidth_gbs"),
             r["metrics"].get("bytes_per_token_mb")) for r in rows if "roofline_efficiency" in r["metrics"]]
    summary = [f"Sweep `{name}`, parent run `{parent.info.run_id}` ({parent.info.status}), "
               f"{len(rows)} cells finished, {len(failed)} failed, "
               f"{sum(s['pareto'] for s in status.values())} on the front.",
               f"Measured on {', '.join(hosts)}" + (f", between {when[0]} and {when[-1]} (UTC)." if when else "."),
               f"Champion by {spec['promote']['metric']}: " + (f"`{best['label']}`." if best else "none (empty front).")]
    if roof:
        bw = roof[0][2]
        summary.append(f"Memory bandwidth (read, the benchmark's threads): {bw:.1f} GB/s; roofline = bandwidth / "
                       "bytes a decode step reads (weights but the embedding table, plus the KV cache).")
    sections = [("Cells", head, body), *[s for hook in _hooks("report") for s in hook(spec, rows)],
                ("Failed cells", ["cell", "error"], fail_rows),
                ("Benchmarks disturbed by other load (kept off the front)", ["cell", "foreign CPUs"], dirty),
                ("Known orderings", ["result", "check", "cells", "values"], check_rows)]
    md = [f"# farm report: {name}", "", *[s + "  " for s in summary], ""]
    for title, f in figures:
        md += [f"## {title}", "", f"![{title}]({f})", ""]
    for title, h, b in sections:
        md += [f"## {title}", "", _md_table(h, b) if b else "none", ""]
    (out_dir / "report.md").write_text("\n".join(md))
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>farm report: {html.escape(name)}</title>",
            f"<style>{CSS}</style></head><body>", f"<h1>farm report: {html.escape(name)}</h1>"]
    page += [f"<p>{html.escape(s).replace('`', '')}</p>" for s in summary]
    for title, f in figures:
        data = base64.b64encode((out_dir / f).read_bytes()).decode()
        page += [f"<h2>{html.escape(title)}</h2>", f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"]
    for title, h, b in sections:
        page += [f"<h2>{html.escape(title)}</h2>", _html_table(h, b) if b else "<p>none</p>"]
    page.append(f"<p class='foot'>farm report, written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                "</p></body></html>")
    (out_dir / "report.html").write_text("\n".join(page))
    c.log_artifact(parent.info.run_id, str(out_dir / "report.html"))
    c.log_artifact(parent.info.run_id, str(out_dir / "report.md"))
    return {"html": out_dir / "report.html", "md": out_dir / "report.md", "parent": parent.info.run_id,
            "checks": checks, "figures": [f for _, f in figures]}


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:12px;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:3px 6px}
th{background:#f0f0f0;position:sticky;top:0}tr:nth-child(even){background:#fafafa}img{max-width:100%;
border:1px solid #ddd;margin-bottom:1em}h2{margin-top:1.6em;font-size:1.15em}.foot{color:#888;font-size:11px}"""
