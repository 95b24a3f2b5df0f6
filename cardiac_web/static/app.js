// The page: two views calling the JSON API (documented in the README). No external assets.
"use strict";
const $ = (id) => document.getElementById(id);
const GROUP_COLORS = ["#E69F00", "#56B4E9", "#009E73", "#CC79A7", "#F0E442", "#0072B2", "#D55E00"];
let schema = null;
let tavr = null;  // the last TAVR result: frames, images, current index
let timer = null;

function showView(name) {
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.view === name);
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== `view-${name}`;
}
for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => showView(t.dataset.view));

function jsonDownload(link, obj) {
  link.href = URL.createObjectURL(new Blob([JSON.stringify(obj, null, 1)], { type: "application/json" }));
}

async function callApi(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: `HTTP ${response.status}` }; }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function loadStatus() {
  const s = await callApi("/api/status");
  const parts = [];
  for (const [name, m] of [["perfusion", s.perfusion], ["tavr", s.tavr]]) {
    parts.push(m.loaded ? `<span>${name}: model loaded</span>` : `<span class="missing" id="missing-${name}">${m.error}</span>`);
  }
  $("status").innerHTML = parts.join(" · ");
  schema = s.tavr.schema;
  const fs = $("tavr-expect");
  if (schema) {
    schema.groups.forEach((g, i) => {
      const label = document.createElement("label");
      label.innerHTML = `<input type="checkbox" name="expect" value="${g.name}" checked> <span style="color:${GROUP_COLORS[i % 7]}">${g.name}</span>`;
      fs.appendChild(label);
    });
    fs.addEventListener("change", regate);
  }
}

// ---------- polar maps ----------
function fillPerfusion(data) {
  const r = data.report;
  $("perf-stress").src = data.images.stress;
  $("perf-rest").src = data.images.rest;
  $("perf-overlay").src = data.images.overlay;
  $("perf-label").textContent = r.label;
  // The call is made at the model's operating point (sensitivity first by default), not at 50%.
  const d = r.decision;
  $("perf-decision").hidden = !d;
  $("perf-decision").textContent = d
    ? `${d.abnormal ? "Abnormal" : "Normal"}: abnormal probability ${(100 * d.abnormal_probability).toFixed(1)}% `
      + `${d.abnormal ? "≥" : "<"} threshold ${(100 * d.threshold).toFixed(1)}% (operating point ${d.operating_point})` : "";
  // Reports of newer models say when the reading of the image itself is doubtful.
  $("perf-uncertain").hidden = !r.uncertain;
  $("perf-uncertain").textContent = r.uncertain
    ? "Uncertain — review" + (r.uncertain_reason ? `: ${r.uncertain_reason}` : "") : "";
  $("perf-probs").tBodies[0].innerHTML = Object.entries(r.probabilities)
    .map(([k, v]) => `<tr><td>${k}</td><td>${(100 * v).toFixed(1)}%</td></tr>`).join("");
  $("perf-sss").textContent = r.SSS;
  $("perf-srs").textContent = r.SRS;
  $("perf-sds").textContent = r.SDS;
  $("perf-tpd-stress").textContent = `${r.TPD_stress.toFixed(1)}%`;
  $("perf-tpd-rest").textContent = `${r.TPD_rest.toFixed(1)}%`;
  $("perf-extent").textContent = `${r.extent_stress_pct.toFixed(1)}%`;
  $("perf-territories").textContent = r.territories.length ? r.territories.join(", ") : "none";
  $("perf-segments").textContent = r.defect_segments.length ? r.defect_segments.join(", ") : "none";
  $("perf-segment-table").tBodies[0].innerHTML = r.stress_scores
    .map((s, i) => `<tr><td>${i + 1}</td><td>${s}</td><td>${r.rest_scores[i]}</td></tr>`).join("");
  jsonDownload($("perf-download"), r);
  $("perf-result").hidden = false;
}

async function submitPerfusion(files) {
  $("perf-error").textContent = "";
  if (!files.length) { $("perf-error").textContent = "pick one study image or two files"; return; }
  const form = new FormData();
  if (files.length === 1) form.append("study", files[0]);
  else { form.append("stress", files[0]); form.append("rest", files[1]); }
  $("perf-submit").disabled = true;
  try { fillPerfusion(await callApi("/api/perfusion/analyze", { method: "POST", body: form })); }
  catch (e) { $("perf-error").textContent = e.message; }
  finally { $("perf-submit").disabled = false; }
}
$("perf-form").addEventListener("submit", (ev) => { ev.preventDefault(); submitPerfusion([...$("perf-file").files]); });

// ---------- aortography ----------
function expectedGroups() {
  const names = [...document.querySelectorAll("input[name=expect]:checked")].map((c) => c.value);
  return names.length ? names.join(",") : "none";
}

