// Talking to the threedis service: bearer-token fetches, the 422 problem format, authorised
// image blobs (an <img src> cannot carry an Authorization header) and the event WebSocket.

const meta = (name) => {
  const tag = document.querySelector(`meta[name="${name}"]`);
  return tag ? tag.getAttribute("content") || "" : "";
};

export const TOKEN = meta("threedis-token");
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

function headers(extra) {
  const h = new Headers(extra || {});
  if (TOKEN) h.set("Authorization", `Bearer ${TOKEN}`);
  return h;
}

export function apiUrl(path) {
  return path.startsWith("/") ? path : `${BASE}/${path}`;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let problems = [];
  try {
    const body = await response.json();
    const detail = body && body.detail;
    if (typeof detail === "string") message = detail;
    else if (detail && typeof detail === "object") {
      if (detail.message) message = detail.message;
      if (Array.isArray(detail.problems)) problems = detail.problems;
      else if (Array.isArray(detail)) problems = detail.map(fastapiProblem);
    } else if (Array.isArray(detail)) {
      problems = detail.map(fastapiProblem);
      message = problems.map((p) => `${p.field}: ${p.message}`).join("; ");
    }
  } catch (_) { /* not JSON: keep the status line */ }
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
  const init = { method, headers: headers() };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(body);
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
  return type.includes("json") ? response.json() : response.text();
}

export const upload = (file, kind) => {
  const form = new FormData();
  form.append("kind", kind);
  form.append("file", file, file.name || `${kind}.png`);
  return api("POST", "uploads", form);
};

const blobs = new Map(); // url -> Promise<object URL>; output files never change once written

/** An object URL for an authorised file (job output or upload); cached per URL. */
export function blobUrl(url) {
  if (!blobs.has(url)) {
    const promise = fetch(apiUrl(url), { headers: headers() }).then(async (response) => {
      if (!response.ok) throw await errorOf(response);
      return URL.createObjectURL(await response.blob());
    });
    promise.catch(() => blobs.delete(url));
    blobs.set(url, promise);
  }
  return blobs.get(url);
}

/** Save an authorised file under `name` (the bytes as served: PNG metadata included). */
export async function download(url, name) {
  const href = await blobUrl(url);
  const a = document.createElement("a");
  a.href = href;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
}

export function saveText(text, name, type = "application/json") {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], { type }));
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

/**
 * The event stream: calls onEvent(message) for each JSON message and onState("open"|"closed").
 * Reconnects with a growing delay; every (re)connect starts with a snapshot from the service.
 */
export function connectEvents(onEvent, onState) {
  let delay = 500;
  let socket = null;
  const open = () => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const query = TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : "";
    socket = new WebSocket(`${scheme}://${location.host}${BASE}/events${query}`);
    socket.onopen = () => { delay = 500; onState("open"); };
    socket.onmessage = (e) => {
      let message;
      try { message = JSON.parse(e.data); } catch (_) { return; }
      onEvent(message);
    };
    socket.onclose = () => {
      onState("closed");
      setTimeout(open, delay);
      delay = Math.min(delay * 2, 10000);
    };
  };
  open();
  return { get open() { return socket && socket.readyState === WebSocket.OPEN; } };
}
