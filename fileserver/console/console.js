// ota-server web console: plain JS, no build step. Reads the admin JSON API with the
// browser's login (GET only) and polls it every 2 s; actions are POSTs that carry the admin
// token typed into the header (the browser login alone cannot make them: no CSRF).
// Everything a device sent is put in the page as text, never as HTML.
"use strict";

const STATES = ["succeeded", "failed", "in_progress", "installed", "notified", "queued", "canceled", "waiting_report"];
const PAGE = 50;
const POLL_MS = 2000;
let timer = null;
let generation = 0; // a newer render makes older fetches' results void

// The server's Content-Security-Policy allows no inline scripts or style attributes: styles
// come from console.css, and the few computed ones are set through node.style.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// From the origin: a page opened as http://user:token@host/ must not fetch URLs with credentials.
const url = path => new URL(path, location.origin).href;

async function api(path) {
  const response = await fetch(url(path), {credentials: "same-origin", headers: {Accept: "application/json"}});
  if (!response.ok) throw new Error(`${path}: ${response.status} ${(await response.text()).slice(0, 200)}`);
  return response.json();
}

async function act(path, body) {
  const token = document.getElementById("token").value.trim() || sessionStorage.getItem("otaToken") || "";
  if (!token) { alert("Type the admin token (data_dir/admin-token) in the box at the top right first."); return null; }
  sessionStorage.setItem("otaToken", token);
  const response = await fetch(url(path), {method: "POST", credentials: "omit",
    headers: {Authorization: `Bearer ${token}`, "Content-Type": "application/json"},
    body: body ? JSON.stringify(body) : undefined});
  const reply = await response.json().catch(() => ({}));
  if (!response.ok) { alert(reply.message || `${response.status}`); return null; }
  refresh();
  return reply;
}

function time(epoch) {
  if (!epoch) return "-";
  const date = new Date(epoch * 1000);
  return date.toLocaleString();
}

function bar(counts, total) {
  const node = el("div", {class: "bar", title: STATES.filter(s => counts[s]).map(s => `${s} ${counts[s]}`).join(", ")});
  if (!total) return node;
  for (const state of STATES) {
    if (!counts[state]) continue;
    const part = el("span", {class: `s-${state}`});
    part.style.width = `${100 * counts[state] / total}%`; // through CSSOM: the CSP refuses style attributes
    node.append(part);
  }
  return node;
}

function legend() {
  return el("div", {class: "legend note"}, STATES.map(s => el("span", {}, el("i", {class: `s-${s}`}), s)));
}

function rolloutText(rollout) {
  if (!rollout) return "";
  let text = rollout.state;
  if (rollout.reason) text += `: ${rollout.reason}`;
  if (rollout.until) text += ` (until ${rollout.until})`;
  return text;
}

function deviceLink(product, device) {
  return el("a", {href: `#/device/${encodeURIComponent(product)}/${encodeURIComponent(device)}`, text: device});
}

// -- views -----------------------------------------------------------------------------

