// The layout editor page: layout state with undo, the box list (prompt, pixel coordinates, order, masks),
// the settings form, depth sources, field-level validation messages, import/export and the draft kept
// across reloads. Jobs (render, sweep, progress, queue, results, history) live in jobs.js, LoRAs in loras.js.

import { upload, blobUrl, saveText, download, TINY, ApiError, whenSignedOut } from "./api.js";
import { BoxEditor, instanceColor, TOKEN_PX } from "./canvas.js";
import { initJobs } from "./jobs.js";
import { initLoras } from "./loras.js";
import * as masks from "./masks.js";

const $ = (id) => document.getElementById(id);
const DRAFT_KEY = "threedis.editor.draft";
const UNDO_LIMIT = 200;
const MAX_SIDE = 8192; // the service's limit per side (its pixel-count limit is checked there, in words)
export const SEED_MAX = 18446744073709551615n; // 2^64 - 1, as torch (and `threedis render`) take seeds

// -- layout state ---------------------------------------------------------------------------------

const model = { prompt: "", width: 512, height: 512, instances: [], selected: -1 };
let depth = null; // null (stage 1 at render time) | {source: "job"|"upload"|"photo"|"stage1", job?, upload?, url, label}
const undoStack = [];
const redoStack = [];
let pending = null;

const copyInstance = (i) => ({ prompt: i.prompt, box: [...i.box], ...(i.mask ? { mask: { ...i.mask } } : {}) });
const snapshot = () => JSON.stringify({ prompt: model.prompt, width: model.width, height: model.height,
  instances: model.instances.map(copyInstance) });

function applySnapshot(text) {
  const s = JSON.parse(text);
  Object.assign(model, { prompt: s.prompt, width: s.width, height: s.height, instances: s.instances });
  if (model.selected >= model.instances.length) model.selected = -1;
  syncForm();
  loadMasks();
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
    if (editor.paint) stopPainting();
    hooks.begin();
    model.instances.splice(i, 1);
    model.selected = -1;
    hooks.end();
    editor.draw();
  },
  maskOverlay(i) {
    const m = model.instances[i] && model.instances[i].mask;
    return m ? masks.loadedMask(m.mask_upload) : null;
  },
  painted(i) { finishStroke(i); },
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

/** Fetch every mask the layout names, so the canvas can draw them (it redraws as each arrives). */
function loadMasks() {
  for (const inst of model.instances) {
    if (inst.mask) masks.maskCanvas(inst.mask.mask_upload).then(() => editor.draw()).catch(() => {});
  }
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

const px = (v, side) => Math.round(v * side);

/** Two overlapping squares: the duplicate icon (a drawing, not a glyph: "⧉" is missing from many fonts). */
function copyIcon() {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "icon");
  svg.setAttribute("viewBox", "0 0 16 16");
  svg.setAttribute("aria-hidden", "true");
  for (const [x, y] of [[1.5, 1.5], [5.5, 5.5]]) {
    const rect = document.createElementNS(ns, "rect");
    for (const [k, v] of Object.entries({ x, y, width: 9, height: 9, rx: 1.5, fill: "#fff", stroke: "currentColor", "stroke-width": 1.5 })) {
      rect.setAttribute(k, String(v));
    }
    svg.appendChild(rect);
  }
  return svg;
}

