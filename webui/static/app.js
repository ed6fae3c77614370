// The single-page UI: plain DOM + fetch against /api/. All state that matters lives on the server (workspace files
// and the job database); the page only remembers what is open.
"use strict";

const $ = sel => document.querySelector(sel);
const state = {info: null, model: null, tensors: null, plan: null, planPath: null, rows: null, original: {},
               measurements: null, types: {}};

// ------------------------------------------------------------------------------------------------ helpers
function showError(msg) {
  $("#error-text").textContent = msg;
  $("#error").hidden = false;
}
function clearError() { $("#error").hidden = true; $("#error-text").textContent = ""; }
function notice(msg) {
  const n = $("#notice");
  n.textContent = msg; n.hidden = false;
  clearTimeout(notice._t); notice._t = setTimeout(() => { n.hidden = true; }, 6000);
}

async function api(method, path, body) {
  const opts = {method, headers: {}};
  if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  let res;
  try { res = await fetch("/api" + path, opts); }
  catch (e) { const err = new Error("cannot reach the UI server: " + e.message); showError(err.message); throw err; }
  let data;
  try { data = await res.json(); } catch (e) { data = {error: `HTTP ${res.status}`}; }
  if (!res.ok) { showError(data.error || `HTTP ${res.status}`); const err = new Error(data.error); err.shown = true; throw err; }
  return data;
}
const qs = o => "?" + new URLSearchParams(Object.entries(o).filter(([, v]) => v !== undefined && v !== null && v !== "")).toString();
const val = id => $(id).value.trim();
const fmtInt = n => n == null ? "" : Number(n).toLocaleString("en-US");
function fmtBytes(n) {
  if (n == null) return "";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0, v = n;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(2) : v) + " " + u[i];
}
function td(tr, text, cls) { const c = document.createElement("td"); c.textContent = text; if (cls) c.className = cls; tr.appendChild(c); return c; }
function baseName(p) { return (p || "").replace(/\/+$/, "").split("/").pop(); }
function stem(p) { return baseName(p).replace(/\.[^.]+$/, ""); }
function guarded(fn) { return async (...a) => { try { clearError(); await fn(...a); } catch (e) { if (!e.shown) showError(e.message || String(e)); } }; }

// ------------------------------------------------------------------------------------------------ tabs
function showPage(name) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.page === name);
  for (const s of document.querySelectorAll(".page")) s.hidden = s.id !== "page-" + name;
  if (name === "jobs") refreshJobs();
}
for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showPage(b.dataset.page));
$("#error-close").addEventListener("click", clearError);

// ------------------------------------------------------------------------------------------------ jobs
const watchers = {};
function renderJob(box, j) {
  box.innerHTML = "";
  const d = document.createElement("div");
  d.className = "job"; d.dataset.state = j.state; d.dataset.id = j.id;
  const head = document.createElement("div");
  head.innerHTML = `<b>${j.kind} #${j.id}</b> <span class="state state-${j.state}"></span> <span class="pct"></span> <span class="msg muted"></span>`;
  head.querySelector(".state").textContent = j.state;
  head.querySelector(".pct").textContent = (j.progress * 100).toFixed(1) + "%";
  head.querySelector(".msg").textContent = j.message || "";
  d.appendChild(head);
  const bar = document.createElement("div"); bar.className = "bar";
  bar.innerHTML = `<div style="width:${(j.progress * 100).toFixed(1)}%"></div>`;
  d.appendChild(bar);
  if (j.error) { const e = document.createElement("div"); e.className = "err"; e.textContent = j.error; d.appendChild(e); }
  if (j.state === "running" || j.state === "queued") {
    const c = document.createElement("button"); c.textContent = "Cancel"; c.className = "cancel";
    c.addEventListener("click", guarded(() => api("POST", `/jobs/${j.id}/cancel`)));
    d.appendChild(c);
  }
  box.appendChild(d);
}
// Poll a job into `box` until it ends; resolves with the final job.
function watchJob(id, box) {
  if (watchers[box.id]) watchers[box.id].stop = true;
  const w = {stop: false}; watchers[box.id] = w;
  return new Promise(resolve => {
    const tick = async () => {
      if (w.stop) return;
      let j;
      try { j = await (await fetch(`/api/jobs/${id}`)).json(); } catch (e) { setTimeout(tick, 1000); return; }
      renderJob(box, j);
      if (["done", "failed", "cancelled"].includes(j.state)) {
        if (j.state === "failed") showError(`${j.kind} job #${j.id} failed: ${j.error}`);
        resolve(j); return;
      }
      setTimeout(tick, 400);
    };
    tick();
  });
}
async function submit(kind, params, box, extra) {
  if (watchers[box.id]) watchers[box.id].stop = true;
  box.innerHTML = "";  // synchronously, so nothing reads the previous job's state as this one's
  const j = await api("POST", "/jobs", {kind, params, ...(extra || {})});
  return watchJob(j.id, box);
}

