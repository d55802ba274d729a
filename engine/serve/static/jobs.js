// Jobs on the page: submit (render, depth), follow them through the event stream (with a polling
// fallback), the progress bar and live preview, the queue, the result view and the history gallery.

import { api, blobUrl, download, connectEvents } from "./api.js";

const $ = (id) => document.getElementById(id);
const LIVE = new Set(["queued", "running"]);
const ENDED = new Set(["done", "failed", "cancelled", "interrupted"]);
const STAGES = { queued: "queued", prepare: "preparing", load: "loading models", loading: "loading models", encode: "encoding prompts",
  stage1: "stage 1: depth from the layout", depth: "estimating depth", sam: "SAM2 masks", sam2: "SAM2 masks",
  denoise: "denoising", decode: "decoding", save: "saving" };
const HISTORY_LIMIT = 48;

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const seconds = (s) => (s === null || s === undefined || !Number.isFinite(Number(s)) ? "" :
  Number(s) >= 90 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${Number(s).toFixed(Number(s) < 10 ? 1 : 0)} s`);

export function initJobs(app) {
  const jobs = new Map();       // id -> the latest record we know
  const ended = new Set();      // ids whose end was handled (events and polls may both report it)
  let watching = null;          // the render job the progress panel follows
  let depthJob = null;          // the depth job the canvas waits for
  let shown = null;             // the job in the result view
  let events = null;
  let refreshTimer = null;

  const merge = (id, fields) => {
    const job = { ...(jobs.get(id) || { id }), ...fields, id };
    jobs.set(id, job);
    return job;
  };

  // -- events --------------------------------------------------------------------------------

  function onEvent(msg) {
    if (msg.type === "snapshot") {
      const live = new Set((msg.jobs || []).map((j) => j.id));
      for (const job of msg.jobs || []) merge(job.id, job);
      // Jobs we thought live but the snapshot lacks ended while we were away: ask the list.
      if ([...jobs.values()].some((j) => LIVE.has(j.status) && !live.has(j.id))) refreshJobs();
      renderQueue();
      for (const id of [watching, depthJob]) if (id && jobs.has(id)) update(jobs.get(id));
      return;
    }
    const id = msg.job ?? msg.id;
    if (id === undefined || id === null) return;
    const { type, preview, job: _, ...fields } = msg;
    if (type === "step" && !fields.status) fields.status = "running";
    if (type === "started") fields.status = fields.status || "running";
    const job = merge(id, fields);
    if (preview && id === watching) showPreview(preview);
    update(job);
    if (ENDED.has(job.status)) finish(id);
    else if (type === "queued" || type === "started") scheduleRefresh();
  }

  function setConnection(state) {
    const c = $("connection");
    c.textContent = state === "open" ? "live" : "offline";
    c.className = `connection ${state === "open" ? "on" : "off"}`;
  }

  /** A full GET /jobs a moment after queue changes: positions of every job, other clients' too. */
  function scheduleRefresh() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refreshJobs, 300);
  }

  async function refreshJobs() {
    try {
      const { jobs: list } = await api("GET", "jobs");
      for (const job of list) {
        // A list entry may be slimmer than what the events said (no report): keep both.
        merge(job.id, job);
      }
      renderQueue();
      renderHistory(list);
      for (const job of list) if (ENDED.has(job.status) && (job.id === watching || job.id === depthJob)) finish(job.id);
    } catch (err) { /* the next event or poll tries again */ }
  }

  /** Without a live socket, ask for the followed jobs every second; with one, every few seconds. */
  let lastPoll = 0;
  setInterval(async () => {
    const now = Date.now();
    if (events && events.open && now - lastPoll < 4000) return;
    lastPoll = now;
    for (const id of [watching, depthJob]) {
      if (!id || ended.has(id)) continue;
      try {
        const job = merge(id, await api("GET", `jobs/${id}`));
        update(job);
        if (ENDED.has(job.status)) finish(id);
      } catch (err) { /* service restarting: keep trying */ }
    }
  }, 1000);

  async function finish(id) {
    if (ended.has(id)) return;
    ended.add(id);
    let job = jobs.get(id);
    try { job = merge(id, await api("GET", `jobs/${id}`)); } catch (_) { /* keep what the event said */ }
    update(job);
    renderQueue();
    if (id === depthJob) depthDone(job);
    if (id === watching) renderDone(job);
    refreshSystem();
    refreshJobs();
  }

  // -- submitting ----------------------------------------------------------------------------

  async function render() {
    app.clearProblems();
    let created;
    try {
      created = await api("POST", "jobs", { layout: app.layoutJSON(), options: app.renderOptions() });
    } catch (err) { app.showProblems(err); return; }
    follow(created);
  }

  function follow(created) {
    watching = created.id;
    const job = merge(created.id, { status: jobs.get(created.id)?.status || "queued", position: created.position });
    $("progress").hidden = false;
    $("preview").hidden = true;
    $("cancel").disabled = false;
    update(job);
    renderQueue();
    if (ENDED.has(job.status)) finish(job.id);
    else fetchJob(job.id);
  }

  /** The full record of a job we follow (its normalised options size the progress bar). */
  async function fetchJob(id) {
    try {
      const job = merge(id, await api("GET", `jobs/${id}`));
      update(job);
      if (ENDED.has(job.status)) finish(id);
    } catch (_) { /* events carry on without it */ }
  }

  async function makeDepth(source, label) {
    app.clearProblems();
    let created;
    try {
      created = await api("POST", "depth", { layout: app.layoutJSON(), options: { seed: app.renderOptions().seed, depth: source } });
    } catch (err) { app.showProblems(err); return; }
    depthJob = created.id;
    merge(created.id, { status: jobs.get(created.id)?.status || "queued", position: created.position, label, kind: "depth" });
    $("depth-progress").hidden = false;
    update(jobs.get(created.id));
    renderQueue();
    fetchJob(created.id);
  }

  function depthDone(job) {
    depthJob = null;
    $("depth-progress").hidden = true;
    const files = job.files || {};
    if (job.status === "done" && files["depth.png"]) {
      app.setDepth({ source: "job", job: job.id, url: files["depth.png"], label: `${job.label || "made"} (job ${job.id})` });
    } else if (job.status !== "cancelled") {
      app.notify(`depth job ${job.id} ${job.status}${job.error ? `: ${job.error}` : ""}`);
    }
  }

  $("render").addEventListener("click", render);
  $("cancel").addEventListener("click", () => watching && cancel(watching));

  async function cancel(id) {
    try { await api("POST", `jobs/${id}/cancel`); } catch (err) { app.notify(err.message); }
  }

  async function resubmit(id) {
    try { follow(await api("POST", `jobs/${id}/resubmit`)); } catch (err) { app.showProblems(err); }
  }

  // -- progress ------------------------------------------------------------------------------

  function stageLabel(job) {
    if (job.status === "queued") return job.position ? `queued: position ${job.position}` : "queued";
    if (job.status !== "running") return job.status;
    return STAGES[job.stage] || job.stage || "starting";
  }

  /**
   * How far a job is, 0..1, over all its stepped stages: a render with stage 1 counts the stage-1
   * steps and then the FLUX steps (known from its options), so the bar never jumps back.
   */
  function fraction(job) {
    if (job.status === "done") return 1;
    if (job.status !== "running") return 0;
    const o = job.options || {};
    const s1 = o.depth && o.depth.source === "stage1" && o.depth.stage1 ? o.depth.stage1.steps || 0 : 0;
    const steps = job.kind === "depth" ? 0 : o.steps || 0;
    const all = s1 + steps;
    const step = job.step || 0;
    if (job.stage === "save") return all ? 1 : 0.99;
    if (!all || !job.total) return job.total ? Math.min(1, step / job.total) : 0;
    const done = job.stage === "denoise" ? s1 + (step * steps) / job.total : job.stage === "stage1" ? (step * s1) / job.total : 0;
    return Math.min(1, done / all);
  }

  /** Redraw whatever shows this job: the progress panel, the depth bar, its queue row. */
  function update(job) {
    if (!job) return;
    const done = fraction(job);
    if (job.id === watching) {
      $("progress-stage").textContent = stageLabel(job);
      $("progress-step").textContent = job.status === "running" && job.total ? `step ${job.step || 0} / ${job.total}` : "";
      const eta = Number(job.eta_s);
      $("progress-eta").textContent = job.status !== "running" || job.eta_s === null || job.eta_s === undefined || !Number.isFinite(eta) ? ""
        : eta < 1 ? "< 1 s left" : `about ${seconds(eta)} left`;
      $("progress-bar").value = done;
      $("progress").dataset.status = job.status;
      $("progress").dataset.stage = job.stage || "";
    }
    if (job.id === depthJob) {
      $("depth-progress-label").textContent = `depth (job ${job.id}): ${stageLabel(job)}${job.total ? ` ${job.step || 0} / ${job.total}` : ""}`;
      $("depth-progress-bar").value = done;
    }
    const row = document.querySelector(`#queue li[data-job="${CSS.escape(String(job.id))}"] .queue-state`);
    if (row) row.textContent = queueState(job);
  }

  function showPreview(dataUrl) {
    $("preview").src = dataUrl;
    $("preview").hidden = false;
  }

  function renderDone(job) {
    $("cancel").disabled = true;
    if (job.status === "done") {
      $("progress-stage").textContent = `done${job.started && job.finished ? ` in ${seconds(elapsed(job))}` : ""}`;
      $("progress-bar").value = 1;
      if (!app.hasDepth()) app.useDepthOf(job); // the depth stage 1 made, under the boxes
      showResult(job);
    } else if (job.status === "failed" || job.status === "interrupted") {
      $("progress-step").textContent = job.error || "";
      app.notify(`render ${job.id} ${job.status}: ${job.error || "no message"}`);
    }
  }

  const toTime = (t) => (typeof t === "number" ? t * (t < 1e12 ? 1000 : 1) : Date.parse(t));
  const elapsed = (job) => (toTime(job.finished) - toTime(job.started)) / 1000;

  // -- queue ---------------------------------------------------------------------------------

  const queueState = (job) => (job.status === "running"
    ? `${STAGES[job.stage] || job.stage || "running"}${job.total ? ` ${job.step || 0}/${job.total}` : ""}`
    : job.position ? `#${job.position}` : "queued");

  function renderQueue() {
    const live = [...jobs.values()].filter((j) => LIVE.has(j.status))
      .sort((a, b) => (a.status === "running" ? -1 : b.status === "running" ? 1 : (a.position || 0) - (b.position || 0)));
    const list = $("queue");
    if (!live.length) { list.innerHTML = '<li class="muted">empty</li>'; return; }
    list.innerHTML = live.map((j) => `
      <li data-job="${esc(j.id)}" class="${j.status}">
        <span class="queue-pos">${j.status === "running" ? "▶" : esc(j.position ?? "")}</span>
        <span class="queue-what">${esc(j.kind || "render")} ${esc(j.id)}
          <span class="muted">${esc(((j.layout && j.layout.prompt) || "").slice(0, 40))}</span></span>
        <span class="queue-state">${esc(queueState(j))}</span>
        <button type="button" class="queue-cancel" title="Cancel this job" data-cancel="${esc(j.id)}">✕</button>
      </li>`).join("");
    list.querySelectorAll("[data-cancel]").forEach((b) => b.addEventListener("click", () => cancel(b.dataset.cancel)));
  }

  // -- result view ---------------------------------------------------------------------------

  const PANES = { image: "image.png", depth: "depth.png", layout: "layout.png", attention: "attention.png", memory: "memory.png" };

  async function showImg(el, url) {
    el.removeAttribute("src");
    if (!url) { el.alt = "not in this job's outputs"; return; }
    try { el.src = await blobUrl(url); } catch (err) { el.alt = `could not load: ${err.message}`; }
  }

  async function showResult(job) {
    shown = job;
    const files = job.files || {};
    const o = job.options || {};
    $("result").hidden = false;
    $("result").dataset.job = job.id;
    $("result-title").textContent = `job ${job.id} · seed ${o.seed ?? "?"} · ${o.steps ?? "?"} steps`;
    const warn = (job.warnings || []).filter(Boolean);
    $("result-warnings").hidden = !warn.length;
    $("result-warnings").textContent = warn.join("\n");
    $("use-depth").hidden = !app.reusableDepth(job);
    $("files-link").textContent = files["image.png"] ? "image URL" : "";
    $("files-link").href = files["image.png"] || "#";
    $("files-link").title = "the service's file URL (needs the page's token)";
    await Promise.all([
      showImg($("result-image"), files["image.png"]),
      showImg($("result-regions"), files["regions.png"]),
      showImg($("result-depth"), files["depth.png"]),
      showImg($("result-layout"), files["layout.png"]),
      showImg($("result-attention"), files["attention.png"]),
      showImg($("result-memory"), files["memory.png"]),
      showImg($("result-memory-side"), files["memory.png"]),
    ]);
    let report = job.report;
    if (!report && files["report.json"]) {
      try { report = JSON.parse(await (await fetch(await blobUrl(files["report.json"]))).text()); } catch (_) { report = null; }
    }
    $("result-timings").innerHTML = timingsTable(report, job);
  }

  document.querySelectorAll(".tabs button").forEach((b) => b.addEventListener("click", () => {
    document.querySelectorAll(".tabs button").forEach((t) => t.classList.toggle("active", t === b));
    document.querySelectorAll("[data-pane]").forEach((p) => { p.hidden = p.dataset.pane !== b.dataset.tab; });
  }));
  $("regions-toggle").addEventListener("change", () => { $("result-regions").hidden = !$("regions-toggle").checked; });
  $("download-image").addEventListener("click", () => {
    if (shown && shown.files && shown.files["image.png"]) {
      download(shown.files["image.png"], `threedis-${shown.id}-seed${(shown.options || {}).seed ?? 0}.png`).catch((e) => app.notify(e.message));
    }
  });
  $("files-link").addEventListener("click", (e) => {
    // The file URL needs the bearer token, which a plain link cannot send: open the fetched bytes.
    e.preventDefault();
    if (shown && shown.files && shown.files["image.png"]) blobUrl(shown.files["image.png"]).then((u) => window.open(u, "_blank"));
  });
  $("use-depth").addEventListener("click", () => { if (shown) app.useDepthOf(shown); });

  /** Top-level stages (steps aggregated into one row per family) from the job's profile report. */
  function timingsTable(report, job) {
    const stages = report && Array.isArray(report.stages) ? report.stages : [];
    const gb = (b) => (b === null || b === undefined ? "–" : (b / 1e9).toFixed(2));
    const rows = new Map();
    for (const s of stages) {
      if (s.depth > 1) continue;
      const name = `${s.depth ? "  " : ""}${String(s.name).replace(/[\s_#]+\d+$/, "")}`;
      const r = rows.get(name) || { name, calls: 0, wall: 0, peak: null, rss: null };
      r.calls += 1;
      r.wall += Number(s.wall_s) || 0;
      r.peak = Math.max(r.peak ?? 0, s.peak_allocated ?? 0) || r.peak;
      r.rss = Math.max(r.rss ?? 0, s.rss_peak ?? 0) || r.rss;
      rows.set(name, r);
    }
    const head = job.started && job.finished ? `<p class="muted small">wall time ${seconds(elapsed(job))}</p>` : "";
    if (!rows.size) return `${head}<p class="muted">no profile report for this job</p>`;
    // Run notes, short ones only (the placement table and the like are in report.json).
    const info = report.info ? Object.entries(report.info)
      .map(([k, v]) => [k, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v)])
      .filter(([, v]) => v.length <= 160)
      .map(([k, v]) => `<tr><td>${esc(k)}</td><td colspan="4">${esc(v)}</td></tr>`).join("") : "";
    return `${head}<table class="timings"><thead><tr><th>stage</th><th>calls</th><th>total s</th><th>peak VRAM GB</th><th>RSS GB</th></tr></thead>
      <tbody>${[...rows.values()].map((r) => `<tr><td class="stage-name">${esc(r.name)}</td><td>${r.calls}</td><td>${r.wall.toFixed(3)}</td><td>${gb(r.peak)}</td><td>${gb(r.rss)}</td></tr>`).join("")}</tbody>
      ${info ? `<tbody class="info">${info}</tbody>` : ""}</table>`;
  }

  // -- history -------------------------------------------------------------------------------

  function renderHistory(list) {
    const renders = list.filter((j) => (j.kind || "render") !== "depth" && ENDED.has(j.status)).slice(0, HISTORY_LIMIT);
    const gallery = $("history");
    if (!renders.length) { gallery.innerHTML = '<p class="muted">no renders yet</p>'; return; }
    const known = new Map([...gallery.querySelectorAll(".card")].map((c) => [c.dataset.job, c]));
    gallery.replaceChildren(...renders.map((job) => {
      const old = known.get(String(job.id));
      if (old && old.dataset.status === job.status) return old;
      return card(job);
    }));
  }

  function card(job) {
    const el = document.createElement("figure");
    el.className = `card ${job.status}`;
    el.dataset.job = job.id;
    el.dataset.status = job.status;
    el.tabIndex = 0;
    const layout = job.layout || {};
    const o = job.options || {};
    const n = (layout.instances || []).length;
    el.innerHTML = `
      <div class="thumb">${job.status === "done" ? "<img alt=\"\">" : `<span class="badge">${esc(job.status)}</span>`}</div>
      <figcaption><span class="card-prompt">${esc(layout.prompt || "(no prompt)")}</span>
        <span class="muted small">${n} box${n === 1 ? "" : "es"} · seed ${esc(o.seed ?? "?")} · ${esc(o.steps ?? "?")} steps · ${esc(job.id)}</span>
        ${job.status === "done" ? "" : `<button type="button" class="resubmit">Resubmit</button>`}
      </figcaption>`;
    el.title = job.error ? `${job.status}: ${job.error}` : "restore this layout and its settings";
    if (job.status === "done" && job.files && job.files["image.png"]) {
      blobUrl(job.files["image.png"]).then((u) => { el.querySelector("img").src = u; }).catch(() => {});
    }
    const open = async () => {
      let full = job;
      try { full = merge(job.id, await api("GET", `jobs/${job.id}`)); } catch (_) { /* the list entry will do */ }
      app.restore(full);
      document.querySelectorAll(".card.active").forEach((c) => c.classList.remove("active"));
      el.classList.add("active");
      if (full.status === "done") showResult(full);
    };
    el.addEventListener("click", (e) => { if (!e.target.classList.contains("resubmit")) open(); });
    el.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
    const again = el.querySelector(".resubmit");
    if (again) again.addEventListener("click", () => resubmit(job.id));
    return el;
  }

  // -- system and plan -----------------------------------------------------------------------

  async function refreshSystem() {
    try {
      const s = await api("GET", "system");
      const vram = s.vram_total_gb ? ` · VRAM ${Number(s.vram_free_gb).toFixed(1)} / ${Number(s.vram_total_gb).toFixed(1)} GB free` : "";
      $("system").innerHTML = `<span class="pill">profile <b>${esc(s.profile)}</b></span>
        <span class="pill">${esc(s.device)}</span><span class="pill">attention ${esc(s.backend)}</span>
        <span class="muted small">${esc(vram)}${s.ram_free_gb ? ` · RAM ${Number(s.ram_free_gb).toFixed(1)} GB free` : ""}${s.version ? ` · v${esc(s.version)}` : ""}</span>`;
      $("system").title = [s.profile_reason && `profile: ${s.profile_reason}`, s.backend_reason && `attention: ${s.backend_reason}`,
        s.models_loaded && s.models_loaded.length ? `loaded: ${s.models_loaded.join(", ")}` : "no model loaded yet"].filter(Boolean).join("\n");
      if (s.tiny) $("tiny-note").hidden = false;
    } catch (err) {
      $("system").textContent = `service: ${err.message}`;
    }
  }

  $("plan").addEventListener("click", async () => {
    app.clearProblems();
    const o = app.renderOptions();
    try {
      const plan = await api("POST", "plan", { layout: app.layoutJSON(), sam: o.sam, stage1: o.depth.source === "stage1" });
      $("plan-view").hidden = false;
      $("plan-view").innerHTML = planTable(plan);
      $("plan-view").querySelector(".plan-close").addEventListener("click", () => { $("plan-view").hidden = true; });
    } catch (err) { app.showProblems(err); }
  });

  function planTable(plan) {
    const gb = (b) => (b === null || b === undefined ? "–" : (b / 1e9).toFixed(2));
    const rows = Array.isArray(plan.stages) ? plan.stages : [];
    if (!rows.length) return `<pre>${esc(JSON.stringify(plan, null, 2))}</pre>`;
    const detail = (d) => (d && typeof d === "object" ? Object.entries(d).map(([k, v]) => `${k} ${typeof v === "number" && v > 1e6 ? gb(v) : v}`).join(", ") : d ?? "");
    return `<h3>Memory plan <span class="muted small">profile ${esc(plan.profile)} · ${esc(plan.width)} × ${esc(plan.height)} ·
        ${esc(plan.num_instances)} boxes · L = ${esc(plan.seq_len)} tokens · ${esc(plan.attention_backend)}</span>
        <button type="button" class="link plan-close">close</button></h3>
      <table class="timings"><thead><tr><th>stage</th><th>models</th><th>GPU GB</th><th>host GB</th></tr></thead>
      <tbody>${rows.map((r) => `<tr title="${esc(detail(r.details))}"><td>${esc(r.stage)}</td><td>${esc((r.models || []).join(", "))}</td>
        <td>${gb(r.gpu_bytes)}</td><td>${gb(r.host_bytes)}</td></tr>`).join("")}</tbody></table>
      <p class="muted small">peak ${gb(plan.peak_gpu_bytes)} GB GPU (${esc(plan.peak_stage)}), ${gb(plan.peak_host_bytes)} GB host</p>`;
  }

  function start() {
    refreshSystem();
    refreshJobs();
    events = connectEvents(onEvent, setConnection);
  }

  return { start, makeDepth, render, showResult };
}
