"""A self-contained HTML report (inline SVG charts, no external assets, no plotting library).

People look at pictures before tables: channels kept per layer, the sensitivity curves the
allocator used, and for detectors the original's and the compressed model's boxes on a
calibration photo. Everything is drawn as inline SVG so the file opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from .graph.io import write_text_atomic
from .report import _finite, budget_text, dims_text

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d")


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any) -> str:
    return "—" if x is None else f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


def channel_bars(layers: list[dict], width: int = 760) -> str:
    """Horizontal bars: channels before (light) and after (dark), one row per pruned layer."""
    rows = [l for l in layers if l["after"] != l["before"]] or layers
    rows = rows[:60]
    if not rows:
        return "<p>No layer changed.</p>"
    top = max(l["before"] for l in rows) or 1
    h, label = 16, 260
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h * len(rows) + 24}" role="img" '
           f'aria-label="channels per layer">']
    for i, l in enumerate(rows):
        y = i * h + 4
        wb = (width - label - 60) * l["before"] / top
        wa = (width - label - 60) * l["after"] / top
        out.append(f'<text x="{label - 6}" y="{y + 11}" font-size="11" text-anchor="end">{_esc(l["node"][-40:])}</text>')
        out.append(f'<rect x="{label}" y="{y}" width="{wb:.1f}" height="{h - 4}" fill="#c6dbef"/>')
        out.append(f'<rect x="{label}" y="{y}" width="{wa:.1f}" height="{h - 4}" fill="{PALETTE[0]}"/>')
        out.append(f'<text x="{label + wb + 4:.1f}" y="{y + 11}" font-size="11">{l["after"]}/{l["before"]}</text>')
    out.append("</svg>")
    return "".join(out)


def sensitivity_curves(rows: list[dict], width: int = 760, height: int = 280) -> str:
    """Distortion vs share of a group removed, one line per group (the allocator's input)."""
    if not rows:
        return ""
    ymax = max(max(r["distortion"]) for r in rows) or 1.0
    pad = 40

    def xy(f: float, d: float) -> tuple[float, float]:
        return pad + f * (width - 2 * pad), height - pad - d / ymax * (height - 2 * pad)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="sensitivity curves">',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>',
           f'<text x="{width / 2}" y="{height - 8}" font-size="12" text-anchor="middle">share of the group removed</text>',
           f'<text x="12" y="{pad - 10}" font-size="12">output distortion (max {ymax:.3g})</text>']
    for i, r in enumerate(rows):
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(f, d) for f, d in zip(r["fractions"], r["distortion"])))
        name = _esc(", ".join(r["layers"][:2]))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{PALETTE[i % len(PALETTE)]}" stroke-width="1.5">'
                   f'<title>{name}</title></polyline>')
    out.append("</svg>")
    return "".join(out)


class DetectionPreview(str):
    """The SVG of :func:`detection_overlay`, still carrying its photo and boxes for the PNG chart.

    A ``str`` so it travels wherever a preview did (results, reports) unchanged.
    """

    image: np.ndarray
    ref: np.ndarray
    got: np.ndarray


def detection_overlay(image: np.ndarray, ref: np.ndarray, got: np.ndarray) -> DetectionPreview:
    """A photo with the original's boxes (green) and the compressed model's (red, dashed)."""
    from PIL import Image
    img = np.asarray(image, np.float64)
    img = (img - img.min()) / max(img.max() - img.min(), 1e-9) * 255
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
    h, w = img.shape[:2]
    data = base64.b64encode(buf.getvalue()).decode()
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="detections">',
           f'<image href="data:image/png;base64,{data}" width="{w}" height="{h}"/>']
    for boxes, color, dash in ((ref, "#2ca02c", ""), (got, "#d62728", ' stroke-dasharray="6,3"')):
        for b in np.asarray(boxes).reshape(-1, 5):
            out.append(f'<rect x="{b[0]:.1f}" y="{b[1]:.1f}" width="{b[2] - b[0]:.1f}" height="{b[3] - b[1]:.1f}" '
                       f'fill="none" stroke="{color}" stroke-width="2"{dash}/>')
    out.append("</svg>")
    preview = DetectionPreview("".join(out))
    preview.image, preview.ref, preview.got = np.asarray(image), np.asarray(ref), np.asarray(got)
    return preview


