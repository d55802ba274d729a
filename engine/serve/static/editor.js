// The layout editor page: layout state with undo, the box list, the settings form, depth sources,
// field-level validation messages, import/export and the draft kept across reloads.
// Jobs (render, progress, queue, results, history) live in jobs.js.

import { api, upload, blobUrl, saveText, TINY, ApiError } from "./api.js";
import { BoxEditor, instanceColor } from "./canvas.js";
import { initJobs } from "./jobs.js";

const $ = (id) => document.getElementById(id);
const DRAFT_KEY = "threedis.editor.draft";
const UNDO_LIMIT = 200;

// -- layout state ---------------------------------------------------------------------------------

const model = { prompt: "", width: 512, height: 512, instances: [], selected: -1 };
let depth = null; // null (stage 1 at render time) | {source: "job"|"upload", job?, upload?, url, label}
const undoStack = [];
const redoStack = [];
let pending = null;

const snapshot = () => JSON.stringify({ prompt: model.prompt, width: model.width, height: model.height,
  instances: model.instances.map((i) => ({ prompt: i.prompt, box: [...i.box] })) });

function applySnapshot(text) {
  const s = JSON.parse(text);
  Object.assign(model, { prompt: s.prompt, width: s.width, height: s.height, instances: s.instances });
  if (model.selected >= model.instances.length) model.selected = -1;
  syncForm();
}

const hooks = {
  begin() { if (pending === null) pending = snapshot(); },
  end() {
    if (pending !== null && pending !== snapshot()) {
      undoStack.push(pending);
      if (undoStack.length > UNDO_LIMIT) undoStack.shift();
      redoStack.length = 0;
    }
    pending = null;
    renderBoxes();
    saveDraft();
  },
  changed() { updateBoxCoords(); },
  select(i, opts = {}) {
    model.selected = i;
    document.querySelectorAll("#boxes li").forEach((li) => li.classList.toggle("selected", Number(li.dataset.index) === i));
    editor.draw();
    if (opts.focusPrompt) {
      const input = document.querySelector(`#boxes li[data-index="${i}"] input.box-prompt`);
      if (input) input.focus();
    }
  },
  remove(i) {
    hooks.begin();
    model.instances.splice(i, 1);
    model.selected = -1;
    hooks.end();
    editor.draw();
  },
};

const editor = new BoxEditor($("canvas"), model, hooks);

function undo() {
  if (!undoStack.length) return;
  redoStack.push(snapshot());
  applySnapshot(undoStack.pop());
  saveDraft();
}

function redo() {
  if (!redoStack.length) return;
  undoStack.push(snapshot());
  applySnapshot(redoStack.pop());
  saveDraft();
}

/** Everything that shows the model: form fields, box list, canvas. */
function syncForm() {
  $("prompt").value = model.prompt;
  $("width").value = model.width;
  $("height").value = model.height;
  const preset = `${model.width}x${model.height}`;
  $("size-preset").value = [...$("size-preset").options].some((o) => o.value === preset) ? preset : "custom";
  renderBoxes();
  editor.fit();
}

// -- the box list ---------------------------------------------------------------------------------

const fmt = (v) => v.toFixed(3).replace(/0+$/, "").replace(/\.$/, "");

