// The Live tab: starts and stops a live session (cardiac_web/live.py) and paints what its
// WebSocket pushes: one JSON message per processed frame, then that frame's overlay JPEG.
// Each painted frame's age (server arrival -> paint, on the server's clock) is appended to
// window.liveAges, in ms, for benchmarks.
"use strict";
window.liveAges = [];
(() => {
  const $ = (id) => document.getElementById(id);
  const MAX_AGES = 100000;
  const PINGS = 5; // clock-offset probes at connect; the one with the shortest round trip wins
  const nowMs = () => performance.timeOrigin + performance.now(); // local wall clock, ms
  let ws = null;
  let wanted = false; // keep a WebSocket open (the tab was opened once)
  let offset = null; // server clock - local clock, ms
  let bestRtt = Infinity;
  let pings = 0;
  let pending = null; // a frame's JSON, waiting for its JPEG
  let painting = false;
  let queued = null; // the newest [meta, jpeg] that came while a frame was being painted
  let shownUrl = null;

  const fixed = (x, digits) => (x == null || !Number.isFinite(x) ? "–"
    : x.toFixed(digits).replace(/^-(0\.?0*)$/, "$1")); // no "-0.0"

  function connect() {
    if (ws && ws.readyState <= WebSocket.OPEN) return;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    ws = new WebSocket(`${scheme}://${location.host}/api/live/ws`);
    ws.binaryType = "blob";
    ws.onopen = () => { bestRtt = Infinity; pings = 0; ping(); };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") onMessage(JSON.parse(ev.data));
      else onJpeg(ev.data);
    };
    ws.onclose = () => { ws = null; pending = null; if (wanted) setTimeout(connect, 1000); };
  }

  function ping() {
    if (ws && ws.readyState === WebSocket.OPEN) {
      pings += 1;
      ws.send(JSON.stringify({ type: "ping", t: nowMs() }));
    }
  }

  function onMessage(m) {
    if (m.type === "hello") {
      if (offset === null) offset = m.server_ms - nowMs(); // coarse, until the pongs come
    } else if (m.type === "pong") {
      const back = nowMs();
      if (back - m.t < bestRtt) { bestRtt = back - m.t; offset = m.server_ms - (m.t + back) / 2; }
      if (pings < PINGS) setTimeout(ping, 20);
    } else if (m.type === "frame") {
      pending = m;
    } else if (m.type === "stats") {
      showStats(m.stats, m.running, m.ended_by, m.source);
    } else if (m.type === "idle") {
      $("live-state").textContent = "no session";
      $("live-signal").hidden = true;
    } else if (m.type === "error") {
      $("live-error").textContent = m.error;
    }
  }

  function onJpeg(blob) {
    const meta = pending;
    pending = null;
    if (!meta) return;
    if (painting) { queued = [meta, blob]; return; } // only the newest waits
    paint(meta, blob);
  }

  async function paint(meta, blob) {
    painting = true;
    const img = $("live-image");
    const url = URL.createObjectURL(blob);
    img.src = url;
    try { await img.decode(); } catch (e) { /* a broken JPEG: the readouts still update */ }
    if (shownUrl) URL.revokeObjectURL(shownUrl);
    shownUrl = url;
    showRecord(meta);
    showStats(meta.stats, true, null, meta.source);
    // rAF runs just before the frame is rendered; the task after it, once it is on screen.
    requestAnimationFrame(() => setTimeout(() => {
      if (meta.arrival_ms != null && offset !== null) {
        const age = nowMs() + offset - meta.arrival_ms;
        if (window.liveAges.length >= MAX_AGES) window.liveAges.shift();
        window.liveAges.push(age);
        $("live-age").textContent = `${age.toFixed(0)} ms`;
      }
      painting = false;
      if (queued) { const [m, b] = queued; queued = null; paint(m, b); }
    }, 0));
  }

  function showRecord(meta) {
    const r = meta.record;
    const calibrated = r.calibrated && r.depth_mm != null;
    const units = calibrated ? "mm" : r.units || "px";
    const depths = (calibrated ? r.depth_mm : r.depth_px || r.depth_mm) || {};
    $("live-units").textContent = calibrated ? "(mm)" : `(${units}, uncalibrated)`;
    for (const side of ["FE1", "FE2"]) {
      const d = depths[side];
      const sd = r.depth_sd != null && typeof r.depth_sd === "object" ? r.depth_sd[side] : r.depth_sd;
      const cell = $(`live-depth-${side}`);
      cell.textContent = d == null ? "–" : `${fixed(d, 1)}${sd != null ? ` ± ${fixed(sd, 1)}` : ""} ${units}`;
      cell.classList.toggle("out", (r.alerts || []).some((a) => a.includes(side)));
    }
    $("live-angle").textContent = r.angle_deg == null ? "–" : `${fixed(r.angle_deg, 1)}°`;
    $("live-annulus").textContent = r.annulus === "carried"
      ? `carried ${fixed(r.annulus_age_s, 1)} s` : r.annulus || "not seen";
    $("live-stage").textContent = (r.stage || "–") + (r.stage_source ? ` (${r.stage_source})` : "");
    $("live-frame-index").textContent = `${r.frame}`;
    const alerts = r.alerts || [];
    $("live-alert").hidden = alerts.length === 0;
    $("live-alert").textContent = alerts.join(" · ");
  }

  function showStats(s, running, endedBy, source) {
    if (!s) return;
    const status = s.status || (running ? "running" : "ended");
    $("live-state").textContent = status + (!running && endedBy && endedBy !== status ? ` (${endedBy})` : "");
    $("live-signal").hidden = status !== "no signal";
    $("live-source-shown").textContent = source || s.source || "–";
    $("live-processed").textContent = `${fixed(s.processed_fps, 1)} fps (${s.processed ?? 0} frames)`;
    $("live-dropped").textContent = `${fixed(s.dropped_fps, 1)} fps (${s.dropped ?? 0} frames)`;
    $("live-ready-age").textContent = s.age_ready_p50_ms == null ? "–"
      : `${fixed(s.age_ready_p50_ms, 0)} / ${fixed(s.age_ready_p99_ms, 0)} ms`;
    $("live-start").disabled = running && status !== "ended";
  }

  async function call(url, body) {
    const response = await fetch(url, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}),
    });
    let answer = null;
    try { answer = await response.json(); } catch (e) { answer = { error: `HTTP ${response.status}` }; }
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    return answer;
  }

  const numberOrNull = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));

  async function start() {
    $("live-error").textContent = "";
    const source = $("live-source").value.trim();
    if (!source) { $("live-error").textContent = "name a source (a replay file, a folder, device:N or a URL)"; return; }
    const target = $("live-target").value.trim();
    $("live-start").disabled = true;
    try {
      await call("/api/live/start", {
        source, replay_fps: numberOrNull("live-fps"), mm_per_px: numberOrNull("live-mmpx"),
        target_depth_mm: target || null, stage_prior: $("live-stage-prior").value.trim() || null,
      });
      $("live-target-shown").textContent = target ? `${target} mm` : "none";
      window.liveAges.length = 0;
      wanted = true;
      connect();
    } catch (e) {
      $("live-error").textContent = e.message;
      $("live-start").disabled = false;
    }
  }

  async function stop() {
    try { await call("/api/live/stop"); } catch (e) { $("live-error").textContent = e.message; }
    $("live-start").disabled = false;
  }

  async function loadLiveStatus() {
    const response = await fetch("/api/live/status");
    const s = await response.json();
    if (!response.ok) throw new Error(s.error || `HTTP ${response.status}`);
    $("live-unavailable").hidden = s.available;
    $("live-unavailable").textContent = s.available ? "" : `Live view unavailable: ${s.error}`;
    $("live-start").disabled = !s.available || Boolean(s.session && s.session.running);
    const names = [...s.replay_files, ...s.sources.filter((x) => !x.endsWith("*"))];
    $("live-files").innerHTML = "";
    for (const name of names) {
      const option = document.createElement("option");
      option.value = name;
      $("live-files").appendChild(option);
    }
    if (!$("live-source").value && names.length) $("live-source").value = names[0];
    for (const stage of s.stages || []) {
      const option = document.createElement("option");
      option.value = stage;
      $("live-stages").appendChild(option);
    }
    if (s.session) showStats(s.session.stats, s.session.running, s.session.ended_by, s.session.source);
    if (s.available) { wanted = true; connect(); } // watch a session another tab started
  }

  let loaded = false;
  $("tab-live").addEventListener("click", () => {
    if (!loaded) { loaded = true; loadLiveStatus().catch((e) => { $("live-error").textContent = e.message; }); }
  });
  $("live-form").addEventListener("submit", (ev) => { ev.preventDefault(); start(); });
  $("live-stop").addEventListener("click", stop);
})();