function rowButton(cls, text, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  if (typeof text === "string") b.textContent = text; else b.appendChild(text);
  b.title = title;
  b.setAttribute("aria-label", title);
  b.addEventListener("click", onClick);
  return b;
}

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
    const n = i + 1;
    li.innerHTML = `
      <span class="swatch">${n}</span>
      <div class="box-main">
        <input class="box-prompt" type="text" placeholder="what box ${n} is, e.g. a red cardinal" aria-label="prompt of box ${n}">
        <div class="coords small">
          <label>x0 <input class="coord" data-k="0" type="number" step="1" aria-label="box ${n} left, pixels"></label>
          <label>y0 <input class="coord" data-k="1" type="number" step="1" aria-label="box ${n} top, pixels"></label>
          <label>x1 <input class="coord" data-k="2" type="number" step="1" aria-label="box ${n} right, pixels"></label>
          <label>y1 <input class="coord" data-k="3" type="number" step="1" aria-label="box ${n} bottom, pixels"></label>
          <span class="size muted"></span>
        </div>
        <div class="mask-row small">
          <span class="mask-state muted"></span>
          <button type="button" class="mask-paint">Paint mask</button>
          <label class="button mask-upload-label">Mask file<input class="mask-upload" type="file" accept="image/*" hidden></label>
          <button type="button" class="mask-remove">Remove mask</button>
        </div>
        <span class="field-error" data-field-error="instances[${i}]"></span>
      </div>
      <div class="box-tools"></div>`;
    li.querySelector(".swatch").style.background = instanceColor(i);
    const tools = li.querySelector(".box-tools");
    tools.append(
      rowButton("box-up", "▲", `box ${n}: one place earlier (drawn below the later ones)`, () => reorder(i, i - 1)),
      rowButton("box-down", "▼", `box ${n}: one place later (drawn on top)`, () => reorder(i, i + 1)),
      rowButton("box-dup", copyIcon(), `duplicate box ${n} (Ctrl+D)`, () => duplicate(i)),
      rowButton("box-delete", "✕", `delete box ${n}`, () => hooks.remove(i)));
    tools.querySelector(".box-up").disabled = i === 0;
    tools.querySelector(".box-down").disabled = i === model.instances.length - 1;
    const input = li.querySelector("input.box-prompt");
    input.value = inst.prompt;
    input.addEventListener("focus", () => { hooks.select(i); hooks.begin(); });
    input.addEventListener("input", () => { inst.prompt = input.value; editor.draw(); clearFieldError(`instances[${i}]`); saveDraft(); });
    input.addEventListener("blur", () => {
      // end() rebuilds the list only if something changed; keep the typed text either way.
      if (pending !== null && pending !== snapshot()) { undoStack.push(pending); redoStack.length = 0; }
      pending = null;
      saveDraft();
    });
    input.addEventListener("keydown", (e) => { if (e.key === "Enter" && !(e.ctrlKey || e.metaKey)) input.blur(); });
    li.querySelectorAll("input.coord").forEach((field) => field.addEventListener("change", () => typeCoords(i, li)));
    li.querySelector(".mask-paint").addEventListener("click", () => startPainting(i));
    li.querySelector(".mask-upload").addEventListener("change", (e) => uploadMask(i, e));
    li.querySelector(".mask-remove").addEventListener("click", () => setMask(i, null));
    li.querySelector(".mask-remove").hidden = !inst.mask;
    li.addEventListener("mousedown", (e) => { if (e.target === li || e.target.classList.contains("swatch")) hooks.select(i); });
    list.appendChild(li);
  });
  updateBoxCoords();
  if (focusIndex >= 0 && focusIndex < model.instances.length) {
    const input = list.querySelector(`li[data-index="${focusIndex}"] input.box-prompt`);
    input.focus();
    if (caret !== null) input.setSelectionRange(caret, caret);
  }
}

function updateBoxCoords() {
  document.querySelectorAll("#boxes li[data-index]").forEach((li) => {
    const inst = model.instances[Number(li.dataset.index)];
    if (!inst) return;
    const sides = [model.width, model.height, model.width, model.height];
    li.querySelectorAll("input.coord").forEach((field) => {
      if (document.activeElement !== field) field.value = px(inst.box[Number(field.dataset.k)], sides[Number(field.dataset.k)]);
    });
    const [x0, y0, x1, y1] = inst.box;
    li.querySelector(".size").textContent = `${px(x1 - x0, model.width)} × ${px(y1 - y0, model.height)} px`;
    li.querySelector(".mask-state").textContent = inst.mask ? "mask: painted or uploaded (replaces the box)" : "no mask";
  });
}

/** The four pixel fields of box i typed by hand: one undo step; a box that would be empty is refused. */
function typeCoords(i, li) {
  const fields = [...li.querySelectorAll("input.coord")];
  if (fields.some((f) => f.value.trim() === "")) return; // still typing
  const values = fields.map((f) => Number(f.value));
  const sides = [model.width, model.height, model.width, model.height];
  const clear = () => clearFieldError(`instances[${i}]`);
  if (values.some((v) => !Number.isFinite(v))) { updateBoxCoords(); return; }
  const box = values.map((v, k) => Math.min(1, Math.max(0, v / sides[k])));
  if (box[0] >= box[2] || box[1] >= box[3]) {
    showFieldError(`instances[${i}]`, `box ${i + 1}: x0 must be left of x1 and y0 above y1`);
    updateBoxCoords();
    return;
  }
  clear();
  hooks.begin();
  model.instances[i].box = editor.snap ? editor.snapBox(box) : editor.pixels(box);
  hooks.end();
  editor.draw();
}