function renderBoxes() {
  const list = $("boxes");
  const focused = document.activeElement;
  const focusIndex = focused && focused.classList.contains("box-prompt") ? Number(focused.closest("li").dataset.index) : -1;
  const caret = focusIndex >= 0 ? focused.selectionStart : null;
  list.replaceChildren();
  if (!model.instances.length) {
    const li = document.createElement("li");
    li.className = "muted empty";
    li.textContent = "No boxes yet: drag on the canvas to add one.";
    list.appendChild(li);
  }
  model.instances.forEach((inst, i) => {
    const li = document.createElement("li");
    li.dataset.index = i;
    li.classList.toggle("selected", i === model.selected);
    li.innerHTML = `
      <span class="swatch" style="background:${instanceColor(i)}">${i + 1}</span>
      <div class="box-main">
        <input class="box-prompt" type="text" placeholder="what box ${i + 1} is, e.g. a red cardinal" aria-label="prompt of box ${i + 1}">
        <span class="coords muted small"></span>
        <span class="field-error" data-field-error="instances[${i}]"></span>
      </div>
      <button type="button" class="box-delete" title="Delete box ${i + 1}" aria-label="delete box ${i + 1}">✕</button>`;
    const input = li.querySelector("input");
    input.value = inst.prompt;
    input.addEventListener("focus", () => { hooks.select(i); hooks.begin(); });
    input.addEventListener("input", () => { inst.prompt = input.value; editor.draw(); clearFieldError(`instances[${i}]`); saveDraft(); });
    input.addEventListener("blur", () => {
      // end() rebuilds the list only if something changed; keep the typed text either way.
      if (pending !== null && pending !== snapshot()) { undoStack.push(pending); redoStack.length = 0; }
      pending = null;
      saveDraft();
    });
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") input.blur(); });
    li.querySelector(".box-delete").addEventListener("click", () => hooks.remove(i));
    li.addEventListener("mousedown", (e) => { if (e.target === li || e.target.classList.contains("swatch")) hooks.select(i); });
    list.appendChild(li);
  });
  updateBoxCoords();
  if (focusIndex >= 0 && focusIndex < model.instances.length) {
    const input = list.querySelector(`li[data-index="${focusIndex}"] input`);
    input.focus();
    if (caret !== null) input.setSelectionRange(caret, caret);
  }
}

function updateBoxCoords() {
  document.querySelectorAll("#boxes li[data-index]").forEach((li) => {
    const inst = model.instances[Number(li.dataset.index)];
    if (!inst) return;
    const [x0, y0, x1, y1] = inst.box;
    const px = `${Math.round((x1 - x0) * model.width)} × ${Math.round((y1 - y0) * model.height)} px`;
    li.querySelector(".coords").textContent = `[${inst.box.map(fmt).join(", ")}]  ${px}`;
  });
}

// -- global prompt and size ---------------------------------------------------------------------

$("prompt").addEventListener("focus", () => hooks.begin());
$("prompt").addEventListener("input", () => { model.prompt = $("prompt").value; clearFieldError("prompt"); saveDraft(); });
$("prompt").addEventListener("blur", () => hooks.end());

function setSize(width, height) {
  hooks.begin();
  model.width = width;
  model.height = height;
  hooks.end();
  syncForm();
}

$("size-preset").addEventListener("change", () => {
  const v = $("size-preset").value;
  if (v === "custom") { $("width").focus(); return; }
  const [w, h] = v.split("x").map(Number);
  clearFieldError("size");
  setSize(w, h);
});

function sizeInput() {
  const w = Number($("width").value), h = Number($("height").value);
  const bad = [["width", w], ["height", h]].filter(([, v]) => !Number.isInteger(v) || v < 16 || v % 16);
  clearFieldError("size");
  if (bad.length) {
    $("size-preset").value = "custom";
    const [name, v] = bad[0];
    const lo = Math.max(16, Math.floor(v / 16) * 16), hi = Math.max(16, Math.ceil(v / 16) * 16);
    showFieldError("size", `${name}: a positive multiple of 16 (one FLUX token is 16 × 16 pixels); nearest ${lo === hi ? lo : `${lo} or ${hi}`}`);
    return;
  }
  setSize(w, h);
}
$("width").addEventListener("change", sizeInput);
$("height").addEventListener("change", sizeInput);

// -- settings ------------------------------------------------------------------------------------

const SETTINGS = ["steps", "guidance", "seed", "seed-lock", "sam", "sched-i2i", "sched-hard", "sched-i2t",
  "sched-t2i", "sched-t2t", "s1-steps", "s1-size", "s1-refine"];

function readSettings() {
  const out = {};
  for (const id of SETTINGS) out[id] = $(id).type === "checkbox" ? $(id).checked : $(id).value;
  return out;
}

function writeSettings(values) {
  for (const id of SETTINGS) {
    if (!(id in values)) continue;
    if ($(id).type === "checkbox") $(id).checked = Boolean(values[id]);
    else $(id).value = values[id] === null || values[id] === undefined ? "" : values[id];
  }
}

$("settings").addEventListener("submit", (e) => e.preventDefault()); // Enter in a field renders nothing by surprise
for (const id of SETTINGS) $(id).addEventListener("change", () => { clearFieldError(errorKey(id)); saveDraft(); });

