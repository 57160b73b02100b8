// The gateway's HTTP API as the UI uses it. The API key lives in sessionStorage (this tab
// only) and travels in the Authorization header, never in a URL.

const KEY = "forgeline.apiKey";
const WHO = "forgeline.whoami";

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  get who() {
    try { return JSON.parse(sessionStorage.getItem(WHO) || "null"); } catch { return null; }
  },
  set(key, who) {
    sessionStorage.setItem(KEY, key);
    sessionStorage.setItem(WHO, JSON.stringify(who));
  },
  clear() {
    sessionStorage.removeItem(KEY);
    sessionStorage.removeItem(WHO);
  },
};

export class ApiError extends Error {
  constructor(status, code, message, details = []) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

// Called when a stored key stops working (revoked, or the data dir was reset).
let unauthorized = () => {};
export function onUnauthorized(fn) { unauthorized = fn; }

async function errorOf(resp) {
  let err = {};
  try { err = (await resp.json()).error || {}; } catch { /* not JSON */ }
  return new ApiError(resp.status, err.code || `http_${resp.status}`,
    err.message || resp.statusText || `HTTP ${resp.status}`, err.details || []);
}

function headersFor(key, extra = {}) {
  const headers = { ...extra };
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

// fetch() of a /v1 path: JSON (or text) back, or an ApiError with the contract's error body.
// `key` checks a key that is not stored yet (login); a 401 then does not log out.
export async function api(path, { method = "GET", body, signal, key, text = false } = {}) {
  const extra = body === undefined ? {} : { "Content-Type": "application/json" };
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers: headersFor(key ?? session.key, extra),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
      credentials: "omit",
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "network", "Cannot reach the Forgeline gateway; is `forgeline up` running?");
  }
  if (!resp.ok) {
    const error = await errorOf(resp);
    if (resp.status === 401 && key === undefined) unauthorized(error);
    throw error;
  }
  if (text) return resp.text();
  if (resp.status === 204) return null;
  return resp.json();
}

// Server-sent events over fetch(): EventSource cannot send an Authorization header, so the
// text/event-stream is read and parsed here. Yields {event, data} (data parsed as JSON).
export async function* eventStream(path, { signal } = {}) {
  let resp;
  try {
    resp = await fetch(path, {
      headers: headersFor(session.key, { Accept: "text/event-stream" }),
      signal,
      cache: "no-store",
      credentials: "omit",
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "network", "Cannot reach the Forgeline gateway");
  }
  if (!resp.ok) {
    const error = await errorOf(resp);
    if (resp.status === 401) unauthorized(error);
    throw error;
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "message";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (data.length) {
            const raw = data.join("\n");
            let parsed;
            try { parsed = JSON.parse(raw); } catch { parsed = raw; }
            yield { event, data: parsed };
          }
          event = "message";
          data = [];
        } else if (line.startsWith(":")) {
          // a comment (keep-alive)
        } else {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "event") event = val;
          else if (field === "data") data.push(val);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