async function refreshJobs() {
  const data = await api("GET", "/jobs");
  $("#worker-state").textContent = data.worker ? `(worker pid ${data.worker})` : "(no worker running)";
  const tb = $("#jobs-table tbody"); tb.innerHTML = "";
  for (const j of data.jobs) {
    const tr = document.createElement("tr"); tr.dataset.id = j.id;
    td(tr, j.id); td(tr, j.kind); td(tr, j.state, "state-" + j.state);
    const p = td(tr, ""); p.innerHTML = `<span class="minibar"><span style="width:${(j.progress * 100).toFixed(0)}%"></span></span> ${(j.progress * 100).toFixed(0)}%`;
    td(tr, j.error || j.message || ""); td(tr, new Date(j.created * 1000).toLocaleString());
    const c = td(tr, "");
    const log = document.createElement("button"); log.textContent = "log";
    log.addEventListener("click", guarded(async () => {
      const full = await api("GET", `/jobs/${j.id}`);
      const pre = $("#job-log"); pre.hidden = false; pre.textContent = full.log.join("\n");
    }));
    c.appendChild(log);
    if (j.state === "running" || j.state === "queued") {
      const b = document.createElement("button"); b.textContent = "cancel";
      b.addEventListener("click", guarded(async () => { await api("POST", `/jobs/${j.id}/cancel`); refreshJobs(); }));
      c.appendChild(b);
    }
    tb.appendChild(tr);
  }
}
setInterval(() => { if (!$("#page-jobs").hidden) refreshJobs().catch(() => {}); }, 1500);

// ------------------------------------------------------------------------------------------------ models
async function refreshModels() {
  const data = await api("GET", "/models");
  const ul = $("#model-list"); ul.innerHTML = "";
  for (const m of data.models) {
    const li = document.createElement("li");
    const b = document.createElement("button"); b.textContent = `${m.path}  (${fmtBytes(m.bytes)})`;
    b.addEventListener("click", guarded(() => openModel(m.path)));
    li.appendChild(b); ul.appendChild(li);
  }
}

async function openModel(path) {
  const m = await api("POST", "/models/open", {path});
  state.model = m; state.tensors = null;
  $("#open-path").value = m.path;
  $("#current-model").textContent = m.path;
  const name = m.name;
  // defaults for every later step, derived from the model name
  const defaults = {"#measure-db": `measurements/${name}.sqlite`, "#build-output": `strategies/${name}.yaml`,
    "#plan-path": `strategies/${name}.yaml`, "#plan-save-path": `strategies/${name}-edited.yaml`,
    "#plan-export-path": `strategies/${name}.tensor-types.txt`, "#convert-strategy": `strategies/${name}-edited.yaml`,
    "#convert-outfile": `gguf/${name}-mixed.gguf`, "#verify-base": `gguf/${name}-bf16.gguf`,
    "#verify-candidates": `gguf/${name}-mixed.gguf`, "#verify-output": `verify/${name}`,
    "#tune-gguf": `gguf/${name}-mixed.gguf`, "#tune-base": `gguf/${name}-bf16.gguf`, "#tune-output": `gguf/${name}-tuned.gguf`,
    "#imatrix-path": `measurements/${name}.imatrix.gguf`};
  for (const [id, v] of Object.entries(defaults)) $(id).value = v;
  await loadTensors();
}

