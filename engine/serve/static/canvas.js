// The layout canvas: the depth map at the layout's aspect ratio with the instance boxes (and their masks)
// over it. A drag that starts on empty space or inside a box draws a new box (so a cup can be drawn on a
// table); Shift+drag always draws; a box moves from its border or its label, and resizes from the
// handles of the selected box. A click selects the topmost box under the pointer. In mask-painting mode
// drags paint (Alt: erase) the selected box's mask instead.
// Boxes are kept normalised (0..1, origin top-left), exactly as the layout JSON stores them.

const PALETTE = [
  [230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
  [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40], [128, 0, 0],
];

/** The colour of instance `i` (0-based), the same as in the engine's pictures (regions.png). */
export function instanceColor(i) {
  if (i < PALETTE.length) return `rgb(${PALETTE[i].join(",")})`;
  const hue = ((i * 0.618033988749895) % 1) * 360;
  return `hsl(${hue.toFixed(1)}, 88%, 60%)`;
}

export const TOKEN_PX = 16; // one FLUX token covers 16 x 16 pixels
const HANDLE = 6;      // half the handle square, CSS pixels
const BORDER = 5;      // how close to an edge (CSS pixels) a press grabs the box to move it
const MIN_DRAW = 6;    // a drag shorter than this (CSS pixels) is a click, not a new box
const MIN_SIDE = 0.01; // smallest box side, as a fraction of the image
const LABEL_H = 18;

/**
 * A box with its edges on whole pixels of the layout (width x height), as fractions of the image. Whole
 * pixels keep token-grid edges exact (16 px is 1/32 of 512): a fraction rounded to a few decimals would
 * not be, and the service's ceil would give a snapped box an extra row of tokens. Never empty.
 */
export function pixelBox(box, width, height) {
  const [a, b, c, d] = box.map((v, k) => Math.round(Math.min(1, Math.max(0, v)) * (k % 2 ? height : width)));
  const x1 = Math.max(c, Math.min(width, a + 1)), y1 = Math.max(d, Math.min(height, b + 1));
  return [Math.min(a, x1 - 1) / width, Math.min(b, y1 - 1) / height, x1 / width, y1 / height];
}

// Handle names: which edges they move (x0, y0, x1, y1).
const HANDLES = {
  nw: [1, 1, 0, 0], n: [0, 1, 0, 0], ne: [0, 1, 1, 0], e: [0, 0, 1, 0],
  se: [0, 0, 1, 1], s: [0, 0, 0, 1], sw: [1, 0, 0, 1], w: [1, 0, 0, 0],
};
const CURSORS = { nw: "nwse-resize", se: "nwse-resize", ne: "nesw-resize", sw: "nesw-resize",
  n: "ns-resize", s: "ns-resize", e: "ew-resize", w: "ew-resize" };

function handlePoints(box, w, h) {
  const [x0, y0, x1, y1] = [box[0] * w, box[1] * h, box[2] * w, box[3] * h];
  const mx = (x0 + x1) / 2, my = (y0 + y1) / 2;
  return { nw: [x0, y0], n: [mx, y0], ne: [x1, y0], e: [x1, my], se: [x1, y1], s: [mx, y1], sw: [x0, y1], w: [x0, my] };
}

/** Wrap `text` into lines no wider than `width` (canvas text has no wrapping of its own). */
function wrapLines(ctx, text, width) {
  const lines = [];
  let line = "";
  for (const word of text.split(" ")) {
    const next = line ? `${line} ${word}` : word;
    if (line && ctx.measureText(next).width > width) { lines.push(line); line = word; } else line = next;
  }
  if (line) lines.push(line);
  return lines;
}

export class BoxEditor {
  /**
   * model: {instances: [{prompt, box, mask?}], selected: index or -1, width, height}
   * hooks: begin() before a change (undo snapshot), end() after it, select(i), changed(), remove(i),
   *        maskOverlay(i) -> a canvas/image to tint over box i or null, painted(i) after a stroke
   */
  constructor(canvas, model, hooks) {
    this.canvas = canvas;
    this.model = model;
    this.hooks = hooks;
    this.depth = null;    // an <img> or null
    this.drag = null;     // the gesture in progress
    this.draft = null;    // the box being drawn
    this.snap = false;    // snap edges to the 16-px token grid
    this.paint = null;    // {index, canvas (alpha = mask, layout pixels), radius (layout px), erase}
    this.labels = [];     // label rectangles [x, y, w, h] in CSS pixels, per box, from the last draw
    this.cssW = 1;
    this.cssH = 1;
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    canvas.addEventListener("pointerup", (e) => this.up(e));
    canvas.addEventListener("pointercancel", (e) => this.up(e));
    new ResizeObserver(() => this.fit()).observe(canvas.parentElement);
  }

  setDepth(img) { this.depth = img; this.draw(); }

  /** Size the canvas to its frame at the layout's aspect ratio, then redraw. */
  fit() {
    const frame = this.canvas.parentElement;
    const aspect = this.model.width / this.model.height;
    const maxW = frame.clientWidth || 512;
    const maxH = Math.max(240, Math.min(window.innerHeight * 0.62, 720));
    let w = maxW, h = w / aspect;
    if (h > maxH) { h = maxH; w = h * aspect; }
    this.cssW = Math.round(w);
    this.cssH = Math.round(h);
    const dpr = window.devicePixelRatio || 1;
    this.canvas.style.width = `${this.cssW}px`;
    this.canvas.style.height = `${this.cssH}px`;
    this.canvas.width = Math.round(this.cssW * dpr);
    this.canvas.height = Math.round(this.cssH * dpr);
    this.draw();
  }

  point(e) {
    const r = this.canvas.getBoundingClientRect();
    return [(e.clientX - r.left) / r.width, (e.clientY - r.top) / r.height];
  }

  /** `box` on whole pixels of the layout (see pixelBox). */
  pixels(box) { return pixelBox(box, this.model.width, this.model.height); }

  // -- the token grid -----------------------------------------------------------------------------

  snapU(u) { const cols = this.model.width / TOKEN_PX; return Math.round(u * cols) / cols; }
  snapV(v) { const rows = this.model.height / TOKEN_PX; return Math.round(v * rows) / rows; }

  /** A box with its edges on the token grid (never collapsed to nothing). */
  snapBox([x0, y0, x1, y1]) {
    const cols = this.model.width / TOKEN_PX, rows = this.model.height / TOKEN_PX;
    let [a, b, c, d] = [this.snapU(x0), this.snapV(y0), this.snapU(x1), this.snapV(y1)];
    if (c <= a) c = Math.min(1, a + 1 / cols);
    if (d <= b) d = Math.min(1, b + 1 / rows);
    return this.pixels([a, b, c, d]);
  }

  // -- what is under the pointer -----------------------------------------------------------------

  /**
   * What lies under a normalised point: a handle of the selected box ("handle"), a box's label or
   * border ("grab": moves it), a box's inside ("inside": a click selects it, a drag draws), or null.
   * Topmost first: a later box is drawn over an earlier one.
   */
  hit([u, v]) {
    const { instances, selected } = this.model;
    const px = u * this.cssW, py = v * this.cssH;
    if (selected >= 0 && instances[selected]) {
      const points = handlePoints(instances[selected].box, this.cssW, this.cssH);
      for (const [name, [hx, hy]] of Object.entries(points)) {
        if (Math.abs(px - hx) <= HANDLE + 2 && Math.abs(py - hy) <= HANDLE + 2) return { index: selected, part: "handle", handle: name };
      }
    }
    for (let i = instances.length - 1; i >= 0; i--) {
      const label = this.labels[i];
      if (label && px >= label[0] && px <= label[0] + label[2] && py >= label[1] && py <= label[1] + label[3]) {
        return { index: i, part: "grab" };
      }
    }
    for (let i = instances.length - 1; i >= 0; i--) {
      const [x0, y0, x1, y1] = instances[i].box.map((c, k) => c * (k % 2 ? this.cssH : this.cssW));
      const near = px >= x0 - BORDER && px <= x1 + BORDER && py >= y0 - BORDER && py <= y1 + BORDER;
      if (!near) continue;
      const onEdge = Math.min(Math.abs(px - x0), Math.abs(px - x1), Math.abs(py - y0), Math.abs(py - y1)) <= BORDER;
      if (onEdge) return { index: i, part: "grab" };
    }
    for (let i = instances.length - 1; i >= 0; i--) {
      const [x0, y0, x1, y1] = instances[i].box;
      if (u >= x0 && u <= x1 && v >= y0 && v <= y1) return { index: i, part: "inside" };
    }
    return null;
  }

  // -- gestures ----------------------------------------------------------------------------------

  down(e) {
    if (e.button !== 0) return;
    this.canvas.focus();
    this.canvas.setPointerCapture(e.pointerId);
    const p = this.point(e);
    if (this.paint) {
      this.drag = { mode: "paint", last: p };
      this.paintAt(p, p, e.altKey);
      this.draw();
      return;
    }
    const target = e.shiftKey ? null : this.hit(p); // Shift: always draw, even on a border
    if (target && target.part !== "inside") {
      this.hooks.select(target.index);
      this.hooks.begin();
      this.drag = { mode: target.part === "handle" ? "resize" : "move", handle: target.handle, index: target.index,
        start: p, box: [...this.model.instances[target.index].box] };
    } else {
      this.drag = { mode: "draw", start: p, inside: target ? target.index : -1 };
    }
    this.draw();
  }

  move(e) {
    const p = this.point(e);
    if (!this.drag) {
      if (this.paint) { this.canvas.style.cursor = "cell"; return; }
      const target = e.shiftKey ? null : this.hit(p);
      this.canvas.style.cursor = !target || target.part === "inside" ? "crosshair"
        : target.part === "handle" ? CURSORS[target.handle] : "move";
      return;
    }
    const d = this.drag;
    if (d.mode === "paint") {
      this.paintAt(d.last, p, e.altKey);
      d.last = p;
      this.draw();
      return;
    }
    const du = p[0] - d.start[0], dv = p[1] - d.start[1];
    if (d.mode === "draw") {
      const far = Math.abs(du * this.cssW) >= MIN_DRAW || Math.abs(dv * this.cssH) >= MIN_DRAW;
      this.draft = far ? this.pixels(normalise(d.start, p)) : null;
      if (this.draft && this.snap) this.draft = this.snapBox(this.draft);
    } else if (d.mode === "move") {
      const [x0, y0, x1, y1] = d.box;
      let su = Math.min(Math.max(du, -x0), 1 - x1), sv = Math.min(Math.max(dv, -y0), 1 - y1);
      if (this.snap) {
        su = Math.min(Math.max(this.snapU(x0 + su) - x0, -x0), 1 - x1);
        sv = Math.min(Math.max(this.snapV(y0 + sv) - y0, -y0), 1 - y1);
      }
      this.model.instances[d.index].box = this.pixels([x0 + su, y0 + sv, x1 + su, y1 + sv]);
      this.hooks.changed();
    } else {
      const [m0, m1, m2, m3] = HANDLES[d.handle];
      let [x0, y0, x1, y1] = d.box;
      const su = (u) => (this.snap ? this.snapU(u) : u), sv = (v) => (this.snap ? this.snapV(v) : v);
      if (m0) x0 = Math.min(su(x0 + du), x1 - MIN_SIDE);
      if (m1) y0 = Math.min(sv(y0 + dv), y1 - MIN_SIDE);
      if (m2) x1 = Math.max(su(x1 + du), x0 + MIN_SIDE);
      if (m3) y1 = Math.max(sv(y1 + dv), y0 + MIN_SIDE);
      this.model.instances[d.index].box = this.pixels([x0, y0, x1, y1]);
      this.hooks.changed();
    }
    this.draw();
  }

  up(e) {
    const d = this.drag;
    if (!d) return;
    this.drag = null;
    if (this.canvas.hasPointerCapture(e.pointerId)) this.canvas.releasePointerCapture(e.pointerId);
    if (d.mode === "paint") {
      this.hooks.painted(this.paint.index);
    } else if (d.mode === "draw") {
      const box = this.draft;
      this.draft = null;
      if (box) {
        this.hooks.begin();
        this.model.instances.push({ prompt: "", box });
        this.hooks.end();
        this.hooks.select(this.model.instances.length - 1, { focusPrompt: true });
      } else {
        this.hooks.select(d.inside); // a click: the box under it, or none
      }
    } else {
      this.hooks.end();
    }
    this.draw();
  }

  /** Paint (or erase) a stroke from a to b into the mask being painted. */
  paintAt(a, b, erase) {
    const { canvas, radius } = this.paint;
    const ctx = canvas.getContext("2d");
    ctx.save();
    ctx.globalCompositeOperation = erase || this.paint.erase ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = "#fff";
    ctx.lineCap = "round";
    ctx.lineWidth = radius * 2;
    ctx.beginPath();
    ctx.moveTo(a[0] * canvas.width, a[1] * canvas.height);
    ctx.lineTo(b[0] * canvas.width + 0.01, b[1] * canvas.height);
    ctx.stroke();
    ctx.restore();
  }

  // -- keys ----------------------------------------------------------------------------------------

  /** Delete and arrow keys for the selected box (the page calls this outside text fields). Returns true if used. */
  key(e) {
    const i = this.model.selected;
    if (i < 0 || !this.model.instances[i]) return false;
    if (e.key === "Delete" || e.key === "Backspace") {
      e.preventDefault();
      this.hooks.remove(i);
      return true;
    }
    const step = (e.shiftKey ? 8 : 1) * TOKEN_PX; // one token (16 px), eight with Shift
    const moves = { ArrowLeft: [-step / this.model.width, 0], ArrowRight: [step / this.model.width, 0],
      ArrowUp: [0, -step / this.model.height], ArrowDown: [0, step / this.model.height] };
    if (!(e.key in moves)) return false;
    e.preventDefault();
    this.nudge(i, ...moves[e.key], e.altKey);
    return true;
  }

  /** Move box i by (du, dv), or grow/shrink its far corner with grow=true; one undo step each. */
  nudge(i, du, dv, grow) {
    const [x0, y0, x1, y1] = this.model.instances[i].box;
    this.hooks.begin();
    let box;
    if (grow) {
      box = [x0, y0, Math.max(x0 + MIN_SIDE, x1 + du), Math.max(y0 + MIN_SIDE, y1 + dv)];
    } else {
      const su = Math.min(Math.max(du, -x0), 1 - x1), sv = Math.min(Math.max(dv, -y0), 1 - y1);
      box = [x0 + su, y0 + sv, x1 + su, y1 + sv];
    }
    this.model.instances[i].box = this.pixels(box);
    this.hooks.end();
    this.draw();
  }

  // -- drawing -------------------------------------------------------------------------------------

  draw() {
    const ctx = this.canvas.getContext("2d");
    const dpr = this.canvas.width / Math.max(1, this.cssW);
    const w = this.cssW, h = this.cssH;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    if (this.depth && this.depth.complete && this.depth.naturalWidth) {
      ctx.drawImage(this.depth, 0, 0, w, h);
    } else {
      this.drawEmpty(ctx, w, h);
    }
    if (this.snap) this.drawGrid(ctx, w, h, "rgba(255,255,255,0.10)", 1);
    const { instances, selected } = this.model;
    this.labels = [];
    instances.forEach((inst, i) => this.drawMask(ctx, i, w, h));
    instances.forEach((inst, i) => this.drawBox(ctx, inst, i, i === selected, w, h));
    if (this.draft) {
      const [x0, y0, x1, y1] = this.draft;
      ctx.setLineDash([6, 4]);
      ctx.strokeStyle = instanceColor(instances.length);
      ctx.lineWidth = 2;
      ctx.strokeRect(x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h);
      ctx.setLineDash([]);
    }
  }

  drawGrid(ctx, w, h, colour, every) {
    ctx.strokeStyle = colour;
    ctx.lineWidth = 1;
    const cols = this.model.width / (TOKEN_PX * every), rows = this.model.height / (TOKEN_PX * every);
    ctx.beginPath();
    for (let c = 1; c < cols; c++) { const x = Math.round((c / cols) * w) + 0.5; ctx.moveTo(x, 0); ctx.lineTo(x, h); }
    for (let r = 1; r < rows; r++) { const y = Math.round((r / rows) * h) + 0.5; ctx.moveTo(0, y); ctx.lineTo(w, y); }
    ctx.stroke();
  }

  drawEmpty(ctx, w, h) {
    const g = ctx.createLinearGradient(0, 0, 0, h);
    g.addColorStop(0, "#2a2f3a");
    g.addColorStop(1, "#4a505c");
    ctx.fillStyle = g;
    ctx.fillRect(0, 0, w, h);
    this.drawGrid(ctx, w, h, "rgba(255,255,255,0.06)", 4); // the token grid, every fourth line
    ctx.fillStyle = "rgba(255,255,255,0.45)";
    ctx.font = "13px system-ui, sans-serif";
    ctx.textAlign = "center";
    const lines = wrapLines(ctx, "no depth map yet: drag to draw a box, then Make depth or Render", w - 24);
    lines.forEach((line, k) => ctx.fillText(line, w / 2, h - 14 - (lines.length - 1 - k) * 17));
    ctx.textAlign = "left";
  }

  /** Box i's mask, tinted in its colour (the one being painted is drawn live). */
  drawMask(ctx, i, w, h) {
    const source = this.paint && this.paint.index === i ? this.paint.canvas : this.hooks.maskOverlay(i);
    if (!source) return;
    const tint = document.createElement("canvas");
    tint.width = source.width;
    tint.height = source.height;
    const t = tint.getContext("2d");
    t.fillStyle = instanceColor(i);
    t.fillRect(0, 0, tint.width, tint.height);
    t.globalCompositeOperation = "destination-in";
    t.drawImage(source, 0, 0);
    ctx.save();
    ctx.globalAlpha = i === this.model.selected ? 0.5 : 0.35;
    ctx.drawImage(tint, 0, 0, w, h);
    ctx.restore();
  }

  drawBox(ctx, inst, i, selected, w, h) {
    const [x0, y0, x1, y1] = inst.box;
    const X = x0 * w, Y = y0 * h, W = (x1 - x0) * w, H = (y1 - y0) * h;
    const colour = instanceColor(i);
    ctx.save();
    ctx.globalAlpha = selected ? 0.28 : 0.16;
    ctx.fillStyle = colour;
    if (!inst.mask) ctx.fillRect(X, Y, W, H); // a masked box shows its mask instead
    ctx.globalAlpha = 1;
    ctx.lineWidth = selected ? 3 : 2;
    ctx.strokeStyle = colour;
    if (inst.mask) ctx.setLineDash([5, 3]);
    ctx.strokeRect(X, Y, W, H);
    ctx.setLineDash([]);
    // Label: number and the start of the prompt, on the box's colour; dragging it moves the box.
    ctx.font = "bold 12px system-ui, sans-serif";
    const text = `${i + 1}${inst.prompt ? `  ${inst.prompt.length > 28 ? `${inst.prompt.slice(0, 27)}…` : inst.prompt}` : ""}`;
    const tw = Math.min(ctx.measureText(text).width + 10, Math.max(W, 22));
    const ly = Y >= LABEL_H ? Y - LABEL_H : Y;
    this.labels[i] = [X, ly, tw, LABEL_H];
    ctx.fillStyle = colour;
    ctx.fillRect(X, ly, tw, LABEL_H);
    ctx.fillStyle = "#fff";
    ctx.shadowColor = "rgba(0,0,0,0.6)";
    ctx.shadowBlur = 2;
    ctx.beginPath();
    ctx.rect(X, ly, tw, LABEL_H);
    ctx.clip();
    ctx.fillText(text, X + 5, ly + 13);
    ctx.restore();
    if (selected) {
      ctx.fillStyle = "#fff";
      ctx.strokeStyle = colour;
      ctx.lineWidth = 2;
      for (const [hx, hy] of Object.values(handlePoints(inst.box, w, h))) {
        ctx.fillRect(hx - HANDLE, hy - HANDLE, HANDLE * 2, HANDLE * 2);
        ctx.strokeRect(hx - HANDLE, hy - HANDLE, HANDLE * 2, HANDLE * 2);
      }
    }
  }
}

function normalise(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}
