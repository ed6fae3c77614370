// Hand-written SVG charts (no library, works offline): a line chart with labelled points and marks.
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  }

  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) return [lo];
    const step0 = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= step0);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) out.push(+v.toFixed(12));
    return out;
  }

  function fmt(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) return v.toExponential(1);
    return +v.toPrecision(3) + "";
  }

  // opts: {series: [{name, color, points: [{x, y, label, marks: ["knee","chosen"]}]}], xLabel, yLabel, logY,
  //        width, height, id}
  function line(container, opts) {
    container.innerHTML = "";
    const W = opts.width || 760, H = opts.height || 380, m = {l: 70, r: 20, t: 16, b: 46};
    const pts = opts.series.flatMap(s => s.points).filter(p => isFinite(p.x) && isFinite(p.y));
    const svg = el("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", id: opts.id || ""}, container);
    if (!pts.length) {
      el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, svg).textContent = "no data";
      return svg;
    }
    // log scale: points at exactly 0 (lossless types) cannot be drawn on it; they are listed under the chart
    const logY = !!opts.logY && pts.some(p => p.y > 0);
    const dropped = logY ? pts.filter(p => p.y <= 0) : [];
    if (logY) for (const s of opts.series) s.points = s.points.filter(p => p.y > 0);
    pts.splice(0, pts.length, ...pts.filter(p => !logY || p.y > 0));
    const ty = v => logY ? Math.log10(v) : v;
    let x0 = Math.min(...pts.map(p => p.x)), x1 = Math.max(...pts.map(p => p.x));
    let y0 = Math.min(...pts.map(p => ty(p.y))), y1 = Math.max(...pts.map(p => ty(p.y)));
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { y0 -= 1; y1 += 1; }
    const padX = (x1 - x0) * 0.04, padY = (y1 - y0) * 0.08;
    x0 -= padX; x1 += padX; y0 -= padY; y1 += padY;
    const px = x => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r);
    const py = y => H - m.b - (ty(y) - y0) / (y1 - y0) * (H - m.t - m.b);
    // axes and grid
    const g = el("g", {class: "axes"}, svg);
    for (const t of niceTicks(x0, x1, 8)) {
      const x = px(t);
      el("line", {x1: x, x2: x, y1: m.t, y2: H - m.b, stroke: "#eee"}, g);
      el("text", {x, y: H - m.b + 14, "text-anchor": "middle"}, g).textContent = fmt(t);
    }
    const yt = logY ? niceTicks(Math.floor(y0), Math.ceil(y1), 6).filter(v => Number.isInteger(v) && v >= y0 && v <= y1)
                    : niceTicks(y0, y1, 6);
    for (const t of yt) {
      const y = H - m.b - (t - y0) / (y1 - y0) * (H - m.t - m.b);
      el("line", {x1: m.l, x2: W - m.r, y1: y, y2: y, stroke: "#eee"}, g);
      el("text", {x: m.l - 6, y: y + 4, "text-anchor": "end"}, g).textContent = logY ? fmt(Math.pow(10, t)) : fmt(t);
    }
    el("line", {x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, stroke: "#888"}, g);
    el("line", {x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, stroke: "#888"}, g);
    el("text", {x: (m.l + W - m.r) / 2, y: H - 8, "text-anchor": "middle"}, g).textContent = opts.xLabel || "";
    el("text", {x: 14, y: (m.t + H - m.b) / 2, "text-anchor": "middle",
                transform: `rotate(-90 14 ${(m.t + H - m.b) / 2})`}, g).textContent =
      (opts.yLabel || "") + (logY ? " (log)" : "");
    // series
    opts.series.forEach((s, i) => {
      const color = s.color || ["#0969da", "#8250df", "#1a7f37", "#bf3989"][i % 4];
      const sp = s.points.filter(p => isFinite(p.x) && isFinite(p.y));
      if (s.line !== false && sp.length > 1)
        el("polyline", {points: sp.map(p => `${px(p.x)},${py(p.y)}`).join(" "), fill: "none", stroke: color,
                        "stroke-width": 1.5, class: "series"}, svg);
      for (const p of sp) {
        const marks = p.marks || [];
        const c = el("circle", {cx: px(p.x), cy: py(p.y), r: marks.length ? 6 : 3.5,
                                fill: marks.includes("chosen") ? "#cf222e" : marks.includes("knee") ? "#bf8700" : color,
                                stroke: marks.includes("knee") ? "#bf8700" : "#fff", "stroke-width": 2,
                                class: ["point", ...marks].join(" "), "data-label": p.label || ""}, svg);
        el("title", {}, c).textContent = `${p.label || ""}: x=${fmt(p.x)} y=${fmt(p.y)}` +
          (marks.length ? ` (${marks.join(", ")})` : "");
        if (p.label) el("text", {x: px(p.x) + 6, y: py(p.y) - 7, class: "point-label"}, svg).textContent =
          p.label + (marks.includes("knee") ? " ◆knee" : "") + (marks.includes("chosen") ? " ●chosen" : "");
      }
    });
    if (dropped.length) el("text", {x: W - m.r, y: m.t + 10, "text-anchor": "end", class: "dropped"}, svg).textContent =
      "error 0 (not on log axis): " + dropped.map(p => p.label).join(", ");
    return svg;
  }

  return {line, fmt};
})();