def latency_bars(rows: list[dict], width: int = 760) -> str:
    """Horizontal bars of median latency (p90 as a thin line), one row per model and configuration."""
    if not rows:
        return ""
    top = max(max(r["p90_ms"], r["median_ms"]) for r in rows) or 1.0
    h, label = 18, 330
    scale = (width - label - 90) / top
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h * len(rows) + 24}" role="img" '
           f'aria-label="latency per model and configuration">']
    for i, r in enumerate(rows):
        y = i * h + 4
        shape = dims_text(r["input_shapes"])
        name = f"{str(r['model'])[-28:]} · {str(r['provider']).replace('ExecutionProvider', '')} {r['threads']}T {shape}"
        color = PALETTE[models.index(str(r["model"])) % len(PALETTE)]
        out.append(f'<text x="{label - 6}" y="{y + 12}" font-size="11" text-anchor="end">{_esc(name)}</text>')
        out.append(f'<rect x="{label}" y="{y}" width="{r["median_ms"] * scale:.1f}" height="{h - 5}" fill="{color}"/>')
        out.append(f'<line x1="{label + r["median_ms"] * scale:.1f}" y1="{y + (h - 5) / 2}" '
                   f'x2="{label + r["p90_ms"] * scale:.1f}" y2="{y + (h - 5) / 2}" stroke="#333"/>')
        out.append(f'<text x="{label + max(r["p90_ms"], r["median_ms"]) * scale + 4:.1f}" y="{y + 12}" '
                   f'font-size="11">{r["median_ms"]:.3f} ms</text>')
    out.append("</svg>")
    return "".join(out)


def _fidelity(fid: dict | None, title: str) -> str:
    if not fid or not fid.get("outputs"):
        return ""
    out = [f"<h3>{_esc(title)}</h3><table><tr><th>output</th><th>cosine</th><th>SQNR dB</th></tr>"
           + "".join(f"<tr><td>{_esc(o['name'])}</td><td>{float(o['cosine']):.4f}</td><td>{_esc(o['sqnr_db'])}</td></tr>"
                     for o in fid["outputs"]) + "</table>"]
    for key, label in (("detection_ap", "detection AP@0.5 vs original"), ("top1_agreement", "top-1 agreement")):
        if fid.get(key) is not None:
            out.append(f"<p>{label}: <b>{fid[key]:.4f}</b></p>")
    if fid.get("embedding"):
        out.append(f"<p>embedding cosine: mean <b>{fid['embedding']['mean_cosine']:.4f}</b>, "
                   f"min {fid['embedding']['min_cosine']:.4f}</p>")
    return "".join(out)


def render(report: dict, preview: str = "") -> str:
    """HTML for a slim / quantize / slim+int8 / check report dict."""
    kind = report.get("kind", "report")
    parts = [f"<h1>onnxprune {kind}</h1>"]
    if kind == "slim+int8":
        parts.append(_fidelity(report.get("fidelity"), "End to end: the int8 model against the original fp32"))
    for sub in ([report["slim"], report["quantize"]] if kind == "slim+int8" else [report]):
        parts.append(_sweep_section(sub) if kind == "sweep" else _section(sub))
    if preview:
        parts.append("<h2>Detections on a held-out photo</h2><p>green: original, red dashed: compressed</p>" + preview)
    style = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:900px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}h2{margin-top:28px}")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>onnxprune {_esc(kind)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def frontier(rows: list[dict], width: int = 760, height: int = 360) -> str:
    """Fidelity against latency ratio, one colour per model, Pareto points ringed (a sweep's result)."""
    pts = [r for r in rows if r.get("status") == "ok" and r.get("latency_ratio") is not None]
    if not pts:
        return "<p>No completed point.</p>"
    pad = 48
    xs, ys = [r["latency_ratio"] for r in pts], [r["fidelity"] for r in pts]
    x0, x1 = min(xs + [1.0]) * 0.95, max(xs + [1.0]) * 1.05
    y0, y1 = min(ys) - 0.02, min(1.0, max(ys)) + 0.01
    models = list(dict.fromkeys(r["model"] for r in pts))

    def xy(x: float, y: float) -> tuple[float, float]:
        return (pad + (x - x0) / (x1 - x0) * (width - 2 * pad),
                height - pad - (y - y0) / max(y1 - y0, 1e-9) * (height - 2 * pad))

    ox, _ = xy(1.0, y0)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="fidelity vs latency">',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>',
           f'<line x1="{ox:.1f}" y1="{pad}" x2="{ox:.1f}" y2="{height - pad}" stroke="#999" stroke-dasharray="3 3"/>',
           f'<text x="{width / 2}" y="{height - 10}" font-size="12" text-anchor="middle">latency / original '
           f'({x0:.2f} to {x1:.2f}; left is faster)</text>',
           f'<text x="8" y="{pad - 14}" font-size="12">fidelity vs the original ({y0:.3f} to {y1:.3f})</text>']
    for r in pts:
        x, y = xy(r["latency_ratio"], r["fidelity"])
        c = PALETTE[models.index(r["model"]) % len(PALETTE)]
        tip = _esc(f"{r['model']} {budget_text(r.get('ratio'), r.get('speedup'))} {r['criterion']}{' int8' if r['int8'] else ''}: "
                   f"fidelity {r['fidelity']:.4f}, latency x{r['latency_ratio']:.3f}")
        ring = ' stroke="#000" stroke-width="2"' if r.get("pareto") else ""
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{c}"{ring}><title>{tip}</title></circle>')
    for i, m in enumerate(models):
        out.append(f'<text x="{width - pad - 180}" y="{pad + 14 * i}" font-size="11" fill="{PALETTE[i % len(PALETTE)]}">'
                   f'● {_esc(m)}</text>')
    out.append("</svg>")
    return "".join(out)