async function loadTensors(withImatrix) {
  if (!state.model) throw new Error("open a model first (Models tab)");
  $("#tensor-summary").textContent = "listing tensors…";
  const data = await api("GET", "/tensors" + qs({model: state.model.path, imatrix: withImatrix ? val("#imatrix-path") : ""}));
  state.tensors = data.tensors;
  const tb = $("#tensor-table tbody"); tb.innerHTML = "";
  let params = 0, q = 0;
  for (const t of data.tensors) {
    params += t.n_params; if (t.quantizable) q++;
    const tr = document.createElement("tr"); tr.dataset.name = t.name;
    td(tr, t.name); td(tr, t.shape.join(" × ")); td(tr, fmtInt(t.n_params), "num"); td(tr, t.cls);
    td(tr, t.quantizable ? "yes" : (t.fixed_type || "no"));
    const ic = td(tr, t.imatrix == null ? "–" : (t.imatrix.fraction * 100).toFixed(0) + "% · " + t.imatrix.text, "num imatrix");
    if (t.imatrix && t.imatrix.fraction < 1) ic.classList.add("state-failed");
    tb.appendChild(tr);
  }
  $("#tensor-summary").textContent = `${data.tensors.length} tensors, ${q} quantizable, ${fmtInt(params)} parameters`;
  $("#imatrix-note").textContent = data.imatrix_note || "";
}

$("#dl-start").addEventListener("click", guarded(async () => {
  const repo = val("#dl-repo");
  const token = $("#dl-token").value.trim();
  $("#dl-token").value = "";  // the token leaves the page with this one request and is not kept
  const j = await submit("download", {repo_id: repo, revision: val("#dl-revision") || undefined}, $("#dl-job"),
                         token ? {token} : undefined);
  if (j.state === "done") { await refreshModels(); await openModel(j.result.model); notice(`downloaded ${repo}`); }
}));
$("#open-btn").addEventListener("click", guarded(() => openModel(val("#open-path"))));
$("#imatrix-load").addEventListener("click", guarded(() => loadTensors(true)));
$("#imatrix-compute").addEventListener("click", guarded(async () => {
  if (!state.model) throw new Error("open a model first");
  const j = await submit("imatrix", {model: state.model.path, output: val("#imatrix-path"), text: "texts/calibration.txt",
                                     ctx: 128}, $("#imatrix-job"));
  if (j.state === "done") { $("#measure-imatrix").value = val("#imatrix-path"); await loadTensors(true); }
}));

// ------------------------------------------------------------------------------------------------ measure
$("#measure-start").addEventListener("click", guarded(async () => {
  if (!state.model) throw new Error("open a model first (Models tab)");
  const j = await submit("measure", {model: state.model.path, db: val("#measure-db"), imatrix: val("#measure-imatrix") || undefined},
                         $("#measure-job"));
  if (j.state === "done") await loadMeasurements();
}));
$("#measure-load").addEventListener("click", guarded(() => loadMeasurements()));
$("#measure-tensor").addEventListener("change", () => drawMeasurement());
$("#measure-metric").addEventListener("change", () => drawMeasurement());

async function loadMeasurements() {
  const data = await api("GET", "/measurements" + qs({db: val("#measure-db"), plan: state.planPath || ""}));
  state.measurements = data.tensors;
  const sel = $("#measure-tensor"); const keep = sel.value; sel.innerHTML = "";
  for (const t of data.tensors) {
    const o = document.createElement("option"); o.value = t.name; o.textContent = `${t.name} (knee ${t.knee || "?"})`;
    sel.appendChild(o);
  }
  if (keep && data.tensors.some(t => t.name === keep)) sel.value = keep;
  const nTypes = new Set(data.tensors.flatMap(t => t.points.map(p => p.type))).size;
  $("#measure-summary").textContent = `${data.tensors.length} tensors × ${nTypes} types measured`;
  drawMeasurement();
}