/** Move box i to place j of the list: later boxes are drawn (and picked) on top. */
function reorder(i, j) {
  if (j < 0 || j >= model.instances.length) return;
  hooks.begin();
  const [inst] = model.instances.splice(i, 1);
  model.instances.splice(j, 0, inst);
  model.selected = j;
  hooks.end();
  editor.draw();
}

/** A copy of box i one token right and down (kept inside the image), right after it, selected. */
function duplicate(i) {
  const inst = model.instances[i];
  if (!inst) return;
  const du = TOKEN_PX / model.width, dv = TOKEN_PX / model.height;
  const [x0, y0, x1, y1] = inst.box;
  const su = Math.min(du, 1 - x1), sv = Math.min(dv, 1 - y1);
  hooks.begin();
  model.instances.splice(i + 1, 0, { ...copyInstance(inst), box: editor.pixels([x0 + su, y0 + sv, x1 + su, y1 + sv]) });
  model.selected = i + 1;
  hooks.end();
  editor.draw();
}

// -- masks ---------------------------------------------------------------------------------------

function setMask(i, id) {
  const inst = model.instances[i];
  if (!inst) return;
  hooks.begin();
  if (id) inst.mask = { mask_upload: id }; else delete inst.mask;
  hooks.end();
  editor.draw();
}

async function uploadMask(i, e) {
  const file = e.target.files[0];
  e.target.value = "";
  if (!file) return;
  try {
    setMask(i, await masks.uploadFile(file));
  } catch (err) { showProblems(err); }
}

function startPainting(i) {
  const inst = model.instances[i];
  if (!inst) return;
  hooks.select(i);
  const current = inst.mask ? masks.loadedMask(inst.mask.mask_upload) : null; // or a blank one to paint on
  editor.paint = { index: i, canvas: masks.paintCanvas(model.width, model.height, current),
    radius: Number($("brush").value), erase: $("erase").checked };
  $("paint-bar").hidden = false;
  $("paint-box").textContent = `box ${i + 1}`;
  editor.canvas.focus();
  editor.draw();
}

function stopPainting() {
  editor.paint = null;
  $("paint-bar").hidden = true;
  editor.draw();
}

/** After each stroke: upload the painted mask and put it in the layout (one undo step per stroke). */
async function finishStroke(i) {
  const paint = editor.paint;
  if (!paint || paint.index !== i) return;
  if (masks.isEmpty(paint.canvas)) {
    notify(`box ${i + 1}'s mask is empty: paint where the object is (an empty mask would give it no region)`);
    return;
  }
  try {
    setMask(i, await masks.uploadPainted(paint.canvas));
  } catch (err) { showProblems(err); }
}

$("brush").addEventListener("input", () => { if (editor.paint) editor.paint.radius = Number($("brush").value); });
$("erase").addEventListener("change", () => { if (editor.paint) editor.paint.erase = $("erase").checked; });
$("paint-done").addEventListener("click", stopPainting);
$("paint-clear").addEventListener("click", () => {
  if (!editor.paint) return;
  const i = editor.paint.index;
  stopPainting();
  setMask(i, null);
});

// -- global prompt and size ---------------------------------------------------------------------

$("prompt").addEventListener("focus", () => hooks.begin());
$("prompt").addEventListener("input", () => { model.prompt = $("prompt").value; clearFieldError("prompt"); saveDraft(); });
$("prompt").addEventListener("blur", () => hooks.end());

function setSize(width, height) {
  if (editor.paint) stopPainting();
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
  $("size-note").textContent = "";
  setSize(w, h);
});

/** A typed size snaps to the nearest multiple of 16 (one FLUX token), and the field shows what is used. */
function sizeInput() {
  clearFieldError("size");
  if ($("width").value.trim() === "" || $("height").value.trim() === "") return; // still typing
  const notes = [], refused = [];
  const snapped = ["width", "height"].map((name) => {
    const typed = Number($(name).value);
    const kept = name === "width" ? model.width : model.height;
    if (!Number.isFinite(typed) || typed <= 0) { refused.push(`${name} ${$(name).value} is not a size: kept ${kept}`); return kept; }
    const value = Math.min(MAX_SIDE, Math.max(TOKEN_PX, Math.round(typed / TOKEN_PX) * TOKEN_PX));
    if (value !== typed) notes.push(`${name} ${typed} → ${value}${value === MAX_SIDE ? ` (at most ${MAX_SIDE})` : ""}`);
    return value;
  });
  $("size-note").textContent = [notes.length ? `snapped to the 16-pixel token grid: ${notes.join(", ")}` : "", ...refused]
    .filter(Boolean).join("; ");
  setSize(...snapped);
}
$("width").addEventListener("change", sizeInput);
$("height").addEventListener("change", sizeInput);

