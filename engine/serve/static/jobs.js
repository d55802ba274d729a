// Jobs on the page: submit (render, seed sweep, depth) and follow them through the event stream (with a
// polling fallback): the progress bar and live preview of the job the user looks at, the list of every
// job they started with its queue position, the queue, the result view, the sweep grid, the paged
// history, and the service's state while its models load.

import { api, blobUrl, download, connectEvents } from "./api.js";

const $ = (id) => document.getElementById(id);
const LIVE = new Set(["queued", "running"]);
const ENDED = new Set(["done", "failed", "cancelled", "interrupted"]);
const STAGES = { queued: "queued", prepare: "preparing", load: "loading models", loading: "loading models", encode: "encoding prompts",
  stage1: "stage 1: depth from the layout", depth: "estimating depth", sam: "SAM2 masks", sam2: "SAM2 masks",
  denoise: "denoising", decode: "decoding", save: "saving" };
const SHORT = { prepare: "prep", stage1: "stage 1", denoise: "denoise", save: "save" }; // queue rows are narrow
const HISTORY_PAGE = 24;
const MINE_KEY = "threedis.editor.mine";
const MINE_LIMIT = 64;
const RESUBMIT_GUARD_MS = 600; // Render stays disabled this long after a submit: a double click queues one job

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const seconds = (s) => (s === null || s === undefined || !Number.isFinite(Number(s)) ? "" :
  Number(s) >= 90 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${Number(s).toFixed(Number(s) < 10 ? 1 : 0)} s`);

export function initJobs(app) {
  const jobs = new Map();       // id -> the latest record we know
  const ended = new Set();      // ids whose end was handled (events and polls may both report it)
  let mine = loadMine();        // [{id, seed, kind}] the jobs this browser started, oldest first
  let watching = null;          // the job the progress panel follows (one of mine)
  let depthJob = null;          // the depth job the canvas waits for
  let shown = null;             // the job in the result view
  let sweep = null;             // {ids, seeds} of the last seed sweep
  let events = null;
  let refreshTimer = null;
  let submitting = false;
  let historyPage = 0;
  let systemState = null;

  const merge = (id, fields) => {
    const job = { ...(jobs.get(id) || { id }), ...fields, id };
    jobs.set(id, job);
    return job;
  };

  function loadMine() {
    try { return JSON.parse(sessionStorage.getItem(MINE_KEY) || "[]").slice(-MINE_LIMIT); } catch (_) { return []; }
  }

  function addMine(id, seed, kind = "render") {
    mine = [...mine.filter((m) => m.id !== id), { id, seed: String(seed ?? ""), kind }].slice(-MINE_LIMIT);
    try { sessionStorage.setItem(MINE_KEY, JSON.stringify(mine)); } catch (_) { /* a convenience */ }
  }

  // -- events --------------------------------------------------------------------------------

  function onEvent(msg) {
    if (msg.type === "snapshot") {
      const live = new Set((msg.jobs || []).map((j) => j.id));
      for (const job of msg.jobs || []) merge(job.id, job);
      // Jobs we thought live but the snapshot lacks ended while we were away: ask for them.
      if ([...jobs.values()].some((j) => LIVE.has(j.status) && !live.has(j.id))) refreshJobs();
      renderQueue();
      renderMine();
      for (const id of [watching, depthJob]) if (id && jobs.has(id)) update(jobs.get(id));
      return;
    }
    if (msg.type === "system") { refreshSystem(); return; }
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
    c.textContent = state === "open" ? "live" : state === "signed-out" ? "signed out" : "offline";
    c.className = `connection ${state === "open" ? "on" : "off"}`;
  }

  /** The queue and my jobs a moment after queue changes: positions of every job, other clients' too. */
  function scheduleRefresh() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refreshJobs, 300);
  }

  async function refreshJobs() {
    try {
      const { jobs: live } = await api("GET", "jobs?status=queued,running&limit=5000");
      const liveIds = new Set(live.map((j) => j.id));
      for (const job of live) merge(job.id, job);
      // My jobs and the followed ones that left the queue: their final records.
      const stale = [...new Set([...mine.map((m) => m.id), watching, depthJob])]
        .filter((id) => id && !liveIds.has(id) && !ENDED.has((jobs.get(id) || {}).status));
      await Promise.all(stale.map(async (id) => {
        try { merge(id, await api("GET", `jobs/${id}`)); } catch (_) { /* gone from the history */ }
      }));
      for (const j of [...jobs.values()]) if (LIVE.has(j.status) && !liveIds.has(j.id) && !stale.includes(j.id)) merge(j.id, { status: "ended" });
      renderQueue();
      renderMine();
      for (const id of stale) if (ENDED.has((jobs.get(id) || {}).status)) finish(id);
      refreshHistory();
    } catch (err) { /* the next event or poll tries again */ }
  }

  /** Without a live socket, ask for the followed jobs every second; with one, every few seconds. */
  let lastPoll = 0;
  setInterval(async () => {
    const now = Date.now();
    if (events && events.open && now - lastPoll < 4000) return;
    lastPoll = now;
    for (const id of new Set([watching, depthJob, ...mine.map((m) => m.id)])) {
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
    renderMine();
    if (id === depthJob) depthDone(job);
    if (id === watching) renderDone(job);
    if (sweep && sweep.ids.includes(id)) drawSweep();
    refreshSystem();
    scheduleRefresh();
  }

  // -- submitting ----------------------------------------------------------------------------

  function setSubmitting(value) {
    submitting = value;
    $("render").disabled = value;
    $("sweep").disabled = value;
  }

  /** One submit at a time, and none for a moment after: a double click queues one job, not two. */
  async function guarded(work) {
    if (submitting) return;
    setSubmitting(true);
    try { await work(); } finally { setTimeout(() => setSubmitting(false), RESUBMIT_GUARD_MS); }
  }

  const render = () => guarded(async () => {
    app.clearProblems();
    const options = app.renderOptions();
    if (!options) return;
    let created;
    try {
      created = await api("POST", "jobs", { layout: app.layoutJSON(), options });
    } catch (err) { app.showProblems(err); return; }
    addMine(created.id, options.seed);
    follow(created.id, created.position);
  });

  /** N renders of one layout with seeds s, s+1, ... (s: the seed field, or a random one when unlocked). */
  const startSweep = () => guarded(async () => {
    app.clearProblems();
    const count = Math.max(2, Math.min(64, Number($("sweep-count").value) || 4));
    const base = app.renderOptions();
    if (!base) return;
    const layout = app.layoutJSON();
    const ids = [], seeds = [];
    for (let k = 0; k < count; k++) {
      const options = { ...base, seed: (base.seed + BigInt(k)) % (app.SEED_MAX + 1n) }; // wraps past 2^64 - 1
      let created;
      try {
        created = await api("POST", "jobs", { layout, options });
      } catch (err) { app.showProblems(err); break; }
      ids.push(created.id);
      seeds.push(String(options.seed));
      addMine(created.id, options.seed);
      merge(created.id, { status: jobs.get(created.id)?.status || "queued", position: created.position, kind: "render" });
    }
    if (!ids.length) return;
    sweep = { ids, seeds };
    follow(ids[0]);
    drawSweep();
  });

  function follow(id, position) {
    watching = id;
    const job = merge(id, { status: jobs.get(id)?.status || "queued", ...(position !== undefined ? { position } : {}) });
    $("progress").hidden = false;
    $("preview").hidden = true;
    $("cancel").disabled = ENDED.has(job.status);
    update(job);
    renderQueue();
    renderMine();
    if (ENDED.has(job.status)) renderDone(job);
    else fetchJob(id);
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
    const options = app.renderOptions();
    if (!options) return;
    let created;
    try {
      created = await api("POST", "depth", { layout: app.layoutJSON(), options: { seed: options.seed, depth: source } });
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
  $("sweep").addEventListener("click", startSweep);
  $("cancel").addEventListener("click", () => watching && cancel(watching));

  async function cancel(id) {
    try { await api("POST", `jobs/${id}/cancel`); } catch (err) { app.notify(err.message); }
  }

  async function resubmit(id) {
    try {
      const created = await api("POST", `jobs/${id}/resubmit`);
      addMine(created.id, (jobs.get(id)?.options || {}).seed);
      follow(created.id, created.position);
    } catch (err) { app.showProblems(err); }
  }

  // -- progress ------------------------------------------------------------------------------

  const toTime = (t) => (typeof t === "number" ? t * (t < 1e12 ? 1000 : 1) : Date.parse(t));
  const elapsed = (job) => (toTime(job.finished) - toTime(job.started)) / 1000;

  function stageLabel(job) {
    if (job.status === "queued") {
      if (systemState === "loading") return `queued: the models are loading${job.position ? `; position ${job.position}` : ""}`;
      return job.position ? `queued: position ${job.position}` : "queued";
    }
    if (job.status === "done" && job.started && job.finished) return `done in ${seconds(elapsed(job))}`;
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

  /** Redraw whatever shows this job: the progress panel, the depth bar, its queue and my-jobs rows, its sweep cell. */
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
      $("progress").dataset.job = job.id;
    }
    if (job.id === depthJob) {
      $("depth-progress-label").textContent = `depth (job ${job.id}): ${stageLabel(job)}${job.total ? ` ${job.step || 0} / ${job.total}` : ""}`;
      $("depth-progress-bar").value = done;
    }
    const row = document.querySelector(`#queue li[data-job="${CSS.escape(String(job.id))}"] .queue-state`);
    if (row) row.textContent = queueState(job);
    const mineRow = document.querySelector(`#my-jobs li[data-job="${CSS.escape(String(job.id))}"] .mine-state`);
    if (mineRow) mineRow.textContent = mineState(job);
    const cell = document.querySelector(`#sweep-grid [data-job="${CSS.escape(String(job.id))}"] .sweep-state`);
    if (cell) cell.textContent = mineState(job);
  }

  function showPreview(dataUrl) {
    $("preview").src = dataUrl;
    $("preview").hidden = false;
  }

  function renderDone(job) {
    $("cancel").disabled = true;
    if (job.status === "done") {
      $("progress-stage").textContent = stageLabel(job);
      $("progress-bar").value = 1;
      if (!app.hasDepth()) app.useDepthOf(job); // the depth stage 1 made, under the boxes
      showResult(job).then(cueResult);
    } else if (job.status === "failed" || job.status === "interrupted") {
      $("progress-step").textContent = app.boxWords(job.error || "");
      app.notify(`render ${job.id} ${job.status}: ${job.error || "no message"}`);
    }
  }

  // -- the result below the fold: a cue until it is seen ---------------------------------------

  let resultSeen = true;
  new IntersectionObserver((entries) => {
    resultSeen = entries.some((e) => e.isIntersecting);
    if (resultSeen) $("result-cue").hidden = true;
  }, { threshold: 0.15 }).observe($("result"));

  function cueResult() {
    requestAnimationFrame(() => { if (!resultSeen) $("result-cue").hidden = false; });
  }

  $("result-cue").addEventListener("click", () => {
    $("result-cue").hidden = true;
    $("result").scrollIntoView({ behavior: "smooth", block: "start" });
  });

  // -- my jobs, the queue ------------------------------------------------------------------------

  const queueState = (job) => (job.status === "running"
    ? `${SHORT[job.stage] || job.stage || "running"}${job.total ? ` ${job.step || 0}/${job.total}` : ""}`
    : job.position ? `#${job.position}` : job.status || "queued");

  const mineState = (job) => (job.status === "queued" ? (job.position ? `queued #${job.position}` : "queued")
    : job.status === "running" ? `${SHORT[job.stage] || "running"}${job.total ? ` ${job.step || 0}/${job.total}` : ""}`
      : job.status || "…");

  function renderMine() {
    const list = $("my-jobs");
    const rows = mine.filter((m) => jobs.has(m.id) || m.id === watching).slice().reverse();
    list.replaceChildren(...rows.map((m) => {
      const job = jobs.get(m.id) || { id: m.id, status: "queued" };
      const li = document.createElement("li");
      li.dataset.job = m.id;
      li.className = `${job.status}${m.id === watching ? " watching" : ""}`;
      li.tabIndex = 0;
      li.innerHTML = `<span class="mine-what">${esc(m.kind)} ${esc(m.id.slice(0, 8))}${m.seed ? ` · seed ${esc(m.seed)}` : ""}</span>
        <span class="mine-state">${esc(mineState(job))}</span>`;
      const open = () => follow(m.id);
      li.addEventListener("click", open);
      li.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
      return li;
    }));
    $("progress").hidden = !rows.length && !watching;
  }

  function renderQueue() {
    const live = [...jobs.values()].filter((j) => LIVE.has(j.status))
      .sort((a, b) => (a.status === "running" ? -1 : b.status === "running" ? 1 : (a.position || 0) - (b.position || 0)));
    const list = $("queue");
    if (!live.length) { list.innerHTML = '<li class="muted">empty</li>'; return; }
    const mineIds = new Set(mine.map((m) => m.id));
    list.innerHTML = live.map((j) => `
      <li data-job="${esc(j.id)}" class="${j.status}${mineIds.has(j.id) ? " mine" : ""}">
        <span class="queue-pos">${j.status === "running" ? "▶" : esc(j.position ?? "")}</span>
        <span class="queue-what"><span class="queue-kind">${esc(j.kind || "render")} ${esc(j.id)}</span>
          <span class="queue-prompt muted">${esc(((j.layout && j.layout.prompt) || "").slice(0, 60))}</span></span>
        <span class="queue-state">${esc(queueState(j))}</span>
        <button type="button" class="queue-cancel" title="Cancel this job" data-cancel="${esc(j.id)}">✕</button>
      </li>`).join("");
    list.querySelectorAll("[data-cancel]").forEach((b) => b.addEventListener("click", () => cancel(b.dataset.cancel)));
  }

  // -- the seed sweep grid -----------------------------------------------------------------------

  function drawSweep() {
    if (!sweep) return;
    $("result").hidden = false;
    $("sweep-view").hidden = false;
    $("sweep-title").textContent = `${sweep.ids.length} seeds of one layout, from ${sweep.seeds[0]}`;
    const grid = $("sweep-grid");
    const known = new Map([...grid.querySelectorAll("[data-job]")].map((c) => [c.dataset.job, c]));
    grid.replaceChildren(...sweep.ids.map((id, k) => {
      const job = jobs.get(id) || { id, status: "queued" };
      const old = known.get(id);
      if (old && old.dataset.status === job.status) return old;
      const cell = document.createElement("figure");
      cell.className = `sweep-cell ${job.status}`;
      cell.dataset.job = id;
      cell.dataset.status = job.status;
      cell.tabIndex = 0;
      cell.innerHTML = `<div class="thumb">${job.status === "done" ? '<img alt="">' : ""}</div>
        <figcaption>seed ${esc(sweep.seeds[k])} · <span class="sweep-state">${esc(mineState(job))}</span></figcaption>`;
      if (job.status === "done" && job.files && job.files["image.png"]) {
        blobUrl(job.files["image.png"]).then((u) => { cell.querySelector("img").src = u; }).catch(() => {});
      }
      const open = () => follow(id);
      cell.addEventListener("click", open);
      cell.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
      return cell;
    }));
  }

  // -- result view ---------------------------------------------------------------------------

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
    $("result-warnings").textContent = app.boxWords(warn.join("\n"));
    $("use-depth").hidden = !app.reusableDepth(job);
    $("files-link").textContent = files["image.png"] ? "image URL" : "";
    $("files-link").href = files["image.png"] || "#";
    $("files-link").title = "the service's file URL (this browser's session opens it)";
    await Promise.all([
      showImg($("result-image"), files["image.png"]),
      showImg($("result-regions"), files["regions.png"]),
      showImg($("result-depth"), files["depth.png"]),
      showImg($("result-layout"), files["layout.png"]),
      showImg($("result-attention"), files["attention.png"]),
      showImg($("result-memory"), files["memory.png"]),
    ]);
    let report = job.report;
    if (!report && files["report.json"]) {
      // Straight from the service (connect-src 'self': the CSP refuses a fetch of a blob: URL).
      try { report = await api("GET", files["report.json"]); } catch (_) { report = null; }
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

  // -- history: one page at a time, filtered by status -------------------------------------------

  async function refreshHistory() {
    const filter = $("history-filter").value || "done,failed,cancelled,interrupted";
    let page;
    try {
      page = await api("GET", `jobs?kind=render&status=${filter}&limit=${HISTORY_PAGE}&offset=${historyPage * HISTORY_PAGE}`);
    } catch (_) { return; }
    const pages = Math.max(1, Math.ceil(page.total / HISTORY_PAGE));
    if (historyPage >= pages && historyPage > 0) { historyPage = pages - 1; refreshHistory(); return; }
    $("history-page").textContent = `page ${historyPage + 1} of ${pages} · ${page.total} render${page.total === 1 ? "" : "s"}`;
    $("history-prev").disabled = historyPage === 0;
    $("history-next").disabled = historyPage >= pages - 1;
    const gallery = $("history");
    if (!page.jobs.length) { gallery.innerHTML = '<p class="muted">no renders here</p>'; return; }
    const known = new Map([...gallery.querySelectorAll(".card")].map((c) => [c.dataset.job, c]));
    gallery.replaceChildren(...page.jobs.map((job) => {
      merge(job.id, job);
      const old = known.get(String(job.id));
      if (old && old.dataset.status === job.status) return old;
      return card(job);
    }));
  }

  $("history-filter").addEventListener("change", () => { historyPage = 0; refreshHistory(); });
  $("history-prev").addEventListener("click", () => { historyPage = Math.max(0, historyPage - 1); refreshHistory(); });
  $("history-next").addEventListener("click", () => { historyPage += 1; refreshHistory(); });

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
    el.title = job.error ? `${job.status}: ${app.boxWords(job.error)}` : "restore this layout and its settings";
    if (job.status === "done" && job.files && job.files["image.png"]) {
      blobUrl(job.files["image.png"]).then((u) => { el.querySelector("img").src = u; }).catch(() => {});
    }
    const open = async () => {
      let full = job;
      try { full = merge(job.id, await api("GET", `jobs/${job.id}`)); } catch (_) { /* the list entry will do */ }
      await app.restore(full);
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

  // -- system (and its loading state) and plan ---------------------------------------------------

  let systemTimer = null;

  async function refreshSystem() {
    clearTimeout(systemTimer);
    try {
      const s = await api("GET", "system");
      systemState = s.state;
      $("loading-note").hidden = s.state !== "loading";
      document.body.dataset.service = s.state;
      const vram = s.vram_total_gb ? ` · VRAM ${Number(s.vram_free_gb).toFixed(1)} / ${Number(s.vram_total_gb).toFixed(1)} GB free` : "";
      const state = s.state === "loading" ? '<span class="pill loading">loading models…</span>'
        : s.state === "failed" ? '<span class="pill failed">models failed to load</span>' : "";
      $("system").innerHTML = `${state}<span class="pill">profile <b>${esc(s.profile)}</b></span>
        <span class="pill">${esc(s.device)}</span>${s.backend ? `<span class="pill">attention ${esc(s.backend)}</span>` : ""}
        <span class="muted small">${esc(vram)}${s.ram_free_gb ? ` · RAM ${Number(s.ram_free_gb).toFixed(1)} GB free` : ""}${s.version ? ` · v${esc(s.version)}` : ""}</span>`;
      $("system").title = [s.profile_reason && `profile: ${s.profile_reason}`, s.backend_reason && `attention: ${s.backend_reason}`,
        s.models_loaded && s.models_loaded.length ? `loaded: ${s.models_loaded.join(", ")}` : "no model loaded yet"].filter(Boolean).join("\n");
      if (s.tiny) $("tiny-note").hidden = false;
      if (s.state === "failed") app.notify(`the service could not load its models: ${s.error}`);
      if (s.state === "loading") systemTimer = setTimeout(refreshSystem, 1500);
      if (watching && jobs.has(watching)) update(jobs.get(watching));
    } catch (err) {
      $("system").textContent = `service: ${err.message}`;
      systemTimer = setTimeout(refreshSystem, 3000);
    }
  }

  $("plan").addEventListener("click", async () => {
    app.clearProblems();
    const o = app.renderOptions(false);
    if (!o) return;
    try {
      const body = { layout: app.layoutJSON(), sam: o.sam, stage1: o.depth.source === "stage1", photo: o.depth.source === "photo" };
      const s1 = o.depth.stage1 || {};
      if (body.stage1 && s1.size !== undefined) body.stage1_size = s1.size; // else the service's default (tiny: tiny)
      const plan = await api("POST", "plan", body);
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
      <p class="muted small">peak ${gb(plan.peak_gpu_bytes)} GB GPU (${esc(plan.peak_stage)}), ${gb(plan.peak_host_bytes)} GB host
        · the models this service loads</p>`;
  }

  function start() {
    refreshSystem();
    refreshJobs();
    renderMine();
    events = connectEvents(onEvent, setConnection);
  }

  return { start, makeDepth, render, showResult, follow, get watching() { return watching; }, get mine() { return mine.map((m) => m.id); } };
}
