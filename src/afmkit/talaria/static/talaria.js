// Talaria's page: the analysis comes once from /api/analysis; every what-if is computed here.
"use strict";

let A = null; // the analysis
const state = { bits: {}, embedBits: 8, profile: "this-cpu", sortKey: null, sortDir: 1 };
const $ = (id) => document.getElementById(id);

// The same arithmetic as afmkit/talaria/roofline.py's predict (tests/talaria checks they agree).
function rowFormat(row, bits, embedBits) {
  if (row.group === "matrix") return String(bits[row.name]);
  if (row.group === "embedding" || row.group === "head") return String(embedBits);
  return "-";
}

function predict(bits, embedBits) {
  const out = { size_bytes: 0, matrix_bits: 0, matrix_weights: 0, measured_decode_s: 0, measured_prefill_s: 0, loss_rise: 0, profiles: {} };
  for (const p of A.profiles) out.profiles[p.name] = { decode_s: 0, prefill_s: 0, energy_j: 0 };
  for (const row of A.rows) {
    const fmt = rowFormat(row, bits, embedBits);
    if (row.group === "matrix") {
      const stored = row.bytes_decode[fmt] - 4 * (row.k + row.n);
      out.size_bytes += stored;
      out.matrix_bits += 8 * stored;
      out.matrix_weights += row.k * row.n;
      out.loss_rise += row.sensitivity[fmt];
    } else if (row.group === "embedding") {
      out.size_bytes += row.params * (Number(fmt) / 8) + (row.params / 32) * 2;
    } else if (row.group === "norm") {
      out.size_bytes += 4 * row.params;
    }
    out.measured_decode_s += row.measured_decode[fmt];
    out.measured_prefill_s += row.measured_prefill[fmt];
    for (const p of A.profiles) {
      const acc = out.profiles[p.name];
      for (const mode of ["decode", "prefill"]) {
        acc[mode + "_s"] += Math.max(row["flops_" + mode] / p.peak_flops, row["bytes_" + mode][fmt] / p.bandwidth);
      }
      acc.energy_j += (row.flops_decode * p.pj_per_flop + row.bytes_decode[fmt] * p.pj_per_byte) * 1e-12;
    }
  }
  out.bits_per_weight = out.matrix_bits / out.matrix_weights;
  out.perplexity = A.eval.float_perplexity * Math.exp(out.loss_rise);
  return out;
}

// -- formatting -------------------------------------------------------------------------------
const fmtNum = (x, d = 2) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(d));
const fmtInt = (x) => Math.round(x).toLocaleString("en-US");
const ms = (s) => fmtNum(s * 1e3, 3) + " ms";
const us = (s) => fmtNum(s * 1e6, 1);

function profileOf(name) { return A.profiles.find((p) => p.name === name); }

// Per-row metrics at the current choice (what the table, sort and strip show).
function metrics(row) {
  const fmt = rowFormat(row, state.bits, state.embedBits);
  const p = profileOf(state.profile);
  const roof = (mode) => Math.max(row["flops_" + mode] / p.peak_flops, row["bytes_" + mode][fmt] / p.bandwidth);
  return {
    name: row.name,
    layer: row.layer === null ? -1 : row.layer,
    kind: row.kind,
    bits: fmt === "-" ? "" : fmt,
    params: row.params,
    bytes: row.bytes_decode[fmt],
    flops_decode: row.flops_decode,
    flops_prefill: row.flops_prefill,
    measured_decode_us: row.measured_decode[fmt] * 1e6,
    measured_prefill_us: row.measured_prefill[fmt] * 1e6,
    est_decode_us: roof("decode") * 1e6,
    est_prefill_us: roof("prefill") * 1e6,
    est_energy_uj: (row.flops_decode * p.pj_per_flop + row.bytes_decode[fmt] * p.pj_per_byte) * 1e-6,
    sensitivity: row.sensitivity ? row.sensitivity[fmt] : 0,
  };
}

const COLUMNS = [
  ["name", "operation"], ["layer", "layer"], ["kind", "type"], ["bits", "bits"], ["params", "params"],
  ["bytes", "bytes/token (decode)"], ["flops_decode", "FLOPs/token decode"], ["flops_prefill", "FLOPs/token prefill"],
  ["measured_decode_us", "measured µs decode (this CPU)"], ["measured_prefill_us", "measured µs/token prefill"],
  ["est_decode_us", "est. µs decode"], ["est_prefill_us", "est. µs/token prefill"], ["est_energy_uj", "est. µJ/token"],
  ["sensitivity", "sensitivity (nats/token)"],
];
const STRIP_METRICS = COLUMNS.filter(([k]) => !["name", "layer", "kind", "bits"].includes(k));

function cell(key, value, row) {
  if (key === "bits" && row.group === "matrix") {
    const options = A.widths.map((b) => `<option value="${b}" ${String(b) === value ? "selected" : ""}>${b}</option>`).join("");
    return `<select class="row-bits" data-name="${row.name}">${options}</select>`;
  }
  if (key === "name" || key === "kind" || key === "bits") return value;
  if (key === "layer") return value < 0 ? "" : value;
  if (key === "sensitivity") return value ? value.toExponential(2) : "";
  if (key.endsWith("_us") || key.endsWith("_uj")) return fmtNum(value, 2);
  return fmtInt(value);
}

