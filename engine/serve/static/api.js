// Talking to the threedis service: fetches that ride on the page's session cookie (HttpOnly: no
// script here ever sees the token), the 422 problem format, JSON that keeps 64-bit seeds exact,
// image blobs and the event WebSocket.

const meta = (name) => {
  const tag = document.querySelector(`meta[name="${name}"]`);
  return tag ? tag.getAttribute("content") || "" : "";
};

export const TINY = meta("threedis-tiny") === "1";
export const BASE = "/api/v1";

/** An HTTP error with the service's message and its per-field problems. */
export class ApiError extends Error {
  constructor(status, message, problems) {
    super(message);
    this.status = status;
    this.problems = problems || [];
  }
}

// -- JSON with whole numbers beyond 2^53 (seeds go up to 2^64 - 1) ---------------------------------

/**
 * JSON.parse, except that an integer too long for a double (16+ digits) becomes a string of its
 * digits, so a seed such as 11279306965410786290 survives the trip exactly.
 */
export function parseJSON(text) {
  let out = "";
  let i = 0;
  let inString = false;
  while (i < text.length) {
    const c = text[i];
    if (inString) {
      out += c;
      if (c === "\\") { out += text[i + 1] ?? ""; i += 2; continue; }
      if (c === '"') inString = false;
      i += 1;
      continue;
    }
    if (c === '"') { inString = true; out += c; i += 1; continue; }
    if ((c >= "0" && c <= "9") || c === "-") {
      let j = i + 1;
      while (j < text.length && /[0-9.eE+-]/.test(text[j])) j += 1;
      const number = text.slice(i, j);
      out += /^-?\d{16,}$/.test(number) ? `"${number}"` : number;
      i = j;
      continue;
    }
    out += c;
    i += 1;
  }
  return JSON.parse(out);
}

/** JSON.stringify that writes a BigInt as its digits (a JSON number of any length). */
export function stringifyJSON(value) {
  const marks = [];
  const text = JSON.stringify(value, (_, v) => {
    if (typeof v !== "bigint") return v;
    marks.push(v.toString());
    return `\u0000big${marks.length - 1}\u0000`;
  });
  return text.replace(/"\\u0000big(\d+)\\u0000"/g, (_, n) => marks[Number(n)]);
}

// -- requests ------------------------------------------------------------------------------------

export function apiUrl(path) {
  return path.startsWith("/") ? path : `${BASE}/${path}`;
}

let onSignedOut = () => {};
/** What to do when the service says the session is gone (401): the page asks to sign in again. */
export function whenSignedOut(handler) { onSignedOut = handler; }

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let problems = [];
  try {
    const body = parseJSON(await response.text());
    const detail = body && body.detail;
    if (typeof detail === "string") message = detail;
    else if (Array.isArray(detail)) {
      problems = detail.map(fastapiProblem);
      message = problems.map((p) => `${p.field}: ${p.message}`).join("; ");
    } else if (detail && typeof detail === "object") {
      if (detail.message) message = detail.message;
      if (Array.isArray(detail.problems)) problems = detail.problems;
    }
  } catch (_) { /* not JSON: keep the status line */ }
  if (response.status === 401) onSignedOut();
  return new ApiError(response.status, message, problems);
}

// FastAPI's own request-validation shape: {loc: ["body", "layout", "width"], msg}.
function fastapiProblem(item) {
  const loc = (item.loc || []).filter((p) => p !== "body");
  const field = loc.reduce((acc, p) => (typeof p === "number" ? `${acc}[${p}]` : acc ? `${acc}.${p}` : `${p}`), "");
  return { field, message: item.msg || String(item) };
}

/** JSON request; resolves to the parsed body, rejects with ApiError. */
export async function api(method, path, body) {
  const init = { method, headers: new Headers(), credentials: "same-origin" };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = stringifyJSON(body);
  }
  let response;
  try {
    response = await fetch(apiUrl(path), init);
  } catch (err) {
    throw new ApiError(0, `the service cannot be reached (${err.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") || "";
  const text = await response.text();
  return type.includes("json") ? parseJSON(text) : text;
}

export const upload = (file, kind) => {
  const form = new FormData();
  form.append("kind", kind);
  form.append("file", file, file.name || `${kind}.png`);
  return api("POST", "uploads", form);
};

export const uploadLora = (file) => {
  const form = new FormData();
  form.append("file", file, file.name || "lora.safetensors");
  return api("POST", "loras", form);
};

const blobs = new Map(); // url -> Promise<object URL>; output files never change once written

/** An object URL for a file of the service (job output or upload); cached per URL. */
export function blobUrl(url) {
  if (!blobs.has(url)) {
    const promise = fetch(apiUrl(url), { credentials: "same-origin" }).then(async (response) => {
      if (!response.ok) throw await errorOf(response);
      return URL.createObjectURL(await response.blob());
    });
    promise.catch(() => blobs.delete(url));
    blobs.set(url, promise);
  }
  return blobs.get(url);
}

/** Save a file of the service under `name` (the bytes as served: PNG metadata included). */
export async function download(url, name) {
  saveHref(await blobUrl(url), name);
}

function saveHref(href, name) {
  const a = document.createElement("a");
  a.href = href;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
}

export function saveText(text, name, type = "application/json") {
  const href = URL.createObjectURL(new Blob([text], { type }));
  saveHref(href, name);
  setTimeout(() => URL.revokeObjectURL(href), 1000);
}

/**
 * The event stream: calls onEvent(message) for each JSON message and onState("open"|"closed"|"signed-out").
 * Reconnects with a growing delay; every (re)connect starts with a snapshot from the service.
 * The socket is authenticated by the page's session cookie (same origin).
 */
export function connectEvents(onEvent, onState) {
  let delay = 500;
  let socket = null;
  const open = () => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}${BASE}/events`);
    socket.onopen = () => { delay = 500; onState("open"); };
    socket.onmessage = (e) => {
      let message;
      try { message = parseJSON(e.data); } catch (_) { return; }
      onEvent(message);
    };
    socket.onclose = (e) => {
      if (e.code === 4401) { onState("signed-out"); onSignedOut(); return; }
      onState("closed");
      setTimeout(open, delay);
      delay = Math.min(delay * 2, 10000);
    };
  };
  open();
  return { get open() { return socket && socket.readyState === WebSocket.OPEN; } };
}