async function overview(gen) {
  const [status, packages, versions] = await Promise.all([
    api("/admin/api/status"), api("/admin/api/packages"), api("/admin/api/versions")]);
  if (gen !== generation) return null;
  const batches = el("table", {}, el("tr", {}, ["Batch", "Package", "State", "Progress", "Devices", "Done"].map(h => el("th", {text: h}))));
  for (const b of status.batches) {
    const counts = {...b.counts, waiting_report: b.waiting_report};
    batches.append(el("tr", {"data-batch": b.name},
      el("td", {}, el("a", {href: `#/batch/${encodeURIComponent(b.name)}`, text: b.name})),
      el("td", {class: "mono", text: b.package}),
      el("td", {}, b.state, b.rollout ? el("div", {class: "note", text: rolloutText(b.rollout)}) : null),
      el("td", {}, bar(counts, b.total)),
      el("td", {text: STATES.filter(s => counts[s]).map(s => `${s} ${counts[s]}`).join(", ") || "no devices yet"}),
      el("td", {class: "num", text: `${b.done_percent}%`})));
  }
  const pkgs = el("table", {}, el("tr", {}, ["Package", "Product / module", "Version", "Type", "Size", "SHA-256", "MD5", "Status"].map(h => el("th", {text: h}))));
  for (const p of packages.packages) {
    pkgs.append(el("tr", {},
      el("td", {class: "mono", text: p.id}), el("td", {text: `${p.product} / ${p.module}`}), el("td", {text: p.version}),
      el("td", {text: p.type}), el("td", {class: "num", text: (p.size || 0).toLocaleString()}),
      el("td", {class: "mono", title: p.sha256, text: (p.sha256 || "").slice(0, 16)}),
      el("td", {class: "mono", title: p.md5, text: (p.md5 || "").slice(0, 12)}), el("td", {text: p.status})));
  }
  const dist = el("table", {}, el("tr", {}, ["Product / module", "Versions (devices)"].map(h => el("th", {text: h}))));
  for (const m of versions.modules) {
    const total = Object.values(m.versions).reduce((a, b) => a + b, 0);
    const cell = el("td", {});
    for (const [version, count] of Object.entries(m.versions).sort()) {
      cell.append(el("div", {}, el("a", {href: `#/devices?product=${encodeURIComponent(m.product)}&version=${encodeURIComponent(version)}`,
        text: version}), ` ${count} (${Math.round(100 * count / total)}%)`));
    }
    dist.append(el("tr", {}, el("td", {text: `${m.product} / ${m.module}`}), cell));
  }
  return [el("h1", {text: "Overview"}), el("h2", {text: "Batches"}), legend(), batches,
          el("h2", {text: "Packages"}), pkgs, el("h2", {text: "Versions in the fleet"}), dist];
}

// An offset typed into the address bar: anything but a whole number is the first page
// (the API answers 400 to a bad one).
function offsetParam(p) {
  const offset = Number(p.get("offset") || 0);
  return Number.isSafeInteger(offset) && offset > 0 ? offset : 0;
}

function params() {
  const query = location.hash.split("?")[1] || "";
  return new URLSearchParams(query);
}

function setParams(base, values) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(values)) if (v !== "" && v !== null && v !== undefined) query.set(k, v);
  location.hash = `${base}?${query}`;
}

async function devices(gen) {
  const p = params();
  const offset = offsetParam(p);
  const query = new URLSearchParams({offset, limit: PAGE});
  for (const key of ["product", "version", "online", "state", "q"]) if (p.get(key)) query.set(key, p.get(key));
  const data = await api(`/admin/api/devices?${query}`);
  if (gen !== generation) return null;
  const current = Object.fromEntries(["product", "version", "online", "state", "q"].map(k => [k, p.get(k) || ""]));
  const input = (name, label, node) => el("label", {}, label, node);
  const form = el("form", {class: "filters", onsubmit: e => {
    e.preventDefault();
    const values = Object.fromEntries(new FormData(e.target).entries());
    setParams("#/devices", values);
  }},
    input("q", "Device name", el("input", {name: "q", value: current.q})),
    input("product", "Product", el("input", {name: "product", value: current.product, size: 10})),
    input("version", "Version", el("input", {name: "version", value: current.version, size: 8})),
    input("online", "Online", el("select", {name: "online"}, ["", "true", "false"].map(v =>
      el("option", {value: v, selected: v === current.online, text: v === "" ? "any" : v === "true" ? "online" : "offline"})))),
    input("state", "Job state", el("select", {name: "state"}, ["", ...STATES.slice(0, 7)].map(v =>
      el("option", {value: v, selected: v === current.state, text: v || "any"})))),
    el("button", {type: "submit", text: "Filter"}));
  const table = el("table", {}, el("tr", {}, ["Device", "Product", "Versions", "Online", "Last seen", "Job"].map(h => el("th", {text: h}))));
  for (const d of data.devices) {
    const job = d.job;
    table.append(el("tr", {"data-device": d.device},
      el("td", {}, deviceLink(d.product, d.device)), el("td", {text: d.product}),
      el("td", {class: "mono", text: Object.entries(d.versions).map(([m, v]) => `${m}: ${v}`).join(", ")}),
      el("td", {class: d.online ? "online" : "offline", text: d.online ? "online" : "offline"}),
      el("td", {text: time(d.last_seen)}),
      el("td", {}, job ? [el("span", {class: `pill s-${job.state}`, text: job.state}), ` ${job.batch} ${job.progress}%`] : "-")));
  }
  return [el("h1", {text: "Devices"}), form, pager("#/devices", current, offset, data.total), table,
          pager("#/devices", current, offset, data.total)];
}