const randomSeed = () => Math.floor(Math.random() * 2 ** 31);
$("seed-dice").addEventListener("click", () => { $("seed").value = randomSeed(); saveDraft(); });

const intOrNull = (v) => (v === "" || v === null || v === undefined ? null : Number(v));

/** The layout JSON, as docs/layout.md defines it. */
function layoutJSON() {
  return {
    prompt: model.prompt,
    width: model.width,
    height: model.height,
    instances: model.instances.map((i) => ({ prompt: i.prompt, box: [...i.box] })),
  };
}

function stage1Options() {
  const s = {};
  const steps = intOrNull($("s1-steps").value);
  const size = $("s1-size").value.trim().toLowerCase().replace(/\s+/g, "");
  const refine = intOrNull($("s1-refine").value);
  if (steps !== null) s.steps = steps;
  if (refine !== null) s.refine_steps = refine; // blank: the service's default, every step
  if (size) s.size = /^\d+$/.test(size) ? Number(size) : size; // "768x512" is read by the service
  return s;
}

/** Render options; picks a new seed first when the seed is not locked. */
function renderOptions() {
  if (!$("seed-lock").checked) $("seed").value = randomSeed();
  const steps = Number($("steps").value) || 20;
  const sched = ["hard", "i2i", "i2t", "t2i", "t2t"].map((k) => [k, intOrNull($(`sched-${k}`).value)]);
  let schedule = null;
  if (sched.some(([, v]) => v !== null)) {
    const defaults = { hard: steps, i2i: Math.min(4, steps), i2t: steps, t2i: steps, t2t: steps };
    schedule = Object.fromEntries(sched.map(([k, v]) => [k, v === null ? defaults[k] : v]));
  }
  saveDraft();
  // A blank field is left out, so the service's default applies (and says so in the job's options).
  const options = { schedule, sam: $("sam").checked, depth: depthOption() };
  for (const [key, id] of [["seed", "seed"], ["steps", "steps"], ["guidance", "guidance"]]) {
    const v = $(id).value.trim();
    if (v !== "") options[key] = Number(v);
  }
  return options;
}

function depthOption() {
  if (!depth || depth.source === "stage1") return { source: "stage1", stage1: stage1Options() };
  if (depth.source === "job") return { source: "job", job: depth.job };
  return { source: depth.source, upload: depth.upload }; // "upload" (a depth map) or "photo"
}

/** A job's depth source that a new render can use as it is (a depth job, an upload, a photo). */
function reusableDepth(job) {
  const d = (job.options || {}).depth || {};
  if (job.kind === "depth") return job.status === "done";
  return d.source === "job" || d.source === "upload" || d.source === "photo";
}

/** Draw and render on the depth map of a finished job, keeping its source. */
function useDepthOf(job) {
  const files = job.files || {};
  const d = (job.options || {}).depth || {};
  const url = files["depth.png"];
  if (job.kind === "depth") setDepth({ source: "job", job: job.id, url, label: `made by job ${job.id}` });
  else if (d.source === "job") setDepth({ source: "job", job: d.job, url, label: `made by job ${d.job}` });
  else if (d.source === "upload" || d.source === "photo") {
    setDepth({ source: d.source, upload: d.upload, url, label: d.source === "photo" ? "from a photo (estimated at render)" : "uploaded" });
  } else if (url) {
    // Stage 1 ran inside the render: the same layout and seed make the same map again.
    setDepth({ source: "stage1", url, label: `stage 1 at render time (job ${job.id}'s shown)` });
  } else setDepth(null);
}

// -- depth sources -------------------------------------------------------------------------------

const depthImage = new Image();
depthImage.onload = () => editor.setDepth(depthImage);

/** Show and use a depth map; d = null goes back to "stage 1 at render time". */
async function setDepth(d) {
  depth = d;
  $("depth-source").textContent = d ? `depth: ${d.label}` : "depth: stage 1 at render time";
  if (!d) { editor.setDepth(null); saveDraft(); return; }
  try {
    depthImage.src = await blobUrl(d.url);
  } catch (err) {
    notify(`could not load the depth map: ${err.message}`);
    depth = null;
    editor.setDepth(null);
  }
  saveDraft();
}

$("clear-depth").addEventListener("click", () => setDepth(null));