def _sweep_section(r: dict) -> str:
    cols = ("model", "ratio", "speedup", "criterion", "int8", "achieved_ratio", "fidelity", "fidelity_metric", "latency_ratio",
            "size_bytes", "pareto", "status", "error")
    head = "".join(f"<th>{c}</th>" for c in cols)

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else _esc("" if v is None else v)
    body = "".join("<tr>" + "".join(f"<td>{cell(row.get(c))}</td>" for c in cols) + "</tr>" for row in r["rows"])
    return (f"<p>{len(r['rows'])} points on {_esc(r['executor'])} ({r['workers']} workers), outputs in "
            f"{_esc(r['outdir'])}. Ringed points are on their model's Pareto frontier.</p>"
            f"<h2>Fidelity vs latency</h2>{frontier(r['rows'])}<h2>Points</h2><table><tr>{head}</tr>{body}</table>")


def _section(r: dict) -> str:
    kind = r.get("kind")
    rows = []
    if kind == "slim":
        rows = [("model", r["model"]), ("output", r.get("output")), ("criterion", r["criterion"]),
                ("parameters", f"{r['params_before']:,} → {r['params_after']:,} (removed {r['achieved_ratio']:.1%})"),
                ("MACs", f"{r['macs_before']:,} → {r['macs_after']:,} (×{r['mac_ratio']:.3f})"),
                ("round-to", r["round_to"]), ("allocation", r.get("allocation"))]
    elif kind == "quantize":
        rows = [("model", r["model"]), ("ranges", r["thresholds"]),
                ("size", f"{r['size_before']:,} → {r['size_after']:,} bytes"),
                ("ORT kernels", ", ".join(f"{k} {v}" for k, v in list(r["kernels"].items())[:8])),
                ("kept in float", ", ".join(r.get("excluded", [])) or "none")]
    elif kind == "check":
        rows = [(c["name"], f"{'PASS' if c['passed'] else 'FAIL'} {_num(c.get('value'))} "
                 f"(threshold {_num(c.get('threshold'))}): {c.get('detail', '')}") for c in r.get("criteria", [])]
    elif kind == "bench":
        rows = [(f"{b['model']} · {b['provider']} · {b['threads']}T · "
                 + dims_text(b["input_shapes"]),
                 f"median {b['median_ms']:.3f} ms (min {b['min_ms']:.3f}, p90 {b['p90_ms']:.3f}), "
                 f"{b['throughput']:.1f} samples/s"
                 + (f", x{b['speedup']:.3f} vs first" if b.get("speedup") is not None else "")
                 + f"; params {b['params']:,}, MACs {b['macs']:,}, int8/float nodes {b['int8_nodes']}/"
                 f"{b['float_nodes']}, peak memory {b['peak_mem_mb']} MB, {b['file_bytes']:,} bytes"
                 + (f", NetScore {b['netscore']:.2f}" if b.get("netscore") is not None else ""))
                for b in r.get("rows", [])]
    out = [f"<h2>{_esc(kind)}</h2><table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
           + "</table>"]
    out.append(_fidelity(r.get("fidelity"), "Fidelity on held-out samples"))
    if kind == "bench" and r.get("rows"):
        out.append("<h3>Latency</h3>" + latency_bars(r["rows"]))
    if kind == "check" and r.get("latency"):
        from .plots import check_latency_rows
        out.append("<h3>Latency</h3>" + latency_bars(check_latency_rows(r)))
    if kind == "slim":
        out.append("<h3>Channels kept per layer</h3>" + channel_bars(r["layers"]))
        if r.get("sensitivity"):
            out.append("<h3>Sensitivity scan</h3>" + sensitivity_curves(r["sensitivity"]))
    if r.get("warnings"):
        out.append("<h3>Warnings</h3><ul>" + "".join(f"<li>{_esc(w)}</li>" for w in r["warnings"]) + "</ul>")
    if r.get("notes"):
        out.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in r["notes"]) + "</ul>")
    return "".join(out)


def write_report(report: Any, directory: str | Path, preview: str = "") -> Path:
    """Write ``directory/report.html`` for a report object (anything with ``to_dict()``)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(render(_finite(report.to_dict()), preview), d / "report.html")