function pager(base, current, offset, total) {
  const last = Math.min(offset + PAGE, total);
  return el("div", {class: "pager"},
    el("button", {disabled: offset === 0, onclick: () => setParams(base, {...current, offset: Math.max(0, offset - PAGE)}), text: "< Previous"}),
    el("span", {text: total ? `${offset + 1}-${last} of ${total}` : "none"}),
    el("button", {disabled: last >= total, onclick: () => setParams(base, {...current, offset: offset + PAGE}), text: "Next >"}));
}

async function device(gen, product, name) {
  const d = await api(`/admin/api/devices/${encodeURIComponent(product)}/${encodeURIComponent(name)}`);
  if (gen !== generation) return null;
  const versions = el("table", {}, el("tr", {}, ["Module", "Version", "Reported"].map(h => el("th", {text: h}))),
    Object.entries(d.versions).map(([m, v]) => el("tr", {}, el("td", {text: m}), el("td", {class: "mono", text: v.version}),
      el("td", {text: time(v.reported_at)}))));
  const jobs = d.jobs.map(job => el("div", {},
    el("h2", {}, `Job ${job.id}: `, el("a", {href: `#/batch/${encodeURIComponent(job.batch)}`, text: job.batch}),
      ` ${job.module} ${job.from} -> ${job.to} `, el("span", {class: `pill s-${job.state}`, text: job.state})),
    el("p", {class: "note", text: `reported ${job.progress}%, served ${job.served_percent}%` +
      (job.code !== null && job.code !== undefined ? `, code ${job.code}` : "") + (job.message ? `: ${job.message}` : "")}),
    el("table", {}, el("tr", {}, ["At", "From", "To", "Progress", "Reason"].map(h => el("th", {text: h}))),
      job.history.map(h => el("tr", {}, el("td", {text: time(h.at)}), el("td", {text: h.from || "-"}), el("td", {text: h.to}),
        el("td", {class: "num", text: h.progress === null ? "" : `${h.progress}%`}), el("td", {text: h.reason}))))));
  return [el("h1", {text: `${d.product} / ${d.device}`}),
    el("p", {}, el("span", {class: d.online ? "online" : "offline", text: d.online ? "online" : "offline"}),
      `, last seen ${time(d.last_seen)}`, d.tags && d.tags.length ? `, tags: ${d.tags.join(", ")}` : ""),
    el("h2", {text: "Reported versions"}), versions, el("h2", {text: "Jobs"}), jobs.length ? jobs : el("p", {class: "note", text: "no jobs"})];
}