function renderTable() {
  const query = $("search").value.trim().toLowerCase();
  const kind = $("filter-kind").value;
  let rows = A.rows.filter((r) => (!kind || r.kind === kind) && (!query || r.name.toLowerCase().includes(query)));
  let shown = rows.map((r) => [r, metrics(r)]);
  if (state.sortKey) {
    const k = state.sortKey;
    shown.sort((a, b) => (a[1][k] < b[1][k] ? -1 : a[1][k] > b[1][k] ? 1 : 0) * state.sortDir);
  }
  $("ops").querySelector("tbody").innerHTML = shown
    .map(([r, m]) => `<tr data-name="${r.name}">${COLUMNS.map(([k]) => `<td data-col="${k}">${cell(k, m[k], r)}</td>`).join("")}</tr>`)
    .join("");
  $("row-count").textContent = `${shown.length} of ${A.rows.length} operations`;
}

function renderStrip() {
  const key = $("strip-metric").value;
  const layers = A.model.config.n_layers;
  const totals = new Array(layers).fill(0);
  for (const r of A.rows) if (r.layer !== null) totals[r.layer] += metrics(r)[key];
  const max = Math.max(...totals) || 1;
  $("strip").innerHTML = totals
    .map((t, i) => {
      const shade = Math.round(255 - 200 * (t / max));
      return `<div data-layer="${i}" title="layer ${i}: ${fmtNum(t, 3)}" style="background: rgb(255, ${shade}, ${shade})">${i}</div>`;
    })
    .join("");
}

function renderSummary() {
  const p = predict(state.bits, state.embedBits);
  const prof = p.profiles[state.profile];
  $("pred-size").textContent = fmtNum(p.size_bytes / 1e6, 2) + " MB";
  $("pred-bpw").textContent = `${fmtNum(p.bits_per_weight, 3)} bits per matrix weight`;
  $("pred-decode-measured").textContent = ms(p.measured_decode_s);
  $("pred-decode").textContent = ms(prof.decode_s);
  $("pred-prefill").textContent = ms(prof.prefill_s);
  $("pred-prefill-measured").textContent = ` (this CPU measured: ${ms(p.measured_prefill_s)})`;
  $("pred-energy").textContent = fmtNum(prof.energy_j * 1e3, 3) + " mJ";
  $("pred-ppl").textContent = fmtNum(p.perplexity, 2);
  $("pred-loss").textContent = ` float ${fmtNum(A.eval.float_perplexity, 2)}; +${fmtNum(p.loss_rise, 4)} nats/token`;
  for (const el of document.querySelectorAll(".profile-name")) el.textContent = state.profile;
  return p;
}

function render() { renderSummary(); renderTable(); renderStrip(); }

// -- actions ----------------------------------------------------------------------------------
function applyBits() {
  const kind = $("set-kind").value;
  const lo = Number($("set-from").value), hi = Number($("set-to").value);
  const bits = Number($("set-bits").value);
  for (const r of A.rows) {
    if (r.group !== "matrix" || (kind !== "all" && r.kind !== kind) || r.layer < lo || r.layer > hi) continue;
    state.bits[r.name] = bits;
  }
  render();
}