// -- settings ------------------------------------------------------------------------------------

const SETTINGS = ["steps", "guidance", "seed", "seed-lock", "sam", "sched-i2i", "sched-hard", "sched-i2t",
  "sched-t2i", "sched-t2t", "s1-steps", "s1-size", "s1-refine", "snap", "sweep-count"];

function readSettings() {
  const out = {};
  for (const id of SETTINGS) out[id] = $(id).type === "checkbox" ? $(id).checked : $(id).value;
  out.loras = loras.value();
  return out;
}

function writeSettings(values) {
  for (const id of SETTINGS) {
    if (!(id in values)) continue;
    if ($(id).type === "checkbox") $(id).checked = Boolean(values[id]);
    else $(id).value = values[id] === null || values[id] === undefined ? "" : String(values[id]);
  }
  if ("loras" in values) loras.set(values.loras || []);
  editor.snap = $("snap").checked;
  editor.draw();
}

$("settings").addEventListener("submit", (e) => e.preventDefault()); // Enter in a field renders nothing by surprise
for (const id of SETTINGS) $(id).addEventListener("change", () => { clearFieldError(errorKey(id)); saveDraft(); });
$("snap").addEventListener("change", () => { editor.snap = $("snap").checked; editor.draw(); });

const randomSeed = () => String(Math.floor(Math.random() * 2 ** 31));
$("seed-dice").addEventListener("click", () => { $("seed").value = randomSeed(); clearFieldError("seed"); saveDraft(); });

/** The seed field as a BigInt (0..2^64-1, exact), or null with the problem shown beside it. */
function seedValue() {
  const text = $("seed").value.trim();
  if (!/^\d+$/.test(text) || BigInt(text) > SEED_MAX) {
    showFieldError("seed", `seed: a whole number from 0 to ${SEED_MAX}`);
    return null;
  }
  return BigInt(text);
}

const intOrNull = (v) => (v === "" || v === null || v === undefined ? null : Number(v));