function drawMeasurement() {
  if (!state.measurements) return;
  const t = state.measurements.find(x => x.name === $("#measure-tensor").value) || state.measurements[0];
  if (!t) { $("#measure-chart").textContent = "no measurements"; return; }
  const metric = $("#measure-metric").value;
  const chosen = currentType(t.name) || t.chosen;
  const points = t.points.map(p => ({x: p.bpw, y: p[metric], label: p.type,
    marks: [...(p.type === t.knee ? ["knee"] : []), ...(p.type === chosen ? ["chosen"] : [])]}));
  Charts.line($("#measure-chart"), {series: [{name: t.name, points}], xLabel: "bits per weight",
    yLabel: metric, logY: true, id: "measure-svg"});
  $("#measure-chart").dataset.tensor = t.name;
}

// ------------------------------------------------------------------------------------------------ strategy
$("#build-start").addEventListener("click", guarded(async () => {
  const method = $("#build-method").value, target = val("#build-target");
  const params = {db: val("#measure-db"), output: val("#build-output"), model: state.model ? state.model.path : undefined,
                  imatrix: val("#measure-imatrix") || undefined};
  if (method === "size") params.target_size = target;
  if (method === "bpw") params.target_bpw = target;
  if (method !== "knee" && !target) throw new Error("give a target (e.g. 900MiB, or 4.5 bpw)");
  const j = await submit("strategy", params, $("#build-job"));
  if (j.state === "done") { $("#plan-path").value = j.result.strategy; await loadPlan(); }
}));
$("#plan-load").addEventListener("click", guarded(() => loadPlan()));
$("#plan-save").addEventListener("click", guarded(() => savePlan()));
$("#plan-export").addEventListener("click", guarded(async () => {
  const out = val("#plan-export-path");
  if (state.dirty) await savePlan();
  const r = await api("POST", "/plan/tensor-type-file", {path: state.planPath, model: state.model && state.model.path, out});
  const pre = $("#plan-export-text"); pre.hidden = false; pre.textContent = r.text;
  notice(`wrote ${r.lines} lines to ${r.path}`);
}));
$("#plan-set-all").addEventListener("change", () => {
  const t = $("#plan-set-all").value; if (!t) return;
  for (const s of document.querySelectorAll("#plan-table select.type-select"))
    if (!s.disabled && [...s.options].some(o => o.value === t)) { s.value = t; s.dispatchEvent(new Event("change")); }
  $("#plan-set-all").value = "";
});

function rowBytes(r, type) {
  const t = state.types[type]; if (!t) return null;
  const perRow = r.shape[r.shape.length - 1] || 1;
  if (perRow % t.block) return null;
  return (r.n_params / perRow) * (perRow / t.block) * t.bytes;
}
function fits(r, type) { const t = state.types[type]; return !!t && (r.shape[r.shape.length - 1] % t.block) === 0; }
function currentType(name) {
  const s = document.querySelector(`#plan-table select.type-select[data-name="${CSS.escape(name)}"]`);
  return s ? s.value : null;
}