$("upload-depth").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  e.target.value = "";
  if (!file) return;
  try {
    const up = await upload(file, "depth");
    await setDepth({ source: "upload", upload: up.id, url: `uploads/${up.id}`, label: `uploaded ${file.name} (${up.width} × ${up.height})` });
  } catch (err) { showProblems(err); }
});

$("upload-photo").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  e.target.value = "";
  if (!file) return;
  try {
    const up = await upload(file, "photo");
    await jobs.makeDepth({ source: "photo", upload: up.id }, `from ${file.name}`);
  } catch (err) { showProblems(err); }
});

$("make-depth").addEventListener("click", () => jobs.makeDepth({ source: "stage1", stage1: stage1Options() }, "stage 1"));

// -- validation messages beside their fields ------------------------------------------------------

/** Where a service problem's field is shown: "instances[1].prompt" -> box 2, "width" -> size, ... */
function errorKey(field) {
  const f = String(field || "").replace(/^body\./, "").replace(/^(layout|options)\./, "");
  const inst = f.match(/^instances\[(\d+)\]/);
  if (inst) return `instances[${inst[1]}]`;
  const head = f.split(/[.[]/)[0];
  if (head === "width" || head === "height" || head === "size") return "size";
  if (head === "seed-lock") return "seed";
  if (head.startsWith("sched")) return "schedule";
  if (head.startsWith("s1") || head === "stage1" || f.startsWith("depth.stage1")) return "stage1";
  if (["prompt", "instances", "steps", "guidance", "seed", "schedule"].includes(head)) return head;
  return "general";
}

function showFieldError(key, message) {
  const slot = document.querySelector(`[data-field-error="${CSS.escape(key)}"]`) ||
    document.querySelector('[data-field-error="general"]');
  slot.textContent = slot.textContent ? `${slot.textContent}\n${message}` : message;
  slot.classList.add("shown");
  const input = key === "prompt" ? $("prompt")
    : key.startsWith("instances[") ? document.querySelector(`#boxes li[data-index="${key.slice(10, -1)}"] input`)
      : key === "size" ? $("width") : $(key);
  if (input && input.classList) input.classList.add("invalid");
}

function clearFieldError(key) {
  const slot = document.querySelector(`[data-field-error="${CSS.escape(key)}"]`);
  if (slot) { slot.textContent = ""; slot.classList.remove("shown"); }
  // The summary on top goes with the last marked field.
  if ($("notice").dataset.kind === "problems" && !document.querySelector(".field-error.shown")) $("notice").hidden = true;
  document.querySelectorAll(".invalid").forEach((el) => {
    if (key === "prompt" ? el.id === "prompt" : key === "size" ? el.id === "width" : el.closest(`li[data-index="${key.slice(10, -1)}"]`)) {
      el.classList.remove("invalid");
    }
  });
}

function clearProblems() {
  document.querySelectorAll("[data-field-error]").forEach((s) => { s.textContent = ""; s.classList.remove("shown"); });
  document.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
  $("notice").hidden = true;
}

/** An ApiError's problems beside their fields; its message on top when none has a field. */
function showProblems(err) {
  if (!(err instanceof ApiError)) { notify(String(err && err.message ? err.message : err)); return; }
  if (err.problems.length) {
    for (const p of err.problems) {
      const field = p.field || "";
      const message = field && !String(p.message).startsWith(field) ? `${field}: ${p.message}` : p.message;
      showFieldError(errorKey(field), message);
    }
    notify(`${err.problems.length === 1 ? "One problem" : `${err.problems.length} problems`}: see the marked fields.`, "error", "problems");
  } else {
    notify(err.message);
  }
}

function notify(message, kind = "error", source = "message") {
  const n = $("notice");
  n.textContent = message;
  n.className = `notice ${kind}`;
  n.dataset.kind = source;
  n.hidden = !message;
}

// -- import, export, new, draft ---------------------------------------------------------------------

function loadLayout(data) {
  if (!data || typeof data !== "object" || !Array.isArray(data.instances || [])) {
    throw new Error("not a layout: expected {prompt, width, height, instances: [{prompt, box}]}");
  }
  hooks.begin();
  model.prompt = typeof data.prompt === "string" ? data.prompt : "";
  model.width = Number.isInteger(data.width) ? data.width : 512;
  model.height = Number.isInteger(data.height) ? data.height : 512;
  model.instances = (data.instances || []).map((i) => ({ prompt: String(i.prompt || ""),
    box: Array.isArray(i.box) && i.box.length === 4 ? i.box.map(Number) : [0.25, 0.25, 0.75, 0.75] }));
  model.selected = -1;
  hooks.end();
  syncForm();
}

$("import-layout").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  e.target.value = "";
  if (!file) return;
  try {
    loadLayout(JSON.parse(await file.text()));
    clearProblems();
    notify(`imported ${file.name}`, "info");
  } catch (err) { notify(`${file.name}: ${err.message}`); }
});

