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

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d")


def _esc(x: Any) -> str:
    return html.escape(str(x))


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


def detection_overlay(image: np.ndarray, ref: np.ndarray, got: np.ndarray) -> str:
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
    return "".join(out)


def render(report: dict, preview: str = "") -> str:
    """HTML for a slim / quantize / slim+int8 / check report dict."""
    kind = report.get("kind", "report")
    parts = [f"<h1>onnxprune {kind}</h1>"]
    for sub in ([report["slim"], report["quantize"]] if kind == "slim+int8" else [report]):
        parts.append(_section(sub))
    if preview:
        parts.append("<h2>Detections on a held-out photo</h2><p>green: original, red dashed: compressed</p>" + preview)
    style = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:900px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}h2{margin-top:28px}")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>onnxprune {_esc(kind)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


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
        rows = [(c["name"], f"{'PASS' if c['passed'] else 'FAIL'} {c.get('value')} (threshold {c.get('threshold')})")
                for c in r.get("criteria", [])]
    out = [f"<h2>{_esc(kind)}</h2><table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
           + "</table>"]
    fid = r.get("fidelity")
    if fid and fid.get("outputs"):
        out.append("<h3>Fidelity on held-out samples</h3><table><tr><th>output</th><th>cosine</th><th>SQNR dB</th></tr>"
                   + "".join(f"<tr><td>{_esc(o['name'])}</td><td>{float(o['cosine']):.4f}</td><td>{_esc(o['sqnr_db'])}</td></tr>"
                             for o in fid["outputs"]) + "</table>")
        for key, label in (("detection_ap", "detection AP@0.5 vs original"), ("top1_agreement", "top-1 agreement")):
            if fid.get(key) is not None:
                out.append(f"<p>{label}: <b>{fid[key]:.4f}</b></p>")
        if fid.get("embedding"):
            out.append(f"<p>embedding cosine: mean <b>{fid['embedding']['mean_cosine']:.4f}</b>, "
                       f"min {fid['embedding']['min_cosine']:.4f}</p>")
    if kind == "slim":
        out.append("<h3>Channels kept per layer</h3>" + channel_bars(r["layers"]))
        if r.get("sensitivity"):
            out.append("<h3>Sensitivity scan</h3>" + sensitivity_curves(r["sensitivity"]))
    if r.get("warnings"):
        out.append("<h3>Warnings</h3><ul>" + "".join(f"<li>{_esc(w)}</li>" for w in r["warnings"]) + "</ul>")
    return "".join(out)


def write_report(report: Any, directory: str | Path, preview: str = "") -> Path:
    """Write ``directory/report.html`` for a report object (anything with ``to_dict()``)."""
    from .report import _finite
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(render(_finite(report.to_dict()), preview), d / "report.html")