/** The layout JSON, as docs/layout.md defines it (masks as the service's upload ids). */
function layoutJSON() {
  return {
    prompt: model.prompt,
    width: model.width,
    height: model.height,
    instances: model.instances.map(copyInstance),
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

/**
 * Render options, or null when the seed field is not a seed. An unlocked seed is drawn anew
 * first, unless `draw` is false (a plan runs nothing).
 */
function renderOptions(draw = true) {
  if (draw && !$("seed-lock").checked) $("seed").value = randomSeed();
  clearFieldError("seed");
  const seed = seedValue();
  if (seed === null) return null;
  const steps = Number($("steps").value) || 20;
  const sched = ["hard", "i2i", "i2t", "t2i", "t2t"].map((k) => [k, intOrNull($(`sched-${k}`).value)]);
  let schedule = null;
  if (sched.some(([, v]) => v !== null)) {
    const defaults = { hard: steps, i2i: Math.min(4, steps), i2t: steps, t2i: steps, t2t: steps };
    schedule = Object.fromEntries(sched.map(([k, v]) => [k, v === null ? defaults[k] : v]));
  }
  saveDraft();
  // A blank field is left out, so the service's default applies (and says so in the job's options).
  const options = { schedule, sam: $("sam").checked, depth: depthOption(), seed };
  for (const [key, id] of [["steps", "steps"], ["guidance", "guidance"]]) {
    const v = $(id).value.trim();
    if (v !== "") options[key] = Number(v);
  }
  const chosen = loras.value();
  if (chosen.length) options.loras = chosen.map(({ name, upload: id, scale }) => (id ? { upload: id, scale } : { name, scale }));
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

/** The service counts instances from 0 ("instances[2]"); the page speaks of box 3. */
export function boxWords(text) {
  return String(text ?? "").replace(/(?:layout\.)?instances\[(\d+)\](\.(\w+))?/g,
    (_, i, __, key) => `box ${Number(i) + 1}${key ? ` ${key}` : ""}`);
}

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
  if (head === "loras") return "loras";
  if (["prompt", "instances", "steps", "guidance", "seed", "schedule"].includes(head)) return head;
  return "general";
}

function showFieldError(key, message) {
  const slot = document.querySelector(`[data-field-error="${CSS.escape(key)}"]`) ||
    document.querySelector('[data-field-error="general"]');
  const text = boxWords(message);
  slot.textContent = slot.textContent ? `${slot.textContent}\n${text}` : text;
  slot.classList.add("shown");
  if (key === "loras") $("loras-box").open = true;
  const input = key === "prompt" ? $("prompt")
    : key.startsWith("instances[") ? document.querySelector(`#boxes li[data-index="${key.slice(10, -1)}"] input.box-prompt`)
      : key === "size" ? $("width") : $(key);
  if (input && input.classList) input.classList.add("invalid");
}

function clearFieldError(key) {
  const slot = document.querySelector(`[data-field-error="${CSS.escape(key)}"]`);
  if (slot) { slot.textContent = ""; slot.classList.remove("shown"); }
  // The summary on top goes with the last marked field.
  if ($("notice").dataset.kind === "problems" && !document.querySelector(".field-error.shown")) $("notice").hidden = true;
  document.querySelectorAll(".invalid").forEach((el) => {
    if (key === "prompt" ? el.id === "prompt" : key === "size" ? el.id === "width" : key === "seed" ? el.id === "seed"
      : el.closest(`li[data-index="${key.slice(10, -1)}"]`)) {
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
  n.textContent = boxWords(message);
  n.className = `notice ${kind}`;
  n.dataset.kind = source;
  n.hidden = !message;
}

whenSignedOut(() => notify("This browser is no longer signed in to the service (its token changed or the session "
  + "ended): open the address `threedis serve` printed, the one ending in ?token=…, or reload to sign in."));

// -- import, export, new, draft ---------------------------------------------------------------------

function loadLayout(data) {
  if (!data || typeof data !== "object" || !Array.isArray(data.instances || [])) {
    throw new Error("not a layout: expected {prompt, width, height, instances: [{prompt, box}]}");
  }
  if (editor.paint) stopPainting();
  hooks.begin();
  model.prompt = typeof data.prompt === "string" ? data.prompt : "";
  model.width = Number.isInteger(data.width) ? data.width : 512;
  model.height = Number.isInteger(data.height) ? data.height : 512;
  model.instances = (data.instances || []).map((i) => {
    const inst = { prompt: String(i.prompt || ""),
      box: Array.isArray(i.box) && i.box.length === 4 ? i.box.map(Number) : [0.25, 0.25, 0.75, 0.75] };
    if (i.mask && typeof i.mask === "object" && typeof i.mask.mask_upload === "string") inst.mask = { mask_upload: i.mask.mask_upload };
    return inst;
  });
  model.selected = -1;
  hooks.end();
  syncForm();
  loadMasks();
}

/**
 * Import: a layout JSON, and optionally its mask images selected with it. A mask given as a path
 * (the layout.md format) is uploaded from the selected file of that name; one not selected is
 * dropped with a note saying which.
 */
$("import-layout").addEventListener("change", async (e) => {
  const files = [...e.target.files];
  e.target.value = "";
  const json = files.find((f) => f.name.endsWith(".json") || f.type === "application/json");
  if (!json) { notify("select the layout .json file (and its mask images with it)"); return; }
  try {
    const data = JSON.parse(await json.text());
    const images = new Map(files.filter((f) => f !== json).map((f) => [f.name, f]));
    const dropped = [];
    for (const [i, inst] of (Array.isArray(data.instances) ? data.instances : []).entries()) {
      if (typeof inst.mask !== "string") continue;
      const name = inst.mask.split(/[\\/]/).pop();
      const file = images.get(name);
      if (file) inst.mask = { mask_upload: await masks.uploadFile(file) };
      else { dropped.push(`box ${i + 1} (${name})`); delete inst.mask; }
    }
    loadLayout(data);
    clearProblems();
    notify(dropped.length
      ? `imported ${json.name}; masks not selected with it, so left out: ${dropped.join(", ")} (import again with those images selected too)`
      : `imported ${json.name}`, dropped.length ? "error" : "info");
  } catch (err) { notify(`${json.name}: ${err.message}`); }
});

/**
 * Export: layout.json as `threedis render` reads it, each mask as a file beside it
 * (layout-mask-<box>.png, referenced by that relative path), downloaded together.
 */
$("export-layout").addEventListener("click", async () => {
  const layout = layoutJSON();
  const files = [];
  layout.instances.forEach((inst, i) => {
    if (!inst.mask) return;
    const name = `layout-mask-${i + 1}.png`;
    files.push([inst.mask.mask_upload, name]);
    inst.mask = name;
  });
  saveText(`${JSON.stringify(layout, null, 2)}\n`, "layout.json");
  for (const [id, name] of files) {
    try { await download(`uploads/${id}`, name); } catch (err) { notify(`mask ${name}: ${err.message}`); return; }
  }
  if (files.length) {
    notify(`exported layout.json and ${files.length} mask file${files.length > 1 ? "s" : ""} (${files.map(([, n]) => n).join(", ")}); `
      + "keep them in one folder: the layout names its masks by those file names", "info");
  }
});

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
  const mod = e.ctrlKey || e.metaKey;
  if (mod && e.key === "Enter") { e.preventDefault(); jobs.render(); return; } // from anywhere, text fields too
  const el = document.activeElement;
  const typing = el && (el.tagName === "TEXTAREA" || el.tagName === "SELECT" || el.isContentEditable ||
    (el.tagName === "INPUT" && !["checkbox", "radio", "button", "file", "range"].includes(el.type)));
  if (typing) return; // text fields keep their own keys, their own Ctrl+Z included
  if (mod && (e.key === "z" || e.key === "Z")) { e.preventDefault(); (e.shiftKey ? redo : undo)(); return; }
  if (mod && (e.key === "y" || e.key === "Y")) { e.preventDefault(); redo(); return; }
  if (mod && (e.key === "d" || e.key === "D")) { e.preventDefault(); if (model.selected >= 0) duplicate(model.selected); return; }
  if (e.key === "Escape") { if (editor.paint) stopPainting(); else hooks.select(-1); return; }
  editor.key(e);
});

// -- restoring a past job -------------------------------------------------------------------------

const sizeText = (v) => (Array.isArray(v) ? (v[0] === v[1] ? String(v[0]) : `${v[0]}x${v[1]}`) : v ?? "");

/** Put a job's layout, masks and settings back in the editor (history click); says which masks are gone. */
async function restore(job) {
  const layout = JSON.parse(JSON.stringify(job.layout || {}));
  const gone = [];
  for (const [i, inst] of (layout.instances || []).entries()) {
    if (inst.mask && inst.mask.mask_upload && !(await masks.exists(inst.mask.mask_upload))) {
      gone.push(i + 1);
      delete inst.mask;
    }
  }
  loadLayout(layout);
  const o = job.options || {};
  const s = o.schedule || {};
  const s1 = (o.depth && o.depth.stage1) || {};
  writeSettings({
    steps: o.steps ?? $("steps").value, guidance: o.guidance ?? $("guidance").value, seed: o.seed ?? $("seed").value,
    "seed-lock": true, sam: Boolean(o.sam), "sched-i2i": s.i2i, "sched-hard": s.hard, "sched-i2t": s.i2t,
    "sched-t2i": s.t2i, "sched-t2t": s.t2t, "s1-steps": s1.steps, "s1-size": sizeText(s1.size),
    "s1-refine": s1.refine_steps, loras: o.loras || [],
  });
  clearProblems();
  if (gone.length) {
    notify(`the service no longer has the mask of box${gone.length > 1 ? "es" : ""} ${gone.join(", ")} (its upload is gone); `
      + "restored without it: paint or upload it again");
  }
  useDepthOf(job);
  saveDraft();
}

// -- start --------------------------------------------------------------------------------------

const hasDepth = () => depth !== null;
const loras = initLoras({ showProblems, saveDraft, clearFieldError });
const app = { SEED_MAX, hasDepth, layoutJSON, renderOptions, setDepth, restore, useDepthOf, reusableDepth, showProblems,
  clearProblems, notify, boxWords };
const jobs = initJobs(app);

$("tiny-note").hidden = !TINY;
if (TINY) $("steps").value = 4; // the tiny checkpoints' default: a full 20-step run teaches nothing
loadDraft();
syncForm();
jobs.start();
loras.refresh();
const depthShown = () => Boolean(editor.depth && depthImage.complete && depthImage.naturalWidth);
const maskShown = (i) => Boolean(model.instances[i] && model.instances[i].mask && masks.loadedMask(model.instances[i].mask.mask_upload));
// for the browser test and the console
window.threedisEditor = { model, undo, redo, layoutJSON, depthShown, maskShown, editor, jobs };