async function loadPlan(path, quiet) {
  path = path || val("#plan-path");
  const data = await api("GET", "/plan" + qs({path, model: state.model ? state.model.path : ""}));
  state.plan = data.plan; state.planPath = data.path; state.dirty = false;
  $("#plan-path").value = data.path;
  if (!data.rows) throw new Error("open the model this strategy is for (Models tab) to edit it per tensor");
  state.rows = data.rows; state.original = {};
  const tb = $("#plan-table tbody"); tb.innerHTML = "";
  const typeNames = state.info.types.map(t => t.name);
  for (const r of data.rows) {
    state.original[r.name] = r.type;
    const tr = document.createElement("tr"); tr.dataset.name = r.name;
    td(tr, r.name); td(tr, r.cls); td(tr, r.shape.join(" × ")); td(tr, fmtInt(r.n_params), "num");
    const c = td(tr, "");
    const s = document.createElement("select"); s.className = "type-select"; s.dataset.name = r.name;
    const opts = r.quantizable ? typeNames.filter(t => fits(r, t)) : [r.type];
    if (!opts.includes(r.type)) opts.push(r.type);
    for (const t of opts) { const o = document.createElement("option"); o.value = o.textContent = t; s.appendChild(o); }
    s.value = r.type; s.disabled = !r.quantizable;
    s.addEventListener("change", () => { onTypeChange(tr, r, s.value); });
    c.appendChild(s);
    td(tr, "", "num bytes"); td(tr, "", "num bpw");
    tb.appendChild(tr);
    updateRow(tr, r, r.type);
  }
  updateTotals();
  if (!quiet) notice(`loaded ${data.path}: ${data.rows.length} tensors`);
  if (state.measurements) drawMeasurement();
}
function updateRow(tr, r, type) {
  const b = rowBytes(r, type);
  tr.querySelector(".bytes").textContent = b == null ? "?" : fmtInt(b);
  tr.querySelector(".bpw").textContent = b == null ? "?" : (8 * b / r.n_params).toFixed(3);
  tr.classList.toggle("changed", type !== state.original[r.name]);
}
function onTypeChange(tr, r, type) { state.dirty = true; updateRow(tr, r, type); updateTotals(); if (state.measurements) drawMeasurement(); }
function updateTotals() {
  let bytes = 0, params = 0, changed = 0;
  for (const r of state.rows) {
    const t = currentType(r.name) || r.type; const b = rowBytes(r, t);
    bytes += b == null ? 0 : b; params += r.n_params; if (t !== state.original[r.name]) changed++;
  }
  $("#plan-total-size").textContent = fmtBytes(bytes);
  $("#plan-total-size").dataset.bytes = bytes;
  $("#plan-total-bpw").textContent = (8 * bytes / params).toFixed(4);
  $("#plan-changed").textContent = changed ? `${changed} tensor(s) changed (unsaved)` : "";
}

async function savePlan() {
  if (!state.plan) throw new Error("load or build a strategy first");
  const plan = JSON.parse(JSON.stringify(state.plan));
  plan.tensors = plan.tensors || {};
  for (const r of state.rows) {
    if (!r.quantizable) continue;
    const t = currentType(r.name);
    if (t === state.original[r.name] && !(r.name in plan.tensors)) continue;  // untouched, resolved by rules/default
    const prev = plan.tensors[r.name];
    plan.tensors[r.name] = (prev && typeof prev === "object") ? (t === prev.type ? prev : {type: t}) : t;
  }
  const path = val("#plan-save-path");
  const res = await api("POST", "/plan/save", {path, plan, model: state.model && state.model.path});
  await loadPlan(res.path, true);
  $("#convert-strategy").value = res.path;
  $("#plan-save-path").value = res.path;
  notice(`saved ${res.path} (${res.tensors} tensors)`);
}

