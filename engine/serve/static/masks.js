// Instance masks in the page: each is a kind=mask upload on the service ({"mask_upload": id} in the
// layout); here it is kept as an alpha canvas (alpha = inside) for drawing, painting and export.
// Painting makes a new upload per stroke, so undo simply goes back to the previous upload id.

import { blobUrl, upload } from "./api.js";

const canvases = new Map(); // upload id -> Promise<canvas (alpha = mask)>
const ready = new Map();    // upload id -> canvas, once loaded (what the canvas draws synchronously)

/** A canvas whose alpha is the mask image's grey level (nonzero = inside). */
function alphaOf(image, width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0, width, height);
  const data = ctx.getImageData(0, 0, width, height);
  const px = data.data;
  for (let k = 0; k < px.length; k += 4) {
    const grey = px[k]; // the service stores masks as 8-bit grey: R = G = B
    px[k] = px[k + 1] = px[k + 2] = 255;
    px[k + 3] = grey > 0 ? 255 : 0;
  }
  ctx.putImageData(data, 0, 0);
  return canvas;
}

/** The mask upload `id` as an alpha canvas; rejects (ApiError 404) when the service no longer has it. */
export function maskCanvas(id) {
  if (!canvases.has(id)) {
    const promise = blobUrl(`uploads/${id}`).then((url) => new Promise((resolve, reject) => {
      const image = new Image();
      image.onload = () => { const c = alphaOf(image, image.naturalWidth, image.naturalHeight); ready.set(id, c); resolve(c); };
      image.onerror = () => reject(new Error(`mask ${id} is not an image`));
      image.src = url;
    }));
    promise.catch(() => canvases.delete(id));
    canvases.set(id, promise);
  }
  return canvases.get(id);
}

/** The loaded canvas of a mask, or null while it loads (the editor redraws when it arrives). */
export const loadedMask = (id) => ready.get(id) || null;

/** A blank (or copied) mask canvas at the layout's size, to paint on. */
export function paintCanvas(width, height, from) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  if (from) canvas.getContext("2d").drawImage(from, 0, 0, width, height);
  return canvas;
}

/** Whether anything is painted (an all-empty mask would leave the instance no region). */
export function isEmpty(canvas) {
  const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  for (let k = 3; k < px.length; k += 4) if (px[k]) return false;
  return true;
}

/** The mask as a grey PNG blob (white = inside), as the service and `threedis render` read masks. */
export function maskPng(canvas) {
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(canvas, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

/** Upload a painted canvas as a mask; resolves to its upload id (the canvas is kept for drawing). */
export async function uploadPainted(canvas, name = "painted-mask.png") {
  const blob = await maskPng(canvas);
  const up = await upload(new File([blob], name, { type: "image/png" }), "mask");
  const copy = paintCanvas(canvas.width, canvas.height, canvas);
  canvases.set(up.id, Promise.resolve(copy));
  ready.set(up.id, copy);
  return up.id;
}

/** Upload an image file as a mask; resolves to its upload id. */
export async function uploadFile(file) {
  const up = await upload(file, "mask");
  await maskCanvas(up.id);
  return up.id;
}

/** Whether the service still has upload `id` (a restored job's mask may be gone). */
export async function exists(id) {
  try {
    await maskCanvas(id);
    return true;
  } catch (_) {
    return false;
  }
}

