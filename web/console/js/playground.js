// The playground: a streamed chat with one model. Stop aborts the stream and cancels its
// job (the stream's X-Request-Id header is the job id; Ferry also cancels a job whose
// client goes away, the explicit cancel makes it immediate and returns the partial usage).

import { call, events } from "./api.js";
import { $, el, showError, usageOf } from "./ui.js";

const history = [];  // {role, content} of this chat
let running = null;  // {controller, jobId}

export async function loadModels() {
  const [models, workers] = await Promise.all([
    call("/v1/models"), call("/v1/workers").catch(() => null)]);
  const kinds = new Map((workers ? workers.data : []).map((m) => [m.model, m]));
  const select = $("#pg-model");
  const current = select.value;
  select.replaceChildren();
  for (const m of models.data) {
    const load = kinds.get(m.id);
    if (load && load.kind !== "chat") continue;
    const n = load ? load.workers.length : null;
    const label = n === null ? m.id : `${m.id} (${n} worker${n === 1 ? "" : "s"})`;
    select.append(el("option", { value: m.id }, label));
  }
  // A served model first: the first with a live worker.
  const served = [...select.options].find((o) => (kinds.get(o.value)?.workers.length || 0) > 0);
  select.value = current && [...select.options].some((o) => o.value === current)
    ? current : (served ? served.value : select.options[0]?.value || "");
}

function request(messages) {
  const body = {
    model: $("#pg-model").value, messages, stream: true,
    stream_options: { include_usage: true },
  };
  const temperature = parseFloat($("#pg-temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("#pg-max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  if ($("#pg-json").checked) body.response_format = { type: "json_object" };
  return body;
}

function bubble(role, text = "") {
  const content = el("div", { class: "content" }, text);
  const stats = el("div", { class: "stats" });
  const item = el("li", { class: `msg ${role}` }, el("div", { class: "role" }, role), content, stats);
  $("#pg-messages").append(item);
  item.scrollIntoView({ block: "end" });
  return { item, content, stats };
}

function showStats(node, { jobId, usage, ttft, tps, stopped }) {
  node.replaceChildren(
    jobId ? el("a", { href: `#/jobs/${encodeURIComponent(jobId)}`, class: "job-link" }, jobId) : "",
    usage ? ` · ${usage.prompt} prompt + ${usage.completion} completion tokens` : "",
    ttft !== null ? ` · TTFT ${ttft.toFixed(0)} ms` : "",
    tps !== null ? ` · ${tps.toFixed(1)} tok/s` : "",
    stopped ? " · stopped" : "");
}

async function send(text) {
  showError($("#pg-error"), null);
  const system = $("#pg-system").value.trim();
  history.push({ role: "user", content: text });
  bubble("user", text);
  const messages = system ? [{ role: "system", content: system }, ...history] : [...history];
  const reply = bubble("assistant");
  reply.item.classList.add("streaming");
  const controller = new AbortController();
  running = { controller, jobId: null, stopped: false };
  setBusy(true);
  const t0 = performance.now();
  let first = null, last = null, chunks = 0, usage = null, out = "";
  try {
    const resp = await call("/v1/chat/completions",
      { method: "POST", body: request(messages), signal: controller.signal, raw: true });
    running.jobId = resp.headers.get("X-Request-Id");
    reply.item.dataset.jobId = running.jobId || "";
    for await (const ev of events(resp)) {
      const d = ev.data;
      if (d && d.error) throw new Error(d.error.message);
      if (!d || typeof d !== "object") continue;
      if (!running.jobId && d.id) running.jobId = d.id;
      if (d.usage) usage = { prompt: d.usage.prompt_tokens, completion: d.usage.completion_tokens };
      const delta = d.choices && d.choices[0] && d.choices[0].delta;
      if (delta && delta.content) {
        const now = performance.now();
        if (first === null) first = now;
        last = now;
        chunks += 1;
        out += delta.content;
        reply.content.textContent = out;
      }
    }
  } catch (err) {
    if (!running.stopped) showError($("#pg-error"), err);
  } finally {
    reply.item.classList.remove("streaming");
    const { jobId, stopped } = running;
    if (stopped && jobId) usage = (await cancelled(jobId)) || usage;
    // Tokens after the first, over the time they took to arrive. A stopped reply's usage
    // counts tokens made after the stop that never reached the page: its rate is the
    // received chunks'.
    const received = usage && !stopped ? usage.completion : chunks;
    const tps = first !== null && last > first ? ((received - 1) * 1000) / (last - first) : null;
    showStats(reply.stats, {
      jobId, usage, ttft: first === null ? null : first - t0, tps, stopped,
    });
    reply.item.dataset.jobId = jobId || "";
    if (out) history.push({ role: "assistant", content: out });
    running = null;
    setBusy(false);
  }
}

// The job's usage once its cancel is through (its partial result keeps it).
async function cancelled(jobId) {
  try {
    const job = await call(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
    return usageOf(job.result);
  } catch {
    return null;
  }
}

function stop() {
  if (!running) return;
  running.stopped = true;
  running.controller.abort();
}

function setBusy(busy) {
  $("#pg-send").disabled = busy;
  $("#pg-stop").disabled = !busy;
}

export function init() {
  $("#pg-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("#pg-input").value.trim();
    if (!text || running) return;
    $("#pg-input").value = "";
    send(text);
  });
  $("#pg-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("#pg-form").requestSubmit();
    }
  });
  $("#pg-stop").addEventListener("click", stop);
  $("#pg-clear").addEventListener("click", () => {
    stop();
    history.length = 0;
    $("#pg-messages").replaceChildren();
  });
}
