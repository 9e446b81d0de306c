"""The report's charts, drawn once with matplotlib (a dependency of ``--report``).

One function per chart builds a :class:`matplotlib.figure.Figure` from plain data (report dicts,
lists of rows), so other commands (``sweep``) reuse them. :func:`section_charts` picks the charts
of one report section; :mod:`onnxprune.html_report` inlines each figure in report.html as SVG and
writes the same figure beside the page as a PNG (``channels.png``, ``latency.png``, ...), for
people who paste pictures into a pull request, a slide or a wiki.

matplotlib is used through :class:`~matplotlib.figure.Figure` with the Agg canvas only: no pyplot
state, no display. Both formats are byte-deterministic: no date, creator or library version in the
files, and SVG ids hashed with a fixed salt (``svg.hashsalt``, set only while saving, one per chart
so several charts inlined in one page never share an id).
"""

from __future__ import annotations

import html
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import OnnxPruneError
from .graph.io import write_bytes_atomic
from .report import budget_text, dims_text, short_name

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d")
_PNG_META = {"Software": None}  # no library version in the file: same data, same bytes
_SVG_META = {"Date": None, "Creator": None}


@dataclass(frozen=True)
class Chart:
    """One chart of a report: ``name`` (its PNG is ``name.png``), the page's heading and the figure."""

    name: str
    title: str
    figure: Any  # matplotlib.figure.Figure

    def svg(self) -> str:
        """The figure as an ``<svg>`` element to inline in HTML."""
        return svg_text(self.figure, salt=self.name, label=self.title)

    def png(self) -> bytes:
        return png_bytes(self.figure)


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise OnnxPruneError(f"the report's charts need matplotlib, which cannot be imported ({exc}); "
                             "reinstall it: pip install 'matplotlib>=3.7'") from None
    return matplotlib, Figure, FigureCanvasAgg


def _figure(width: float, height: float):
    _, Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata=_PNG_META)
    return buf.getvalue()


def svg_text(fig, *, salt: str = "onnxprune", label: str = "") -> str:
    """``fig`` as one ``<svg>`` element to inline in HTML (no XML prolog or DOCTYPE), its ids unique to ``salt``."""
    matplotlib = _matplotlib()[0]
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": f"onnxprune-{salt}", "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata=_SVG_META)
    text = buf.getvalue().decode("utf-8")
    text = text[text.index("<svg"):]
    # inline in HTML: no RDF metadata, no xlink namespace declaration (the HTML parser knows xlink:href),
    # so the page names no URL but the SVG namespace
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.S)
    text = text.replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "", 1)
    text = text.replace('<g id="', f'<g id="{salt}-')  # matplotlib counts groups per file: figure_1, axes_1
    aria = f' role="img" aria-label="{html.escape(label)}"' if label else ""
    return text.replace("<svg", f"<svg{aria}", 1)


