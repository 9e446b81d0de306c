"""report.html: one self-contained page (inline SVG, no external assets) for any report.

People look at pictures before tables: channels kept per layer, the sensitivity curves the
allocator used, latency, a sweep's frontier, and for detectors the original's and the compressed
model's boxes on a held-out photo. The charts are drawn once, by :mod:`onnxprune.plots`
(matplotlib): the page inlines each figure as SVG and :func:`write_report` writes the same figure
beside the page as a PNG. The detection preview is the photo with both models' boxes overlaid in
plain SVG (:func:`detection_overlay`), so it travels in results without matplotlib.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import plots
from .graph.io import write_bytes_atomic, write_text_atomic
from .report import _finite, dims_text


@dataclass(frozen=True)
class Page:
    """A rendered report: the HTML, and the PNG of each chart it inlines (file name to bytes)."""

    html: str
    pngs: dict[str, bytes]


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any) -> str:
    return "—" if x is None else f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


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


def render(report: dict, preview: str = "") -> Page:
    """The page for a slim / quantize / slim+int8 / check / bench / sweep report dict, and its charts' PNGs.

    ``preview``: a :class:`DetectionPreview` adds the photo to the page and ``detections.png``.
    """
    kind = report.get("kind", "report")
    charts: list[plots.Chart] = []
    parts = [f"<h1>onnxprune {_esc(kind)}</h1>"]
    if kind == "slim+int8":
        parts.append(_fidelity(report.get("fidelity"), "End to end: the int8 model against the original fp32"))
    for sub in ([report["slim"], report["quantize"]] if kind == "slim+int8" else [report]):
        parts.append(_sweep_section(sub, charts) if kind == "sweep" else _section(sub, charts))
    if preview:
        parts.append("<h2>Detections on a held-out photo</h2><p>green: original, red dashed: compressed</p>" + preview)
    style = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:900px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}h2{margin-top:28px}"
             "figure.chart{margin:16px 0}figure.chart svg{max-width:100%;height:auto}")
    page = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>onnxprune {_esc(kind)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    pngs = {f"{c.name}.png": c.png() for c in charts}
    image = getattr(preview, "image", None)
    if image is not None:
        pngs["detections.png"] = plots.png_bytes(plots.detections(image, preview.ref, preview.got))
    return Page(page, pngs)


def _charts(part: dict, charts: list) -> str:
    """Each chart of a section inlined as SVG (titled inside); kept in ``charts`` to write the same figure as a PNG."""
    out = []
    for chart in plots.section_charts(part):
        charts.append(chart)
        out.append(f'<figure class="chart" id="chart-{chart.name}" data-png="{chart.name}.png">{chart.svg()}</figure>')
    return "".join(out)


def _sweep_section(r: dict, charts: list) -> str:
    cols = ("model", "ratio", "speedup", "criterion", "int8", "achieved_ratio", "fidelity", "fidelity_metric", "latency_ratio",
            "size_bytes", "pareto", "status", "error")
    head = "".join(f"<th>{c}</th>" for c in cols)

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else _esc("" if v is None else v)
    body = "".join("<tr>" + "".join(f"<td>{cell(row.get(c))}</td>" for c in cols) + "</tr>" for row in r["rows"])
    return (f"<p>{len(r['rows'])} points on {_esc(r['executor'])} ({r['workers']} workers), outputs in "
            f"{_esc(r['outdir'])}. Points on their model's Pareto frontier are joined in red; dominated ones are grey.</p>"
            f"{_charts(r, charts) or '<p>No completed point.</p>'}<h2>Points</h2><table><tr>{head}</tr>{body}</table>")


def _section(r: dict, charts: list) -> str:
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
    out.append(_charts(r, charts))
    if r.get("warnings"):
        out.append("<h3>Warnings</h3><ul>" + "".join(f"<li>{_esc(w)}</li>" for w in r["warnings"]) + "</ul>")
    if r.get("notes"):
        out.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in r["notes"]) + "</ul>")
    return "".join(out)


def write_files(report: Any, directory: str | Path, preview: str = "") -> tuple[Path, list[Path]]:
    """Write ``directory/report.html`` and, beside it, the PNG of each chart, for a report object (anything
    with ``to_dict()``) or its dict; returns (page, PNGs)."""
    page = render(_finite(report.to_dict() if hasattr(report, "to_dict") else dict(report)), preview)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pngs = [write_bytes_atomic(data, d / name) for name, data in page.pngs.items()]
    return write_text_atomic(page.html, d / "report.html"), pngs


def write_report(report: Any, directory: str | Path, preview: str = "") -> Path:
    """Write ``directory/report.html`` and its charts' PNGs (see :func:`write_files`); returns the page."""
    return write_files(report, directory, preview)[0]
