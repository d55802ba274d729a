// The LoRA panel: choose LoRAs from the service's --lora-dir folder or upload one, each with its scale.
// A job names them ({name, scale} or {upload, scale}); the service never takes a path.

import { api, uploadLora } from "./api.js";

const $ = (id) => document.getElementById(id);

/** app: {showProblems, saveDraft, clearFieldError}. Returns {value(), set(list), refresh()}. */
export function initLoras(app) {
  let available = []; // [{key, name, upload?, bytes}] from GET /loras
  let chosen = [];    // [{name, upload?, scale}] in the order they are applied

  const keyOf = (item) => (item.upload ? `upload:${item.upload}` : `name:${item.name}`);
  // An upload may share a folder LoRA's file name: the list says which one it is.
  const labelOf = (item) => (item.upload ? `${item.name || item.upload} (uploaded)` : item.name);
  const mb = (bytes) => (bytes ? ` · ${(bytes / 1e6).toFixed(1)} MB` : "");

  async function refresh() {
    try {
      const answer = await api("GET", "loras");
      available = [...answer.named.map((l) => ({ ...l, key: keyOf(l), where: "folder" })),
        ...answer.uploaded.map((l) => ({ ...l, key: keyOf(l), where: "uploaded" }))];
      const choice = $("lora-choice");
      choice.replaceChildren(...(available.length ? available.map((l) => {
        const option = document.createElement("option");
        option.value = l.key;
        option.textContent = `${l.name} (${l.where}${mb(l.bytes)})`;
        return option;
      }) : [Object.assign(document.createElement("option"), { value: "", textContent: answer.folder
        ? "the --lora-dir folder has no .safetensors files" : "none yet: upload one (or start with --lora-dir)" })]));
      $("lora-add").disabled = !available.length;
      draw();
    } catch (_) { /* the service is starting: the next refresh fills it */ }
  }

  function draw() {
    const list = $("lora-list");
    list.replaceChildren(...chosen.map((item, k) => {
      const li = document.createElement("li");
      const label = document.createElement("span");
      label.className = "lora-name";
      label.textContent = item.label || item.name || `upload ${item.upload}`;
      const scale = Object.assign(document.createElement("input"), { type: "number", step: "0.05", min: "-100",
        max: "100", value: String(item.scale) }); // the engine's range (checks.LORA_SCALE_MAX)
      scale.setAttribute("aria-label", `scale of ${label.textContent}`);
      scale.addEventListener("change", () => { item.scale = Number(scale.value); app.clearFieldError("loras"); app.saveDraft(); });
      const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "✕",
        title: "remove this LoRA" });
      remove.addEventListener("click", () => { chosen.splice(k, 1); draw(); app.saveDraft(); });
      li.append(label, scale, remove);
      return li;
    }));
    $("lora-count").textContent = chosen.length ? `(${chosen.length})` : "";
  }

  $("lora-add").addEventListener("click", () => {
    const item = available.find((l) => l.key === $("lora-choice").value);
    if (!item || chosen.some((c) => keyOf(c) === item.key)) return;
    chosen.push({ ...(item.upload ? { upload: item.upload } : {}), name: item.name, label: labelOf(item), scale: 1 });
    app.clearFieldError("loras");
    draw();
    app.saveDraft();
  });

  $("lora-upload").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    if (!file) return;
    try {
      const up = await uploadLora(file);
      await refresh();
      chosen.push({ upload: up.upload, name: up.name, label: labelOf(up), scale: 1 });
      draw();
      app.saveDraft();
    } catch (err) { app.showProblems(err); }
  });

  return {
    refresh,
    /** The chosen LoRAs as the job's options.loras entries (plus labels for the page). */
    value: () => chosen.map((c) => ({ ...c })),
    /** Restore a list (a draft's, or a past job's options.loras). */
    set(list) {
      chosen = (Array.isArray(list) ? list : []).filter((c) => c && (c.name || c.upload)).map((c) => ({
        ...(c.upload ? { upload: c.upload } : { name: c.name }),
        label: c.label || labelOf({ ...c, name: c.name || (available.find((a) => a.key === keyOf(c)) || {}).name }),
        name: c.name, scale: Number.isFinite(Number(c.scale)) ? Number(c.scale) : 1 }));
      draw();
    },
  };
}
