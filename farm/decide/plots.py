"""The sweep's figures, for the report and MLflow: the Pareto front per target (a colour per format, a marker
per compression pipeline, the constraint as a line, labels on the front only), and thread scaling. Pure
matplotlib on rows as farm/pareto.py reads them."""

from __future__ import annotations

import math
from pathlib import Path

PALETTE = ["tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "tab:grey"]
MARKERS = "osD^vPX*<>"


def label_of(metric: str) -> str:
    """A metric's axis label, as the stage kind that measures it declares it (farm/stages: METRICS)."""
    from farm.sweep.metrics import label_of as declared_label

    return declared_label(metric)


def _style(rows: list[dict]):
    pipelines = sorted({r.get("pipeline", "none") for r in rows}, key=lambda p: (p != "none", p))
    marker = {p: MARKERS[i % len(MARKERS)] for i, p in enumerate(pipelines)}
    from farm.export import FORMATS

    order = {name: i for i, name in enumerate(FORMATS.names())}  # a format keeps its colour from plot to plot
    colour = {fmt: PALETTE[order.get(fmt, len(PALETTE) - 1) % len(PALETTE)] for fmt in {r.get("format", "") for r in rows}}
    return colour, marker


def front_plot(rows: list[dict], status: dict[str, dict], x: str, y: str, path: Path, title: str = "",
               lines: list[tuple[str, float, str]] = ()) -> bool:
    """Scatter of y against x: front cells large and labelled, other feasible cells small, infeasible ones
    hollow; `lines`: (axis 'x'|'y', value, text), e.g. a constraint. False when fewer than 2 points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    pts = [r for r in rows if _num(r["metrics"].get(x)) and _num(r["metrics"].get(y))]
    if len(pts) < 2:
        return False
    colour, marker = _style(pts)
    fig, ax = plt.subplots(figsize=(9, 5.8))
    for r in sorted(pts, key=lambda r: status[r["id"]]["pareto"]):
        s, m = status[r["id"]], r["metrics"]
        c, mk = colour[r.get("format", "")], marker[r.get("pipeline", "none")]
        if s["pareto"]:
            ax.scatter(m[x], m[y], c=c, marker=mk, s=90, edgecolors="black", linewidths=1.2, zorder=3)
            ax.annotate(r["label"], (m[x], m[y]), fontsize=7, xytext=(5, 4), textcoords="offset points", zorder=4)
        elif s["feasible"]:
            ax.scatter(m[x], m[y], c=c, marker=mk, s=40, alpha=0.7, zorder=2)
        else:
            ax.scatter(m[x], m[y], facecolors="none", edgecolors=c, marker=mk, s=40, alpha=0.6, zorder=1)
    for axis, value, text in lines:
        (ax.axhline if axis == "y" else ax.axvline)(value, color="tab:red", linestyle="--", linewidth=1)
        ax.annotate(text, (0.01, value) if axis == "y" else (value, 0.01), fontsize=7, color="tab:red",
                    xycoords=("axes fraction", "data") if axis == "y" else ("data", "axes fraction"),
                    xytext=(2, 2), textcoords="offset points")
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=f) for f, c in colour.items()]
    handles += [Line2D([], [], color="black", marker=mk, linestyle="", markerfacecolor="none",
                       label=f"pipeline: {p}") for p, mk in marker.items()]
    handles += [Line2D([], [], color="grey", marker="o", linestyle="", markersize=9, markeredgecolor="black",
                       label="on the front (labelled)"),
                Line2D([], [], color="grey", marker="o", linestyle="", markerfacecolor="none",
                       label="violates a constraint")]
    ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.85)
    ax.set_xlabel(label_of(x))
    ax.set_ylabel(label_of(y))
    ax.set_title(title or f"{label_of(y)} vs {label_of(x)}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def threads_plot(rows: list[dict], path: Path, title: str = "") -> bool:
    """Decode tok/s against threads, one line per cell measured at more than one thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for r in rows:
        pts = sorted((int(k.split(".t")[1]), v) for k, v in r["metrics"].items() if k.startswith("decode_tok_s.t"))
        if len(pts) > 1:
            series.append((r, pts))
    if not series:
        return False
    colour, marker = _style([r for r, _ in series])
    fig, ax = plt.subplots(figsize=(8, 5))
    for r, pts in series:
        ax.plot([t for t, _ in pts], [v for _, v in pts], marker=marker[r.get("pipeline", "none")],
                color=colour[r.get("format", "")], alpha=0.8, label=r["label"])
    ax.set_xlabel("threads")
    ax.set_ylabel(label_of("decode_tok_s"))
    ax.set_xticks(sorted({t for _, pts in series for t, _ in pts}))
    ax.set_title(title or "thread scaling of decode", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v)