$("export-layout").addEventListener("click", () => saveText(`${JSON.stringify(layoutJSON(), null, 2)}\n`, "layout.json"));
$("clear-layout").addEventListener("click", () => {
  loadLayout({ prompt: "", width: model.width, height: model.height, instances: [] });
  clearProblems();
  setDepth(null);
});
$("undo").addEventListener("click", undo);
$("redo").addEventListener("click", redo);

function saveDraft() {
  try {
    localStorage.setItem(DRAFT_KEY, JSON.stringify({ layout: layoutJSON(), settings: readSettings(), depth }));
  } catch (_) { /* private mode or full: the draft is a convenience */ }
}

function loadDraft() {
  try {
    const d = JSON.parse(localStorage.getItem(DRAFT_KEY) || "null");
    if (!d) return;
    loadLayout(d.layout);
    undoStack.length = 0;
    if (d.settings) writeSettings(d.settings);
    if (d.depth && d.depth.url) setDepth(d.depth);
  } catch (_) { /* a damaged draft is dropped */ }
}

// -- keys ----------------------------------------------------------------------------------------

document.addEventListener("keydown", (e) => {
  const el = document.activeElement;
  const typing = el && (el.tagName === "TEXTAREA" || el.tagName === "SELECT" || el.isContentEditable ||
    (el.tagName === "INPUT" && !["checkbox", "radio", "button", "file"].includes(el.type)));
  if (typing) return; // text fields keep their own keys, their own Ctrl+Z included
  const mod = e.ctrlKey || e.metaKey;
  if (mod && (e.key === "z" || e.key === "Z")) { e.preventDefault(); (e.shiftKey ? redo : undo)(); return; }
  if (mod && (e.key === "y" || e.key === "Y")) { e.preventDefault(); redo(); return; }
  if (e.key === "Escape") { hooks.select(-1); return; }
  editor.key(e);
});

// -- restoring a past job -------------------------------------------------------------------------

const sizeText = (v) => (Array.isArray(v) ? (v[0] === v[1] ? String(v[0]) : `${v[0]}x${v[1]}`) : v ?? "");

/** Put a job's layout and settings back in the editor (history click). */
function restore(job) {
  loadLayout(job.layout || {});
  const o = job.options || {};
  const s = o.schedule || {};
  const s1 = (o.depth && o.depth.stage1) || {};
  writeSettings({
    steps: o.steps ?? $("steps").value, guidance: o.guidance ?? $("guidance").value, seed: o.seed ?? $("seed").value,
    "seed-lock": true, sam: Boolean(o.sam), "sched-i2i": s.i2i, "sched-hard": s.hard, "sched-i2t": s.i2t,
    "sched-t2i": s.t2i, "sched-t2t": s.t2t, "s1-steps": s1.steps, "s1-size": sizeText(s1.size),
    "s1-refine": s1.refine_steps,
  });
  clearProblems();
  useDepthOf(job);
  saveDraft();
}

// -- start --------------------------------------------------------------------------------------

const hasDepth = () => depth !== null;
const app = { hasDepth, layoutJSON, renderOptions, setDepth, restore, useDepthOf, reusableDepth, showProblems, clearProblems, notify };
const jobs = initJobs(app);

$("tiny-note").hidden = !TINY;
if (TINY) $("steps").value = 4; // the tiny checkpoints' default: a full 20-step run teaches nothing
loadDraft();
syncForm();
jobs.start();
const depthShown = () => Boolean(editor.depth && depthImage.complete && depthImage.naturalWidth);
window.threedisEditor = { model, undo, redo, layoutJSON, depthShown }; // for the browser test and the console
