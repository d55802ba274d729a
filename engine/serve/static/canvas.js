// The layout canvas: the depth map at the layout's aspect ratio with the instance boxes over it.
// Drag on empty space to draw a box, drag a box to move it, drag a handle to resize it.
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

const HANDLE = 6;      // half the handle square, CSS pixels
const MIN_DRAW = 6;    // a drag shorter than this (CSS pixels) is a click, not a new box
const MIN_SIDE = 0.01; // smallest box side, as a fraction of the image
const round = (v) => Math.round(Math.min(1, Math.max(0, v)) * 10000) / 10000;

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

export class BoxEditor {
  /**
   * model: {instances: [{prompt, box}], selected: index or -1, width, height}
   * hooks: begin() before a change (undo snapshot), end() after it, select(i), changed()
   */
  constructor(canvas, model, hooks) {
    this.canvas = canvas;
    this.model = model;
    this.hooks = hooks;
    this.depth = null;    // an <img> or null
    this.drag = null;     // the gesture in progress
    this.draft = null;    // the box being drawn
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

  /** What lies under a normalised point: a handle of the selected box, a box, or nothing. */
  hit([u, v]) {
    const { instances, selected } = this.model;
    const px = u * this.cssW, py = v * this.cssH;
    if (selected >= 0 && instances[selected]) {
      const points = handlePoints(instances[selected].box, this.cssW, this.cssH);
      for (const [name, [hx, hy]] of Object.entries(points)) {
        if (Math.abs(px - hx) <= HANDLE + 2 && Math.abs(py - hy) <= HANDLE + 2) return { index: selected, handle: name };
      }
    }
    // Topmost first; a small box drawn inside a big one stays reachable because it is drawn later.
    for (let i = instances.length - 1; i >= 0; i--) {
      const [x0, y0, x1, y1] = instances[i].box;
      if (u >= x0 && u <= x1 && v >= y0 && v <= y1) return { index: i, handle: null };
    }
    return null;
  }

  down(e) {
    if (e.button !== 0) return;
    this.canvas.focus();
    this.canvas.setPointerCapture(e.pointerId);
    const p = this.point(e);
    const target = this.hit(p);
    if (target) {
      this.hooks.select(target.index);
      this.hooks.begin();
      this.drag = { mode: target.handle ? "resize" : "move", handle: target.handle, index: target.index,
        start: p, box: [...this.model.instances[target.index].box], moved: false };
    } else {
      this.drag = { mode: "draw", start: p, moved: false };
    }
    this.draw();
  }

  move(e) {
    const p = this.point(e);
    if (!this.drag) {
      const target = this.hit(p);
      this.canvas.style.cursor = !target ? "crosshair" : target.handle ? CURSORS[target.handle] : "move";
      return;
    }
    const d = this.drag;
    const du = p[0] - d.start[0], dv = p[1] - d.start[1];
    if (Math.abs(du * this.cssW) + Math.abs(dv * this.cssH) >= 2) d.moved = true;
    if (d.mode === "draw") {
      const far = Math.abs(du * this.cssW) >= MIN_DRAW || Math.abs(dv * this.cssH) >= MIN_DRAW;
      this.draft = far ? normalise(d.start, p) : null;
    } else if (d.mode === "move") {
      const [x0, y0, x1, y1] = d.box;
      const su = Math.min(Math.max(du, -x0), 1 - x1), sv = Math.min(Math.max(dv, -y0), 1 - y1);
      this.model.instances[d.index].box = [x0 + su, y0 + sv, x1 + su, y1 + sv].map(round);
      this.hooks.changed();
    } else {
      const [m0, m1, m2, m3] = HANDLES[d.handle];
      let [x0, y0, x1, y1] = d.box;
      if (m0) x0 = Math.min(x0 + du, x1 - MIN_SIDE);
      if (m1) y0 = Math.min(y0 + dv, y1 - MIN_SIDE);
      if (m2) x1 = Math.max(x1 + du, x0 + MIN_SIDE);
      if (m3) y1 = Math.max(y1 + dv, y0 + MIN_SIDE);
      this.model.instances[d.index].box = [x0, y0, x1, y1].map(round);
      this.hooks.changed();
    }
    this.draw();
  }

  up(e) {
    const d = this.drag;
    if (!d) return;
    this.drag = null;
    if (this.canvas.hasPointerCapture(e.pointerId)) this.canvas.releasePointerCapture(e.pointerId);
    if (d.mode === "draw") {
      const box = this.draft;
      this.draft = null;
      if (box) {
        this.hooks.begin();
        this.model.instances.push({ prompt: "", box });
        this.hooks.end();
        this.hooks.select(this.model.instances.length - 1, { focusPrompt: true });
      } else {
        this.hooks.select(-1);
      }
    } else {
      this.hooks.end();
    }
    this.draw();
  }

  /** Delete and arrow keys for the selected box (the page calls this outside text fields). Returns true if used. */
  key(e) {
    const i = this.model.selected;
    if (i < 0 || !this.model.instances[i]) return false;
    if (e.key === "Delete" || e.key === "Backspace") {
      e.preventDefault();
      this.hooks.remove(i);
      return true;
    }
    const step = (e.shiftKey ? 8 : 1) * 16; // one token (16 px), eight with Shift
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
    this.model.instances[i].box = box.map(round);
    this.hooks.end();
    this.draw();
  }

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
    const { instances, selected } = this.model;
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

  drawEmpty(ctx, w, h) {
    const g = ctx.createLinearGradient(0, 0, 0, h);
    g.addColorStop(0, "#2a2f3a");
    g.addColorStop(1, "#4a505c");
    ctx.fillStyle = g;
    ctx.fillRect(0, 0, w, h);
    // The token grid: one cell per 16 x 16 pixels, every fourth line drawn.
    ctx.strokeStyle = "rgba(255,255,255,0.06)";
    ctx.lineWidth = 1;
    const cols = this.model.width / 64, rows = this.model.height / 64;
    ctx.beginPath();
    for (let c = 1; c < cols; c++) { const x = Math.round((c / cols) * w) + 0.5; ctx.moveTo(x, 0); ctx.lineTo(x, h); }
    for (let r = 1; r < rows; r++) { const y = Math.round((r / rows) * h) + 0.5; ctx.moveTo(0, y); ctx.lineTo(w, y); }
    ctx.stroke();
    ctx.fillStyle = "rgba(255,255,255,0.45)";
    ctx.font = "13px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.fillText("no depth map yet: drag to draw a box, then Make depth or Render", w / 2, h - 14);
    ctx.textAlign = "left";
  }

  drawBox(ctx, inst, i, selected, w, h) {
    const [x0, y0, x1, y1] = inst.box;
    const X = x0 * w, Y = y0 * h, W = (x1 - x0) * w, H = (y1 - y0) * h;
    const colour = instanceColor(i);
    ctx.save();
    ctx.globalAlpha = selected ? 0.28 : 0.16;
    ctx.fillStyle = colour;
    ctx.fillRect(X, Y, W, H);
    ctx.globalAlpha = 1;
    ctx.lineWidth = selected ? 3 : 2;
    ctx.strokeStyle = colour;
    ctx.strokeRect(X, Y, W, H);
    // Label: number and the start of the prompt, on the box's colour.
    ctx.font = "bold 12px system-ui, sans-serif";
    const text = `${i + 1}${inst.prompt ? `  ${inst.prompt.length > 28 ? `${inst.prompt.slice(0, 27)}…` : inst.prompt}` : ""}`;
    const tw = Math.min(ctx.measureText(text).width + 10, Math.max(W, 22));
    const ly = Y >= 18 ? Y - 18 : Y;
    ctx.fillStyle = colour;
    ctx.fillRect(X, ly, tw, 18);
    ctx.fillStyle = "#fff";
    ctx.shadowColor = "rgba(0,0,0,0.6)";
    ctx.shadowBlur = 2;
    ctx.beginPath();
    ctx.rect(X, ly, tw, 18);
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
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])].map(round);
}
