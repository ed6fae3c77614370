"""Report files: table.txt, results.csv, results.json, chart.png (matplotlib) and chart.html (self-contained:
inline SVG drawn here, the data embedded as JSON in a <script type="application/json" id="verify-data">).
"""

from __future__ import annotations

import contextlib
import csv
import html
import io
import json
import math
from pathlib import Path

from outputs import atomic_path
from verify.pipeline import Entry, Report

COLUMNS = ("label", "size MiB", "bpw", "PPL", "mean KLD", "99% KLD", "99.9% KLD", "same top %")
COLORS = {"ours": "#d62728", "uniform": "#1f77b4", "stock": "#2ca02c", "base": "#7f7f7f"}


def _fmt(e: Entry) -> list[str]:
    m = e.metrics

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    return [e.label, f"{e.size_mib:.1f}", f"{e.bpw:.3f}", f"{m.ppl:.4f} ± {m.ppl_err:.4f}", f(m.kld_mean, ".6f"),
            f(m.kld_p99, ".6f"), f(m.kld_p999, ".6f"), f(m.same_top, ".2f")]


def format_table(rep: Report) -> str:
    rows = [list(COLUMNS)] + [_fmt(e) for e in [rep.base, *sorted(rep.entries, key=lambda e: -e.size_mib)]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = f"engine {rep.engine}, text {Path(rep.text).name}, {rep.n_chunk} chunks of {rep.n_ctx} tokens"
    return head + "\n" + "\n".join(lines) + "\n"


def report_data(rep: Report) -> dict:
    return {"engine": rep.engine, "n_ctx": rep.n_ctx, "n_chunk": rep.n_chunk, "text": rep.text,
            "base": rep.base.row(), "entries": [e.row() for e in rep.entries]}


def _csv(rep: Report) -> str:
    buf = io.StringIO()
    rows = [rep.base.row()] + [e.row() for e in rep.entries]
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _points(rep: Report) -> list[Entry]:
    return [e for e in rep.entries if e.metrics.kld_mean is not None]


def chart_png(rep: Report) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for group in ("uniform", "stock", "ours"):
        pts = sorted((e for e in _points(rep) if e.group == group), key=lambda e: e.size_mib)
        if not pts:
            continue
        ax.plot([e.size_mib for e in pts], [max(e.metrics.kld_mean, 1e-9) for e in pts],
                "o-" if group == "uniform" else "o", color=COLORS[group], label=group, ms=6)
        for e in pts:
            ax.annotate(e.label, (e.size_mib, max(e.metrics.kld_mean, 1e-9)), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("size (MiB)")
    ax.set_ylabel("mean KL-divergence vs base")
    ax.set_title(f"KLD vs size: {Path(rep.base.path).name} ({rep.n_chunk}x{rep.n_ctx} tokens, {rep.engine})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def chart_svg(rep: Report, width: int = 760, height: int = 440) -> str:
    """KLD (log scale) vs size, one circle per GGUF with a data-label attribute and a <title> tooltip."""
    pts = _points(rep)
    left, right, top, bottom = 70, 20, 30, 50
    xs = [e.size_mib for e in pts] or [0.0, 1.0]
    ys = [math.log10(max(e.metrics.kld_mean, 1e-9)) for e in pts] or [-3.0, 0.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = math.floor(min(ys)), math.ceil(max(ys))
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 1, x1 + 1
    if y1 - y0 < 1:
        y1 = y0 + 1
    pad = 0.05 * (x1 - x0)
    x0, x1 = x0 - pad, x1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="chart" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           f'fill="none" stroke="#999"/>']
    for d in range(y0, y1 + 1):
        y = py(d)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">1e{d}</text>')
    for i in range(6):
        x = x0 + (x1 - x0) * i / 5
        out.append(f'<text x="{px(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:.1f}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">size (MiB)</text>')
    out.append(f'<text x="16" y="{(top + height - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(top + height - bottom) / 2})">mean KLD vs base (log)</text>')
    for group in ("uniform", "stock", "ours"):
        g = sorted((e for e in pts if e.group == group), key=lambda e: e.size_mib)
        if group == "uniform" and len(g) > 1:
            path = " ".join(f"{px(e.size_mib):.1f},{py(math.log10(max(e.metrics.kld_mean, 1e-9))):.1f}" for e in g)
            out.append(f'<polyline points="{path}" fill="none" stroke="{COLORS[group]}" stroke-width="1.5"/>')
        for e in g:
            cx, cy = px(e.size_mib), py(math.log10(max(e.metrics.kld_mean, 1e-9)))
            lab = html.escape(e.label)
            tip = html.escape(f"{e.label}: {e.size_mib:.1f} MiB, {e.bpw:.3f} bpw, PPL {e.metrics.ppl:.4f}, "
                              f"KLD {e.metrics.kld_mean:.6f}")
            out.append(f'<circle class="pt" cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{COLORS[group]}" '
                       f'data-label="{lab}" data-group="{group}"><title>{tip}</title></circle>'
                       f'<text x="{cx + 7:.1f}" y="{cy - 6:.1f}" font-size="10">{lab}</text>')
    for i, group in enumerate(("ours", "uniform", "stock")):
        out.append(f'<circle cx="{left + 14}" cy="{top + 14 + 16 * i}" r="5" fill="{COLORS[group]}"/>'
                   f'<text x="{left + 24}" y="{top + 18 + 16 * i}">{group}</text>')
    out.append("</svg>")
    return "\n".join(out)


def chart_html(rep: Report) -> str:
    data = json.dumps(report_data(rep)).replace("</", "<\\/")
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _fmt(e)) + "</tr>"
                   for e in [rep.base, *sorted(rep.entries, key=lambda e: -e.size_mib)])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>verify: KLD vs size</title>
<style>body{{font-family:sans-serif;margin:20px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
circle.pt:hover{{stroke:#000;stroke-width:2}}#info{{min-height:1.2em;color:#333}}</style></head>
<body><h2>KL-divergence vs size</h2>
<p>{html.escape(Path(rep.base.path).name)} on {html.escape(Path(rep.text).name)}: {rep.n_chunk} chunks of
{rep.n_ctx} tokens, engine {html.escape(rep.engine)}.</p>
{chart_svg(rep)}
<p id="info">Click a point for its numbers.</p>
<table><tr>{head}</tr>{rows}</table>
<script type="application/json" id="verify-data">{data}</script>
<script>
const data = JSON.parse(document.getElementById('verify-data').textContent);
document.querySelectorAll('circle.pt').forEach(c => c.addEventListener('click', () => {{
  const e = data.entries.find(x => x.label === c.dataset.label);
  if (e) document.getElementById('info').textContent =
    `${{e.label}}: ${{e.size_mib.toFixed(1)}} MiB, ${{e.bpw.toFixed(3)}} bpw, PPL ${{e.ppl.toFixed(4)}}, ` +
    `mean KLD ${{e.kld_mean.toFixed(6)}}, 99.9% KLD ${{e.kld_p999.toFixed(6)}}, same top ${{e.same_top.toFixed(2)}}%`;
}}));
</script></body></html>
"""


def write_report(rep: Report, out_dir: Path) -> dict[str, Path]:
    """Write every report file, all or none: each goes to a temp name first, and the renames happen only once all
    of them are written (a full disk leaves the previous report, not half of a new one); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"table": out_dir / "table.txt", "csv": out_dir / "results.csv", "json": out_dir / "results.json",
             "html": out_dir / "chart.html", "png": out_dir / "chart.png"}
    data: dict[str, str | bytes] = {"table": format_table(rep), "csv": _csv(rep),
                                    "json": json.dumps(report_data(rep), indent=1), "html": chart_html(rep)}
    try:
        data["png"] = chart_png(rep)
    except ImportError:
        files.pop("png")
        print(f"note: matplotlib not installed, {out_dir / 'chart.png'} skipped (pip install matplotlib)")
    with contextlib.ExitStack() as stack:
        for key, content in data.items():
            tmp = stack.enter_context(atomic_path(files[key]))
            tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    return files
