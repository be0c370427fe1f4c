// Workers and queues: per model, its live workers (from their heartbeats) and their load,
// queued and in-flight jobs, and tokens per second over the last minute, drawn on a canvas.
// GET /v1/workers, every 2 s while shown.

import { call } from "./api.js";
import { $, el, repeat } from "./ui.js";

// Bars of tokens per second, oldest left; the scale is the window's peak.
export function drawChart(canvas, tokens) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300, h = canvas.clientHeight || 80;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.fillStyle = "#f6f8fa";
  g.fillRect(0, 0, w, h);
  const peak = Math.max(1, ...tokens);
  const bw = w / tokens.length;
  g.fillStyle = "#2f6fde";
  tokens.forEach((t, i) => {
    const bh = (t / peak) * (h - 14);
    g.fillRect(i * bw + 0.5, h - bh, Math.max(1, bw - 1), bh);
  });
  g.fillStyle = "#555";
  g.font = "11px sans-serif";
  g.fillText(tokens.some((t) => t > 0) ? `peak ${peak} tok/s` : "no tokens this minute", 4, 11);
  g.textAlign = "right";
  g.fillText(`${tokens.length} s`, w - 4, 11);
}

function card(m) {
  const workers = m.workers.length
    ? el("ul", { class: "workers" }, m.workers.map((w) => el("li", {},
      el("code", {}, w.name), ` ${w.active} / ${w.slots} busy`)))
    : el("p", { class: "error" }, "no live worker");
  const canvas = el("canvas", { class: "chart", "aria-label": `tokens per second of ${m.model}` });
  const node = el("article", { class: "card", "data-model": m.model },
    el("h3", {}, m.model, el("span", { class: "muted" }, ` ${m.kind}`)),
    el("dl", { class: "facts" },
      el("dt", {}, "Workers"), el("dd", { class: "n-workers" }, m.workers.length),
      el("dt", {}, "Queued"), el("dd", { class: "queued" }, m.queued),
      el("dt", {}, "Running"), el("dd", {}, m.running),
      el("dt", {}, "In flight"), el("dd", {}, m.in_flight),
      el("dt", {}, "Tokens/s (1 min)"), el("dd", { class: "tps" }, m.tokens_per_second)),
    workers, canvas);
  return { node, canvas };
}

async function refresh() {
  const found = await call("/v1/workers");
  const cards = found.data.map(card);
  $("#workers-models").replaceChildren(...cards.map((c) => c.node));
  cards.forEach((c, i) => drawChart(c.canvas, found.data[i].tokens));
  $("#workers-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

export function show() {
  return repeat(refresh, 2000);
}
