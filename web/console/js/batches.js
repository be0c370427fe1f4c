// Batches: upload a JSONL file (purpose "batch"), create a batch on it, watch its
// request_counts, download its output and error files, cancel it.

import { call, page } from "./api.js";
import { $, el, showError, status, when } from "./ui.js";

const ACTIVE = new Set(["validating", "in_progress", "finalizing", "cancelling"]);

// A file's content, fetched with the key (a plain link could not send it), saved as a download.
async function download(fileId, name) {
  const resp = await call(`/v1/files/${encodeURIComponent(fileId)}/content`, { raw: true });
  const url = URL.createObjectURL(await resp.blob());
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function actions(b) {
  const out = [];
  if (b.output_file_id) {
    out.push(el("button", { type: "button", class: "download-output",
      onclick: () => download(b.output_file_id, `${b.id}-output.jsonl`) }, "Output"));
  }
  if (b.error_file_id) {
    out.push(el("button", { type: "button", class: "download-errors",
      onclick: () => download(b.error_file_id, `${b.id}-errors.jsonl`) }, "Errors"));
  }
  if (b.status === "validating" || b.status === "in_progress") {
    out.push(el("button", { type: "button", class: "cancel", onclick: async (e) => {
      e.target.disabled = true;
      try { await call(`/v1/batches/${b.id}/cancel`, { method: "POST" }); await refresh(); }
      catch (err) { showError($("#batch-error"), err); }
    } }, "Cancel"));
  }
  return out;
}

function row(b) {
  const c = b.request_counts || {};
  const errs = b.errors && b.errors.data ? b.errors.data.map((e) => e.message).join("; ") : "";
  return el("tr", { "data-batch-id": b.id, "data-status": b.status },
    el("td", {}, el("code", {}, b.id)), el("td", {}, status(b.status), errs ? el("div", { class: "error" }, errs) : ""),
    el("td", {}, b.endpoint), el("td", {}, when(b.created_at)),
    el("td", { class: "counts" }, `${c.completed ?? 0} / ${c.failed ?? 0} / ${c.total ?? 0}`),
    el("td", {}, actions(b)));
}

let shown = [];

async function refresh() {
  const found = await page("/v1/batches", { limit: 20 });
  shown = found.data;
  $("#batch-rows").replaceChildren(...shown.map(row));
}

async function create(e) {
  e.preventDefault();
  showError($("#batch-error"), null);
  const file = $("#batch-file").files[0];
  if (!file) return;
  $("#batch-create").disabled = true;
  try {
    const form = new FormData();
    form.append("purpose", "batch");
    form.append("file", file, file.name);
    const uploaded = await call("/v1/files", { method: "POST", form });
    await call("/v1/batches", { method: "POST", body: {
      input_file_id: uploaded.id, endpoint: $("#batch-endpoint").value, completion_window: "24h",
    } });
    $("#batch-form").reset();
    await refresh();
  } catch (err) {
    showError($("#batch-error"), err);
  } finally {
    $("#batch-create").disabled = false;
  }
}

export function show() {
  // Faster while a batch is moving.
  let stopped = false, timer = null;
  const tick = async () => {
    try { await refresh(); } catch (err) { showError($("#batch-error"), err); }
    if (!stopped) timer = setTimeout(tick, shown.some((b) => ACTIVE.has(b.status)) ? 1000 : 5000);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

export function init() {
  $("#batch-form").addEventListener("submit", create);
}
