// Small DOM helpers shared by the pages.

export const $ = (sel) => document.querySelector(sel);

// An element: el("td", {class: "x"}, "text", child...). Text is always text, never HTML.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

export function showError(node, err) {
  node.hidden = !err;
  node.textContent = err ? (err.message || String(err)) : "";
}

export function ms(value) {
  if (value === null || value === undefined) return "–";
  return value < 1000 ? `${value} ms` : `${(value / 1000).toFixed(2)} s`;
}

export function when(unix) {
  return unix ? new Date(unix * 1000).toLocaleTimeString() : "–";
}

export function status(s) {
  return el("span", { class: `status ${s}` }, s);
}

// The usage of a job's result (chat, completions, responses, embeddings), or null.
export function usageOf(result) {
  const u = result && result.usage;
  if (!u) return null;
  const prompt = u.prompt_tokens ?? u.input_tokens ?? 0;
  const completion = u.completion_tokens ?? u.output_tokens ?? 0;
  return { prompt, completion };
}

// Runs fn now and every `every` ms until the returned function is called. Each run is a
// request of the caller's key (it counts against its rpm): after a failure (a 429 among
// them) the next run waits twice as long, up to 30 s.
export function repeat(fn, every) {
  let timer = null, stopped = false, delay = every;
  const tick = async () => {
    try { await fn(); delay = every; } catch (e) {
      console.warn(e);
      delay = Math.min(30000, delay * 2);
    }
    if (!stopped) timer = setTimeout(tick, delay);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}
