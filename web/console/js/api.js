// The /v1 API as the console calls it: the key (session storage, this tab only), JSON calls,
// and server-sent events read from a fetch body (EventSource cannot send a header).

const KEY = "ferry.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
  }
}

export const key = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

// Called on a 401: asks for a key, resolves once a new one is stored (main.js sets it).
let onUnauthorized = async () => { throw new Error("no key"); };
export function whenUnauthorized(fn) { onUnauthorized = fn; }

function headers(extra = {}) {
  const h = { ...extra };
  const k = key.get();
  if (k) h.Authorization = `Bearer ${k}`;
  return h;
}

// fetch with the key; a 401 asks for a key and tries once more with it.
export async function call(path, { method = "GET", body, form, signal, raw = false } = {}) {
  for (let attempt = 0; ; attempt++) {
    const init = { method, signal, headers: headers() };
    if (form) init.body = form;
    else if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const resp = await fetch(path, init);
    if (resp.status === 401 && attempt === 0) {
      await onUnauthorized(await errorOf(resp));
      continue;
    }
    if (!resp.ok) throw new ApiError(resp.status, await bodyOf(resp));
    return raw ? resp : resp.json();
  }
}

async function bodyOf(resp) {
  try { return await resp.json(); } catch { return null; }
}

async function errorOf(resp) {
  return new ApiError(resp.status, await bodyOf(resp));
}

// The events of a text/event-stream body: {id, event, data} with data parsed when JSON.
export async function* events(resp) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let end;
    while ((end = buf.search(/\r?\n\r?\n/)) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end).replace(/^\r?\n\r?\n/, "");
      const ev = { id: null, event: "message", data: "" };
      for (const line of block.split(/\r?\n/)) {
        const i = line.indexOf(":");
        if (i === 0) continue;  // a comment (keep-alive)
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "data") ev.data += (ev.data ? "\n" : "") + val;
        else if (field === "id" || field === "event") ev[field] = val;
      }
      if (ev.data !== "" && ev.data !== "[DONE]") {
        try { ev.data = JSON.parse(ev.data); } catch { /* kept as text */ }
      }
      yield ev;
    }
  }
}

// A page of a list endpoint, OpenAI's shape.
export function page(path, { after, limit = 20 } = {}) {
  const q = new URLSearchParams({ limit: String(limit) });
  if (after) q.set("after", after);
  return call(`${path}?${q}`);
}
