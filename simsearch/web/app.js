// The simsearch page: search by item id (suggested as one types), by a random item or by an uploaded
// image; each result is a link that searches from it, and the URL (?item=ID&k=K) holds the query.
"use strict";
const $ = (id) => document.getElementById(id);
const DEFAULT_K = "10";
let health = null;
let uploadUrl = null; // the blob: URL of the uploaded query shown (needs img-src blob: under a CSP)
let latest = 0; // the number of the latest request: an older answer arriving late is dropped

function status(text, kind = "") {
  $("status").textContent = text;
  $("status").className = kind;
}

function busy(on) {
  document.body.classList.toggle("busy", on);
  document.body.setAttribute("aria-busy", on ? "true" : "false");
  for (const id of ["file", "random", "item-search"]) $(id).disabled = on;
}

async function call(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch { body = null; }
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function clearResults() {
  $("query").hidden = true;
  $("query-image").removeAttribute("src");
  $("query-caption").textContent = "";
  $("results").replaceChildren();
}

function fail(error) {
  clearResults(); // the results of an earlier query must not stand as the answer to this one
  status(error.message, "error");
}

function permalink(id, k) {
  const params = new URLSearchParams({ item: id });
  if (k !== DEFAULT_K) params.set("k", k);
  const filter = $("filter").value.trim();
  if (filter) params.set("filter", filter);
  return `?${params}`;
}

function filterParam() {
  const filter = $("filter").value.trim();
  return filter ? `&filter=${encodeURIComponent(filter)}` : "";
}

function resultTile(r, k) {
  const tile = document.createElement("a");
  tile.className = "result" + (r.relevant === true ? " relevant" : r.relevant === false ? " irrelevant" : "");
  tile.href = permalink(r.id, k);
  tile.dataset.id = r.id;
  tile.title = `search from ${r.id}`;
  const img = document.createElement("img");
  img.src = r.image;
  img.alt = r.id;
  img.loading = "lazy";
  const caption = document.createElement("div");
  caption.className = "caption";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = `#${r.rank} ${r.score.toFixed(3)}`;
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = r.label ?? "";
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = r.path && r.path !== r.id ? `${r.id} · ${r.path}` : r.id;
  caption.append(score, " ", label, meta);
  if (r.metadata) {
    const values = document.createElement("div");
    values.className = "meta metadata";
    values.textContent = Object.entries(r.metadata).filter(([, v]) => v !== null).map(([n, v]) => `${n}: ${v}`).join(" · ");
    caption.append(values);
  }
  tile.append(img, caption);
  tile.addEventListener("click", (event) => {
    if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return; // a new tab
    event.preventDefault();
    searchItem(r.id);
  });
  return tile;
}

function show(body, queryImage, caption, k) {
  $("query").hidden = false;
  $("query-image").src = queryImage;
  let text = caption;
  if (body.precision !== undefined) text += ` · Precision@${body.results.length}: ${body.precision.toFixed(2)}`;
  $("query-caption").textContent = text;
  $("results").replaceChildren(...body.results.map((r) => resultTile(r, k)));
  status(body.results.length ? `${body.results.length} results` : "no item matches the filter");
}

async function searchItem(id, { push = true } = {}) {
  const request = ++latest;
  const k = $("k").value;
  busy(true);
  status(`searching from ${id}...`);
  try {
    const body = await call(`/search?item=${encodeURIComponent(id)}&k=${encodeURIComponent(k)}${filterParam()}`);
    if (request !== latest) return;
    const found = String(body.query.id);
    show(body, `/items/${encodeURIComponent(found)}/image`, `${found} (${body.query.label ?? "no label"})`, k);
    $("item").value = found;
    const url = permalink(found, k);
    if (push && location.search !== url) history.pushState({ item: found, k }, "", url);
    document.title = `simsearch: ${found}`;
  } catch (error) {
    if (request !== latest) return;
    fail(error);
    // the address names what was asked, refused or not: a bad filter never stands beside an earlier good one
    const url = permalink(id, k);
    if (push && location.search !== url) history.pushState({ item: id, k }, "", url);
  } finally {
    if (request === latest) busy(false);
  }
}

async function searchFile(file) {
  const request = ++latest;
  busy(true);
  status(`embedding ${file.name} and searching...`);
  const form = new FormData();
  form.append("file", file);
  form.append("k", $("k").value);
  if ($("filter").value.trim()) form.append("filter", $("filter").value.trim());
  try {
    const body = await call("/search", { method: "POST", body: form });
    if (request !== latest) return;
    if (uploadUrl) URL.revokeObjectURL(uploadUrl); // the previous upload's picture is no longer shown
    uploadUrl = URL.createObjectURL(file);
    show(body, uploadUrl, `uploaded: ${file.name}`, $("k").value);
    forgetItemQuery();
  } catch (error) {
    if (request !== latest) return;
    fail(new Error(`${file.name}: ${error.message}`));
    forgetItemQuery();
  } finally {
    if (request === latest) busy(false);
    $("file").value = ""; // choosing the same file again searches again
  }
}

function forgetItemQuery() {
  // the query is now an upload, which no address can hold: the address and the id box no longer name an item
  $("item").value = "";
  if (location.search) history.pushState({}, "", location.pathname);
  document.title = "simsearch";
}

let suggesting = 0;
async function suggest() {
  const request = ++suggesting;
  const prefix = $("item").value;
  try {
    const body = await call(`/items?prefix=${encodeURIComponent(prefix)}&limit=20`);
    if (request !== suggesting) return;
    $("item-ids").replaceChildren(...body.ids.map((id) => Object.assign(document.createElement("option"), { value: id })));
  } catch { /* suggestions are a help, never an error */ }
}

function fromUrl() {
  const params = new URLSearchParams(location.search);
  const item = params.get("item");
  if (params.get("k")) $("k").value = params.get("k");
  $("filter").value = params.get("filter") ?? "";
  if (item !== null) searchItem(item, { push: false });
  else { latest++; clearResults(); status(""); busy(false); }
}

document.addEventListener("DOMContentLoaded", () => {
  let timer = null;
  $("item").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(suggest, 120); });
  $("item-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("item").value.trim();
    if (id) searchItem(id);
    else status("type an item id, pick a random item or upload an image", "error");
  });
  $("file").addEventListener("change", (event) => { if (event.target.files.length) searchFile(event.target.files[0]); });
  $("random").addEventListener("click", () => { if (health) searchItem(String(Math.floor(Math.random() * health.items))); });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) searchFile(event.dataTransfer.files[0]);
  });
  window.addEventListener("popstate", fromUrl);

  call("/health").then((body) => {
    health = body;
    $("k").max = body.max_k;
    $("info").textContent = `${body.items} items · ${body.model} (${body.weights}${body.checkpoint ? ", fine-tuned" : ""})`
      + ` · ${body.index} · ${body.device}`;
    suggest();
  }).catch((error) => status(error.message, "error"));
  fromUrl();
});