async function batch(gen, name) {
  const p = params();
  const offset = offsetParam(p);
  const state = p.get("state") || "";
  const query = new URLSearchParams({offset, limit: PAGE});
  if (state) query.set("state", state);
  const report = await api(`/admin/api/batches/${encodeURIComponent(name)}?${query}`);
  if (gen !== generation) return null;
  const b = report.batch;
  const counts = {...b.counts, waiting_report: b.waiting_report};
  const path = `/admin/api/batches/${encodeURIComponent(name)}`;
  const selected = () => [...document.querySelectorAll("input[data-select]:checked")].map(box => box.dataset.select);
  const actions = el("div", {class: "actions"},
    el("button", {id: "retry-failed", onclick: () => act(`${path}/retry`), text: `Retry failed (${counts.failed || 0})`}),
    el("button", {id: "retry-selected", onclick: () => selected().length && act(`${path}/retry`, {devices: selected()}), text: "Retry selected"}),
    el("button", {id: "cancel-selected", onclick: () => selected().length && confirm(`Cancel ${selected().length} device(s) in ${name}?`)
      && act(`${path}/cancel`, {devices: selected()}), text: "Cancel selected"}),
    b.rollout && ["paused", "halted"].includes(b.rollout.state)
      ? el("button", {id: "resume", onclick: () => act(`${path}/resume`), text: "Resume"})
      : el("button", {id: "pause", onclick: () => act(`${path}/pause`), text: "Pause"}));
  const filter = el("div", {class: "filters"}, el("label", {}, "Show", el("select", {id: "state-filter",
    onchange: e => setParams(`#/batch/${encodeURIComponent(name)}`, {state: e.target.value})},
    ["", ...STATES].map(v => el("option", {value: v, selected: v === state, text: v || "all devices"})))));
  const table = el("table", {}, el("tr", {}, ["", "Device", "State", "From", "To", "Reported", "Served", "Code", "Message", "Updated"].map(h => el("th", {text: h}))));
  for (const d of report.devices) {
    table.append(el("tr", {"data-device": d.device, "data-state": d.state},
      el("td", {}, el("input", {type: "checkbox", "data-select": d.device})),
      el("td", {}, d.product ? deviceLink(d.product, d.device) : d.device),
      el("td", {}, el("span", {class: `pill s-${d.state}`, text: d.state})),
      el("td", {class: "mono", text: d.from || "-"}), el("td", {class: "mono", text: d.to || "-"}),
      el("td", {class: "num", text: `${d.progress || 0}%`}), el("td", {class: "num", text: `${d.served_percent || 0}%`}),
      el("td", {class: "num", text: d.code === null || d.code === undefined ? "" : d.code}),
      el("td", {text: d.message || ""}), el("td", {text: time(d.updated_at)})));
  }
  const waves = b.rollout && b.rollout.waves ? el("table", {}, el("tr", {}, ["Wave", "Share", "Open", "Jobs", "Succeeded", "Finished"].map(h => el("th", {text: h}))),
    b.rollout.waves.map(w => el("tr", {}, el("td", {text: w.wave}), el("td", {text: `${w.percent}%`}), el("td", {text: w.open ? "open" : "closed"}),
      el("td", {class: "num", text: w.jobs}), el("td", {class: "num", text: w.succeeded}), el("td", {class: "num", text: w.finished})))) : null;
  return [el("h1", {text: `Batch ${b.name}`}),
    el("p", {}, `${b.type} ${b.package} via ${b.protocol}, ${b.mode}, state ${b.state}, package ${b.package_status}; `,
      el("strong", {id: "done", text: `${b.done_percent}% done`}), ` (${b.succeeded_percent}% succeeded) of ${b.total}`),
    b.rollout ? el("p", {id: "rollout", text: `Rollout: ${rolloutText(b.rollout)}`}) : null,
    bar(counts, b.total), legend(), waves, actions, filter,
    pager(`#/batch/${encodeURIComponent(name)}`, {state}, offset, report.total ?? report.devices.length), table];
}

// -- routing and live updates ------------------------------------------------------------

function route() {
  const path = location.hash.replace(/^#/, "").split("?")[0] || "/";
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  document.querySelectorAll("header a[data-nav]").forEach(a => a.classList.toggle("active",
    a.dataset.nav === (parts[0] === "devices" || parts[0] === "device" ? "devices" : "overview")));
  if (parts[0] === "devices") return gen => devices(gen);
  if (parts[0] === "device" && parts.length === 3) return gen => device(gen, parts[1], parts[2]);
  if (parts[0] === "batch" && parts.length === 2) return gen => batch(gen, parts[1]);
  return gen => overview(gen);
}

async function refresh() {
  clearTimeout(timer);
  const gen = ++generation;
  const status = document.getElementById("status");
  try {
    const nodes = await route()(gen);
    if (nodes === null || gen !== generation) return;
    const view = document.getElementById("view");
    const checked = new Set([...view.querySelectorAll("input[data-select]:checked")].map(box => box.dataset.select));
    const focused = document.activeElement && view.contains(document.activeElement) && document.activeElement.name;
    if (focused) { timer = setTimeout(refresh, POLL_MS); return; } // do not redraw under someone typing
    view.replaceChildren(...nodes.filter(Boolean));
    view.querySelectorAll("input[data-select]").forEach(box => { box.checked = checked.has(box.dataset.select); });
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    status.className = "";
  } catch (error) {
    status.textContent = String(error.message || error).slice(0, 120);
    status.className = "error";
  }
  timer = setTimeout(refresh, POLL_MS);
}

document.getElementById("token").value = sessionStorage.getItem("otaToken") || "";
window.addEventListener("hashchange", refresh);
refresh();
