// The console's pages, by the URL's hash: #/playground, #/jobs, #/jobs/<id>, #/batches,
// #/workers. Asks for an API key when the server answers 401 (keys on), keeps it in
// session storage.

import { ApiError, call, key, whenUnauthorized } from "./api.js";
import * as batches from "./batches.js";
import * as jobs from "./jobs.js";
import * as playground from "./playground.js";
import { $ } from "./ui.js";
import * as workers from "./workers.js";

let leave = null;  // stops the shown page's refreshes

// Resolves once the user gave a key (the next request uses it).
let asking = null;
function askForKey(err) {
  if (asking) return asking;
  const dialog = $("#key-dialog");
  const had = key.get();
  key.clear();
  const msg = $("#key-error");
  msg.hidden = !had;
  msg.textContent = had && err ? err.message : "";
  asking = new Promise((resolve) => {
    $("#key-form").onsubmit = (e) => {
      e.preventDefault();
      key.set($("#key-input").value.trim());
      $("#key-input").value = "";
      dialog.close();
      asking = null;
      updateWho();
      resolve();
    };
  });
  if (!dialog.open) dialog.showModal();
  return asking;
}

function updateWho() {
  const k = key.get();
  $("#who").textContent = k ? `key …${k.slice(-4)}` : "";
  $("#forget-key").hidden = !k;
}

function route() {
  if (leave) leave();
  leave = null;
  const [, name = "playground", id] = location.hash.match(/^#\/([a-z]+)(?:\/(.+))?/) || [];
  const pageName = name === "jobs" && id ? "job" : name;
  for (const section of document.querySelectorAll(".page")) {
    section.hidden = section.id !== `page-${pageName}`;
  }
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.page === name);
  }
  if (pageName === "playground") playground.loadModels().catch(console.warn);
  else if (pageName === "jobs") leave = jobs.showList();
  else if (pageName === "job") leave = jobs.showJob(decodeURIComponent(id));
  else if (pageName === "batches") leave = batches.show();
  else if (pageName === "workers") leave = workers.show();
}

async function start() {
  whenUnauthorized(askForKey);
  $("#forget-key").addEventListener("click", () => { key.clear(); updateWho(); askForKey(); });
  updateWho();
  playground.init();
  jobs.init();
  batches.init();
  // One cheap call decides whether a key is needed: /v1/models answers 401 when keys are on.
  try {
    await call("/v1/models");
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
  }
  window.addEventListener("hashchange", route);
  route();
  document.body.dataset.ready = "1";
}

start();