def save_png(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG, atomically."""
    return write_bytes_atomic(png_bytes(fig), path)


def channel_bars(layers: Sequence[Mapping[str, Any]], *, max_rows: int = 60):
    """Channels per layer before (light) and after (dark) pruning; rows: ``{node, before, after}``.

    Only changed layers are drawn (all of them when none changed), at most ``max_rows``.
    """
    rows = [l for l in layers if l["after"] != l["before"]] or list(layers)
    rows = rows[:max_rows]
    fig = _figure(9, 1.2 + 0.22 * max(len(rows), 1))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    ax.barh(y, [l["before"] for l in rows], color="#c6dbef", label="before")
    ax.barh(y, [l["after"] for l in rows], color=PALETTE[0], label="after")
    ax.set_yticks(y, [str(l["node"])[-40:] for l in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output channels")
    ax.set_title("Channels kept per layer")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def sensitivity_curves(rows: Sequence[Mapping[str, Any]], *, max_curves: int = 40):
    """Output distortion vs share of a group removed, one line per group (the allocator's input).

    ``rows`` as in the slim report's ``sensitivity``: ``{layers, fractions, distortion}``. The
    groups with the highest distortion are labelled; the rest are drawn thin and unlabelled.
    """
    rows = sorted(rows, key=lambda r: -max(r["distortion"]))[:max_curves]
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    for i, r in enumerate(rows):
        label = ", ".join(r["layers"][:2])[:40] if i < 8 else None
        ax.plot(r["fractions"], r["distortion"], marker="o" if i < 8 else None, ms=3,
                lw=1.5 if i < 8 else 0.7, color=PALETTE[i % len(PALETTE)] if i < 8 else "#999999", label=label)
    ax.set_xlabel("share of the group's channels removed")
    ax.set_ylabel("output distortion (relative squared error)")
    ax.set_title("Sensitivity scan per layer group")
    if any(max(r["distortion"]) > 0 for r in rows) and max(max(r["distortion"]) for r in rows) / max(
            min(max(r["distortion"]) for r in rows), 1e-12) > 100:
        ax.set_yscale("symlog", linthresh=1e-4)
    if rows:
        ax.legend(fontsize=7, loc="upper left")
    return fig


def latency_bars(rows: Sequence[Mapping[str, Any]]):
    """Median latency (with a p90 whisker) per model, grouped by provider / threads / input shape.

    ``rows``: bench rows (``model, provider, threads, input_shapes, median_ms, p90_ms``).
    """
    configs = list(dict.fromkeys(_config(r) for r in rows))
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    by = {(_config(r), str(r["model"])): r for r in rows}
    fig = _figure(max(6.0, 1.2 + 1.1 * len(configs) * max(1, len(models)) ** 0.5), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(configs))
    for j, m in enumerate(models):
        med = [by[(c, m)]["median_ms"] if (c, m) in by else np.nan for c in configs]
        p90 = [by[(c, m)]["p90_ms"] if (c, m) in by else np.nan for c in configs]
        err = [np.zeros(len(med)), np.maximum(np.asarray(p90) - np.asarray(med), 0)]
        ax.bar(x + (j - (len(models) - 1) / 2) * width, med, width, yerr=err, capsize=2,
               color=PALETTE[j % len(PALETTE)], label=short_name(m))
    ax.set_xticks(x, configs, fontsize=8)
    ax.set_ylabel("latency, ms (median; whisker: p90)")
    ax.set_title("Latency per provider / threads / input")
    ax.legend(fontsize=8)
    return fig


def fidelity_vs_ratio(rows: Sequence[Mapping[str, Any]]):
    """Fidelity against the share of parameters removed, one line per series.

    ``rows``: ``{series, ratio, fidelity}`` (e.g. one series per model × criterion of a sweep).
    """
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    series = list(dict.fromkeys(str(r["series"]) for r in rows))
    for i, s in enumerate(series):
        pts = sorted((float(r["ratio"]), float(r["fidelity"])) for r in rows if str(r["series"]) == s)
        ax.plot(*zip(*pts), marker="o", color=PALETTE[i % len(PALETTE)], label=s)
    ax.set_xlabel("share of parameters removed")
    ax.set_ylabel("fidelity vs the original")
    ax.set_title("Fidelity vs pruning ratio")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return fig


def fidelity_latency_frontier(rows: Sequence[Mapping[str, Any]], *, title: str = "Fidelity vs latency"):
    """Scatter of fidelity against latency ratio (compressed / original), the Pareto points joined.

    ``rows``: ``{label: str, fidelity: float, latency_ratio: float, pareto: bool}``; rows with a
    missing fidelity or latency are left out. Upper-left is better: faster and still faithful.
    """
    pts = [r for r in rows if r.get("fidelity") is not None and r.get("latency_ratio") is not None]
    fig = _figure(7.5, 5)
    ax = fig.add_subplot()
    other = [r for r in pts if not r.get("pareto")]
    front = sorted((r for r in pts if r.get("pareto")), key=lambda r: r["latency_ratio"])
    ax.scatter([r["latency_ratio"] for r in other], [r["fidelity"] for r in other], color="#999999", s=25,
               label="dominated")
    if front:
        ax.plot([r["latency_ratio"] for r in front], [r["fidelity"] for r in front], "-o", color=PALETTE[3], ms=6,
                label="Pareto frontier")
    for r in pts:
        ax.annotate(str(r.get("label", ""))[:32], (r["latency_ratio"], r["fidelity"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.axvline(1.0, color="#444444", lw=0.8, ls=":")
    ax.set_xlabel("latency / original latency (lower is faster)")
    ax.set_ylabel("fidelity vs the original")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.margins(0.08)
    if pts:
        ax.legend(fontsize=8, loc="best")
    return fig


def detections(image: np.ndarray, ref: np.ndarray, got: np.ndarray):
    """A calibration photo (H, W, C) with the original's boxes (green) and the compressed model's
    (red, dashed); boxes are ``[x1, y1, x2, y2, score]`` rows in pixels."""
    from matplotlib.patches import Rectangle
    img = np.asarray(image, np.float64)
    img = (img - img.min()) / max(img.max() - img.min(), 1e-9)
    h, w = img.shape[:2]
    fig = _figure(8, 8 * h / max(w, 1) + 0.5)
    ax = fig.add_subplot()
    ax.imshow(img if img.ndim == 3 and img.shape[-1] == 3 else img.squeeze(), cmap="gray")
    for boxes, color, style, label in ((ref, "#2ca02c", "-", "original"), (got, "#d62728", "--", "compressed")):
        b = np.asarray(boxes, np.float64).reshape(-1, 5)
        for i, (x1, y1, x2, y2, _) in enumerate(b):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=color, lw=2, ls=style,
                                   label=label if i == 0 else None))
        if not len(b):
            ax.plot([], [], color=color, ls=style, label=f"{label} (no box)")
    ax.set_axis_off()
    ax.set_title("Detections: original (green) vs compressed (red, dashed)")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def section_charts(part: Mapping[str, Any]) -> list[Chart]:
    """The charts of one report section (a ``to_dict()`` of slim, bench, check or sweep), in page order."""
    kind = part.get("kind")
    out: list[Chart] = []
    if kind == "slim":
        if part.get("layers"):
            out.append(Chart("channels", "Channels kept per layer", channel_bars(part["layers"])))
        if part.get("sensitivity"):
            out.append(Chart("sensitivity", "Sensitivity scan", sensitivity_curves(part["sensitivity"])))
    elif kind == "bench" and part.get("rows"):
        out.append(Chart("latency", "Latency", latency_bars(part["rows"])))
    elif kind == "check" and part.get("latency"):
        out.append(Chart("latency", "Latency", latency_bars(check_latency_rows(part))))
    elif kind == "sweep":
        out += _sweep_charts(part)
    return out


def check_latency_rows(check: Mapping[str, Any]) -> list[dict]:
    """The check report's speed-up timing as two bench-like rows (original, candidate)."""
    lat = check["latency"]
    return [{"model": name, "provider": lat["provider"], "threads": lat["threads"],
             "input_shapes": lat["input_shapes"], "median_ms": med, "p90_ms": p90}
            for name, med, p90 in zip([_role(role, check[role]) for role in ("original", "candidate")],
                                      lat["median_ms"], lat["p90_ms"])]


def _role(role: str, name: str) -> str:
    return role if name == role else f"{role}: {short_name(name)}"


def _sweep_charts(sweep: Mapping[str, Any]) -> list[Chart]:
    rows = [r for r in sweep.get("rows", []) if r.get("status", "ok") == "ok" and r.get("fidelity") is not None]
    if not rows:
        return []
    series = [{"series": f"{short_name(r['model'])} {r.get('criterion') or ''}{' int8' if r.get('int8') else ''}",
               "ratio": r.get("achieved_ratio") or r.get("ratio") or 0.0, "fidelity": r["fidelity"]} for r in rows]
    out = [Chart("fidelity_vs_ratio", "Fidelity vs pruning ratio", fidelity_vs_ratio(series))]
    several = len({r["model"] for r in rows}) > 1

    def label(r: Mapping[str, Any]) -> str:  # short enough to read beside a point: what differs
        return (f"{short_name(r['model'])} " if several else "") + f"{budget_text(r.get('ratio'), r.get('speedup'))} {r.get('criterion') or ''}" \
            + (" int8" if r.get("int8") else "")
    points = [{"label": label(r), "fidelity": r["fidelity"],
               "latency_ratio": r.get("latency_ratio"), "pareto": bool(r.get("pareto"))} for r in rows]
    if any(p["latency_ratio"] is not None for p in points):
        out.append(Chart("frontier", "Fidelity vs latency", fidelity_latency_frontier(points)))
    return out


def _config(row: Mapping[str, Any]) -> str:
    shape = dims_text(row["input_shapes"])
    provider = str(row["provider"]).replace("ExecutionProvider", "")
    return f"{provider}\n{row['threads']}T {shape}"