// ------------------------------------------------------------------------------------------------ convert & verify
$("#convert-start").addEventListener("click", guarded(async () => {
  if (!state.model) throw new Error("open a model first (Models tab)");
  const j = await submit("convert", {model: state.model.path, strategy: val("#convert-strategy"), outfile: val("#convert-outfile"),
                                     imatrix: val("#measure-imatrix") || undefined},
                         $("#convert-job"));
  if (j.state === "done") notice(`wrote ${j.result.gguf}`);
}));
$("#base-start").addEventListener("click", guarded(async () => {
  if (!state.model) throw new Error("open a model first (Models tab)");
  const j = await submit("convert", {model: state.model.path, outtype: "bf16", outfile: val("#verify-base")}, $("#convert-job"));
  if (j.state === "done") notice(`wrote ${j.result.gguf}`);
}));
$("#tune-start").addEventListener("click", guarded(async () => {
  const what = ["scales", "norms", "codes"].filter(w => $("#tune-what-" + w).checked);
  if (!what.length) throw new Error("choose what to tune: scales, norms and/or codes");
  const texts = val("#tune-texts").split(",").map(s => s.trim()).filter(Boolean);
  const params = {gguf: val("#tune-gguf"), base: val("#tune-base"), texts: texts.length ? texts : undefined,
                  output: val("#tune-output") || undefined, steps: val("#tune-steps") || undefined, what: what.join(","),
                  ctx: val("#tune-ctx") || undefined, chunks: val("#tune-chunks") || undefined,
                  val_chunks: val("#tune-val-chunks") || undefined};
  const j = await submit("tune", params, $("#tune-job"));
  if (j.state !== "done") return;
  // the tuned file is one more candidate to verify against the base
  const out = j.result.gguf;
  const cands = val("#verify-candidates").split(",").map(s => s.trim()).filter(Boolean);
  if (!cands.includes(out)) $("#verify-candidates").value = [...cands, out].join(", ");
  notice(`wrote ${out}`);
}));
$("#verify-start").addEventListener("click", guarded(async () => {
  const params = {base: val("#verify-base"), candidates: val("#verify-candidates").split(",").map(s => s.trim()).filter(Boolean),
                  text: val("#verify-text"), output: val("#verify-output"), ctx: val("#verify-ctx") || undefined,
                  chunks: val("#verify-chunks") || undefined, model_dir: state.model ? state.model.path : undefined};
  const j = await submit("verify", params, $("#verify-job"));
  if (j.state === "done") await loadVerify(j.result.report);
}));
$("#verify-load").addEventListener("click", guarded(() => loadVerify(val("#verify-output"))));

async function loadVerify(path) {
  const data = await api("GET", "/verify" + qs({path}));
  const rep = data.report;
  const cols = [["label", "label"], ["group", "group"], ["size MiB", "size_mib", 2], ["bpw", "bpw", 3], ["PPL", "ppl", 4],
                ["mean KLD", "kld_mean", 6], ["99% KLD", "kld_p99", 6], ["same top %", "same_top", 2]];
  const thead = $("#verify-table thead"); thead.innerHTML = "";
  const hr = document.createElement("tr");
  for (const [h] of cols) { const th = document.createElement("th"); th.textContent = h; hr.appendChild(th); }
  thead.appendChild(hr);
  const tb = $("#verify-table tbody"); tb.innerHTML = "";
  for (const e of [rep.base, ...rep.entries]) {
    const tr = document.createElement("tr"); tr.dataset.label = e.label;
    for (const [, k, d] of cols) td(tr, e[k] == null ? "–" : (d != null ? Number(e[k]).toFixed(d) : e[k]), d != null ? "num" : "");
    tb.appendChild(tr);
  }
  const groups = {};
  for (const e of rep.entries) if (e.kld_mean != null) (groups[e.group] = groups[e.group] || []).push(e);
  const colors = {ours: "#cf222e", uniform: "#0969da", stock: "#1a7f37"};
  const series = Object.entries(groups).map(([g, es]) => ({name: g, color: colors[g], line: g !== "ours",
    points: es.sort((a, b) => a.size_mib - b.size_mib).map(e => ({x: e.size_mib, y: e.kld_mean, label: e.label}))}));
  Charts.line($("#verify-chart"), {series, xLabel: "file size (MiB)", yLabel: "mean KLD", logY: true, id: "verify-svg"});
  notice(`report ${data.path}: ${rep.entries.length} file(s) vs base`);
}

// ------------------------------------------------------------------------------------------------ start
(async () => {
  try {
    state.info = await api("GET", "/info");
    $("#workspace").textContent = state.info.workspace;
    for (const t of state.info.types) state.types[t.name] = t;
    for (const t of state.info.types) { const o = document.createElement("option"); o.value = o.textContent = t.name; $("#plan-set-all").appendChild(o); }
    await refreshModels();
    document.body.dataset.ready = "1";
  } catch (e) { if (!e.shown) showError(e.message); }
})();
