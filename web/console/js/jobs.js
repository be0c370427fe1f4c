// Jobs: the caller's jobs (GET /v1/jobs, newest first, cursor pagination) and one job's
// page: its facts, result or error, its events (live while it runs), cancel.

import { call, events, page } from "./api.js";
import { $, el, ms, repeat, status, usageOf, when } from "./ui.js";

let lastId = null;
// Older pages were appended: the periodic refresh of the first page stops replacing them.
let expanded = false;

function tokens(job) {
  const u = usageOf(job.result);
  return u ? `${u.prompt} + ${u.completion}` : "–";
}

function row(job) {
  const link = el("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id);
  return el("tr", { "data-job-id": job.id },
    el("td", {}, link), el("td", {}, status(job.status)), el("td", {}, job.model),
    el("td", {}, when(job.created_at)), el("td", {}, ms(job.queue_wait_ms)),
    el("td", {}, ms(job.run_time_ms)), el("td", {}, tokens(job)));
}

async function loadPage(after) {
  const found = await page("/v1/jobs", { after, limit: 25 });
  const rows = $("#jobs-rows");
  if (!after) rows.replaceChildren();
  rows.append(...found.data.map(row));
  lastId = found.last_id;
  $("#jobs-more").hidden = !found.has_more;
}

export function showList() {
  // Refreshed while shown: running jobs move on. Only the first page; "Older jobs" appends.
  expanded = false;
  return repeat(() => (expanded ? null : loadPage(null)), 3000);
}

export function init() {
  $("#jobs-refresh").addEventListener("click", () => loadPage(null));
  $("#jobs-more").addEventListener("click", () => { expanded = true; loadPage(lastId); });
}

// -- one job ---------------------------------------------------------------------------------

function outputOf(job) {
  const r = job.result;
  if (!r) return job.result_omitted || "";
  if (r.choices) {
    return r.choices.map((c) => (c.message ? c.message.content || JSON.stringify(c.message.tool_calls || "") : c.text)).join("\n---\n");
  }
  return JSON.stringify(r, null, 2);
}

function render(job) {
  $("#job-id").textContent = job.id;
  $("#job-status").replaceChildren(status(job.status));
  $("#job-cancel").hidden = job.status !== "queued" && job.status !== "in_progress";
  const waited = job.queue_wait_ms ?? (job.status === "queued"
    ? Math.max(0, Date.now() - job.created_at * 1000) : null);
  const facts = [
    ["Model", job.model], ["Endpoint", job.endpoint], ["Created", when(job.created_at)],
    ["Queue wait", ms(waited)], ["Run time", ms(job.run_time_ms)],
    ["Queue position", job.queue_position ?? "–"], ["Tokens (prompt + completion)", tokens(job)],
  ];
  $("#job-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  if (job.result || job.result_omitted) $("#job-output").textContent = outputOf(job);
  const err = job.error;
  $("#job-error-title").hidden = $("#job-error").hidden = !err;
  $("#job-error").textContent = err ? `${err.code || err.type}: ${err.message}` : "";
}

// Follows the job's events (replay, then live) until it ends or the page is left.
async function follow(jobId, signal, onEnd) {
  const list = $("#job-events");
  list.replaceChildren();
  let text = "";
  try {
    const resp = await call(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { signal, raw: true });
    for await (const ev of events(resp)) {
      const d = ev.data || {};
      if (ev.event === "delta") {
        text += d.text || "";
        if (!d.prompt) $("#job-output").textContent = text;
      }
      const line = ev.event === "delta" ? JSON.stringify(d.text) : JSON.stringify(d);
      list.append(el("li", {}, el("b", {}, `${ev.id ?? ""} ${ev.event}`), " ", line.slice(0, 300)));
      if (list.children.length > 500) list.firstChild.remove();
      if (ev.event === "done" || ev.event === "failed") break;
    }
  } catch (err) {
    if (!signal.aborted) list.append(el("li", { class: "error" }, err.message));
  }
  if (!signal.aborted) onEnd();
}

export function showJob(jobId) {
  const controller = new AbortController();
  const refresh = async () => render(await call(`/v1/jobs/${encodeURIComponent(jobId)}`));
  $("#job-output").textContent = "";
  $("#job-cancel").onclick = async () => {
    $("#job-cancel").disabled = true;
    try { render(await call(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" })); }
    finally { $("#job-cancel").disabled = false; }
  };
  refresh().then(() => follow(jobId, controller.signal, refresh)).catch((err) => {
    $("#job-facts").replaceChildren(el("dd", { class: "error" }, err.message));
  });
  // The queue wait of a queued job grows; its status moves.
  const stopTicking = repeat(() => ($("#job-status").textContent === "queued" ? refresh() : null), 2000);
  return () => { controller.abort(); stopTicking(); };
}