function drawFrame() {
  const f = tavr.frames[tavr.index];
  const img = tavr.images[tavr.index];
  const canvas = $("tavr-canvas");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const r = Math.max(3, canvas.width / 100);
  // Points are in frame pixels; a long or large sequence is shown downscaled.
  const sx = canvas.width / tavr.raw.width, sy = canvas.height / tavr.raw.height;
  const groupIndex = Object.fromEntries(schema.groups.map((g, i) => [g.name, i]));
  ctx.font = `${Math.round(r * 3)}px sans-serif`;
  for (const p of f.points) {
    if (!p.reported) continue;
    ctx.strokeStyle = ctx.fillStyle = GROUP_COLORS[groupIndex[p.group] % 7];
    ctx.lineWidth = Math.max(1.5, r / 2.5);
    ctx.beginPath(); ctx.arc(p.x * sx, p.y * sy, r, 0, 2 * Math.PI); ctx.stroke();
    ctx.fillText(p.name, p.x * sx + r * 1.3, p.y * sy - r * 1.3);
  }
  $("tavr-frame-index").textContent = f.index;
  $("tavr-frame-label").textContent = `${tavr.index + 1} / ${tavr.frames.length}` + (f.time_s != null ? ` · ${f.time_s.toFixed(2)} s` : "");
  $("tavr-slider").value = tavr.index;
  $("tavr-groups").tBodies[0].innerHTML = Object.entries(f.groups)
    .map(([g, p]) => `<tr><td>${g}</td><td>${(100 * p).toFixed(1)}%</td></tr>`).join("");
  $("tavr-points").tBodies[0].innerHTML = f.points.map((p) =>
    `<tr class="${p.reported ? "on" : "off"}" data-point="${p.name}"><td>${p.name}</td><td>${p.group}</td><td>${p.visibility.toFixed(3)}</td>` +
    `<td>${p.x.toFixed(1)}</td><td>${p.y.toFixed(1)}</td><td>${p.reported ? "yes" : "no"}</td></tr>`).join("");
}

function showTavr(data) {
  const images = data.frames.map((f) => { const im = new Image(); im.src = f.image; return im; });
  tavr = { id: data.result_id, frames: data.frames, images, index: 0, fps: data.fps || 10, raw: data };
  $("tavr-slider").max = data.frames.length - 1;
  $("tavr-result").hidden = false;
  $("tavr-warning").hidden = !data.warning;
  $("tavr-warning").textContent = data.warning ? `${data.n_frames} of ${data.total_frames} frames: ${data.warning}` : "";
  images[0].decode().then(drawFrame);
  const strip = JSON.parse(JSON.stringify(data));
  strip.frames.forEach((f) => delete f.image);
  jsonDownload($("tavr-download"), strip);
}

async function submitTavr() {
  $("tavr-error").textContent = "";
  const file = $("tavr-file").files[0];
  if (!file) { $("tavr-error").textContent = "pick a frame, a video or a DICOM file"; return; }
  const form = new FormData();
  form.append("media", file);
  form.append("expect", expectedGroups());
  $("tavr-submit").disabled = true;
  try { showTavr(await callApi("/api/tavr/predict", { method: "POST", body: form })); }
  catch (e) { $("tavr-error").textContent = e.message; }
  finally { $("tavr-submit").disabled = false; }
}
$("tavr-form").addEventListener("submit", (ev) => { ev.preventDefault(); submitTavr(); });

async function regate() {
  if (!tavr) return;
  try {
    const data = await callApi(`/api/tavr/result/${tavr.id}?expect=${encodeURIComponent(expectedGroups())}`);
    tavr.frames = data.frames;
    drawFrame();
  } catch (e) { $("tavr-error").textContent = e.message; }
}

$("tavr-slider").addEventListener("input", () => { tavr.index = +$("tavr-slider").value; tavr.images[tavr.index].decode().then(drawFrame); });
$("tavr-play").addEventListener("click", () => {
  if (timer) { clearInterval(timer); timer = null; $("tavr-play").textContent = "▶"; return; }
  $("tavr-play").textContent = "⏸";
  timer = setInterval(() => { tavr.index = (tavr.index + 1) % tavr.frames.length; drawFrame(); }, 1000 / Math.min(tavr.fps, 30));
});

// drag and drop onto either form
for (const [formId, inputId] of [["perf-form", "perf-file"], ["tavr-form", "tavr-file"]]) {
  const form = $(formId);
  form.addEventListener("dragover", (e) => { e.preventDefault(); form.classList.add("over"); });
  form.addEventListener("dragleave", () => form.classList.remove("over"));
  form.addEventListener("drop", (e) => {
    e.preventDefault(); form.classList.remove("over");
    $(inputId).files = e.dataTransfer.files;
    form.requestSubmit();
  });
}

loadStatus().catch((e) => { $("status").textContent = `status: ${e.message}`; });