async function post(url, body) {
  const response = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await response.json();
  if (!response.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
  return data;
}

async function exportRecipe() {
  $("verify-error").textContent = "";
  try {
    const recipe = await post("/api/export", { bits: state.bits, embed_bits: state.embedBits });
    const text = JSON.stringify(recipe, null, 2) + "\n";
    $("export-json").textContent = text;
    $("export-download").href = URL.createObjectURL(new Blob([text], { type: "application/json" }));
    $("export-box").hidden = false;
  } catch (e) { $("verify-error").textContent = e.message; }
}

async function loadRecipe() {
  $("recipe-error").textContent = ""; $("recipe-ok").textContent = "";
  let data;
  try { data = JSON.parse($("recipe-input").value); } catch (e) { $("recipe-error").textContent = `not valid JSON: ${e.message}`; return; }
  try {
    const recipe = await post("/api/recipe", data);
    state.bits = { ...recipe.bits }; state.embedBits = recipe.embed_bits; $("embed-bits").value = String(recipe.embed_bits);
    $("recipe-ok").textContent = `loaded: ${Object.keys(recipe.bits).length} matrices`;
    render();
  } catch (e) { $("recipe-error").textContent = e.message; }
}

let verifyPrediction = null;
async function startVerify() {
  $("verify-error").textContent = "";
  try {
    verifyPrediction = predict(state.bits, state.embedBits);
    await post("/api/verify", { bits: state.bits, embed_bits: state.embedBits });
    $("verify-progress").hidden = false;
    pollVerify();
  } catch (e) { $("verify-error").textContent = e.message; }
}

async function pollVerify() {
  const s = await (await fetch("/api/verify")).json();
  $("verify-progress").value = s.fraction; $("verify-phase").textContent = s.phase;
  if (s.running) { setTimeout(pollVerify, 500); return; }
  if (s.error) { $("verify-error").textContent = s.error; return; }
  const m = s.result, p = verifyPrediction;
  const put = (metric, pred, meas) => {
    const tds = document.querySelectorAll(`#verify-table tr[data-metric="${metric}"] td`);
    tds[1].textContent = pred; tds[2].textContent = meas;
  };
  put("bpw", fmtNum(p.bits_per_weight, 3), fmtNum(m.bits_per_weight, 3));
  put("decode", fmtNum(p.measured_decode_s * 1e3, 2), fmtNum(m.decode_s * 1e3, 2));
  put("perplexity", fmtNum(p.perplexity, 2), fmtNum(m.perplexity, 2));
  put("size", fmtNum(p.size_bytes / 1e6, 2), fmtNum(m.file_bytes / 1e6, 2) + " (files)");
  $("verify-table").hidden = false;
}

function option(value, label) { return `<option value="${value}">${label ?? value}</option>`; }

async function init() {
  A = await (await fetch("/api/analysis")).json();
  for (const name of A.matrices) state.bits[name] = 4;
  state.profile = A.device;
  $("model-name").textContent = `${A.model.name} (${A.model.fingerprint})`;
  $("analysis-info").textContent =
    `sensitivity: ${A.sensitivity.kind}, calibration ${A.sensitivity.calibration.file}; perplexity text: ${A.eval.source}; ` +
    `decode with ${A.context} cached tokens, prefill of ${A.context}; CPU probe ${fmtNum(A.probe.flops / 1e9, 1)} GFLOP/s, ` +
    `${fmtNum(A.probe.bandwidth / 1e9, 1)} GB/s (shared machine: timings are noisy)`;
  $("profile").innerHTML = A.profiles.map((p) => option(p.name, p.label)).join("");
  $("profile").value = state.profile;
  $("embed-bits").innerHTML = A.embed_widths.map((b) => option(b)).join("");
  $("embed-bits").value = "8";
  $("set-bits").innerHTML = A.widths.map((b) => option(b)).join("");
  $("set-bits").value = "4";
  $("set-to").value = A.model.config.n_layers - 1;
  const kinds = [...new Set(A.rows.map((r) => r.kind))];
  $("filter-kind").innerHTML += kinds.map((k) => option(k)).join("");
  $("set-kind").innerHTML += [...new Set(A.rows.filter((r) => r.group === "matrix").map((r) => r.kind))].map((k) => option(k)).join("");
  $("strip-metric").innerHTML = STRIP_METRICS.map(([k, label]) => option(k, label)).join("");
  $("strip-metric").value = "sensitivity"; // the one that differs layer to layer
  $("ops-head").innerHTML = COLUMNS.map(([k, label]) => `<th data-key="${k}">${label}</th>`).join("");
  $("sources").innerHTML = A.profiles
    .map((p) => `<p><b>${p.label}</b> — ${fmtNum(p.peak_flops / 1e12, 2)} TFLOP/s, ${fmtNum(p.bandwidth / 1e9, 1)} GB/s, ` +
      `${fmtNum(p.pj_per_byte, 1)} pJ/byte, ${fmtNum(p.pj_per_flop, 2)} pJ/FLOP; ${p.measured ? "speeds measured here, energies" : "all figures"} ` +
      `ESTIMATES from: ${p.sources.join("; ")}</p>`)
    .join("");
  $("verify").disabled = !A.can_verify;

  $("profile").onchange = (e) => { state.profile = e.target.value; render(); };
  $("embed-bits").onchange = (e) => { state.embedBits = Number(e.target.value); render(); };
  $("apply-bits").onclick = applyBits;
  $("export").onclick = exportRecipe;
  $("verify").onclick = startVerify;
  $("load-recipe").onclick = loadRecipe;
  $("recipe-file").onchange = async (e) => { $("recipe-input").value = await e.target.files[0].text(); loadRecipe(); };
  $("search").oninput = renderTable;
  $("filter-kind").onchange = renderTable;
  $("strip-metric").onchange = renderStrip;
  $("strip").onclick = (e) => { const l = e.target.dataset.layer; if (l !== undefined) { $("search").value = `layers.${l}.`; renderTable(); } };
  $("ops-head").onclick = (e) => {
    const key = e.target.dataset.key; if (!key) return;
    state.sortDir = state.sortKey === key ? -state.sortDir : -1; state.sortKey = key; renderTable();
  };
  $("ops").querySelector("tbody").onchange = (e) => {
    if (!e.target.classList.contains("row-bits")) return;
    state.bits[e.target.dataset.name] = Number(e.target.value); renderSummary(); renderStrip();
  };
  render();
  window.talariaReadyMs = performance.now(); // since navigation began: the page-open time
  document.body.dataset.ready = "1";
}

init();
