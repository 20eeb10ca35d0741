// gitopsd's web view: a read-only page over the daemon's /api/v1 documents.
//
// No framework and no build step: the daemon serves this file as it is, and the
// view must work in a cluster without internet. Every value is written with
// textContent (the `h` helper), never as HTML: commit messages, reasons and
// object names come from whoever can push to the repository.
"use strict";

const API = "/api/v1";
const POLL_MS = 5000;
const REMOTE_POLL_MS = 10000;
let remoteTimer = null;
const state = { doc: null, route: null, filter: { q: "", result: "", health: "" }, sort: { key: "app", dir: 1 },
                live: "connecting", token: sessionStorage.getItem("gitopsd-token") || "" };

// ---------------------------------------------------------------- helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function link(path, ...children) {
  return h("a", { href: path, "data-nav": true }, ...children);
}

function appPath(target) { return "/apps/" + encodeURIComponent(target); }

function short(sha) { return sha ? sha.slice(0, 8) : ""; }

function ago(iso) {
  if (!iso) return "";
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return iso;
  const s = Math.round((Date.now() - t) / 1000);
  const a = Math.abs(s);
  const text = a < 60 ? `${a}s` : a < 3600 ? `${Math.round(a / 60)}m` : a < 86400 ? `${Math.round(a / 3600)}h`
    : `${Math.round(a / 86400)}d`;
  return s >= 0 ? `${text} ago` : `in ${text}`;
}

function when(iso) { return iso ? h("time", { datetime: iso, title: iso }, ago(iso)) : ""; }

const GOOD = new Set(["Applied", "NoChange", "Healthy", "Current", "RolledBack", "corrected"]);
const BAD = new Set(["Failed", "Refused", "ClusterUnreachable", "Missing", "failed"]);
const WARN = new Set(["Unhealthy", "InProgress", "Waiting", "Held", "reported", "DryRun"]);

function badge(value, extra) {
  if (!value) return "";
  const tone = GOOD.has(value) ? "good" : BAD.has(value) ? "bad" : WARN.has(value) ? "warn" : "neutral";
  return h("span", { class: `badge ${tone}`, "data-value": value, title: extra || null }, value);
}

const KINDS = {
  Deployment: ["deploy", "work"], StatefulSet: ["sts", "work"], DaemonSet: ["ds", "work"], ReplicaSet: ["rs", "work"],
  Job: ["job", "work"], CronJob: ["cj", "work"], Pod: ["pod", "work"], HorizontalPodAutoscaler: ["hpa", "work"],
  Service: ["svc", "net"], Ingress: ["ing", "net"], NetworkPolicy: ["netpol", "net"], Endpoints: ["ep", "net"],
  ConfigMap: ["cm", "conf"], Secret: ["sec", "conf"], PersistentVolumeClaim: ["pvc", "conf"],
  Namespace: ["ns", "meta"], ServiceAccount: ["sa", "rbac"], Role: ["role", "rbac"], ClusterRole: ["crole", "rbac"],
  RoleBinding: ["rb", "rbac"], ClusterRoleBinding: ["crb", "rbac"], CustomResourceDefinition: ["crd", "meta"],
};

function kindIcon(kind) {
  const [abbr, group] = KINDS[kind] || [(kind.match(/[A-Z]/g) || [kind[0] || "?"]).join("").toLowerCase(), "other"];
  return h("span", { class: `kind ${group}`, title: kind, "aria-hidden": "true" }, abbr);
}

function objectName(o) {
  return `${o.kind}${o.group ? "." + o.group : ""}/${o.namespace ? o.namespace + "/" : ""}${o.name}`;
}

function section(title, ...children) {
  return h("section", { class: "card" }, h("h2", {}, title), ...children);
}

function table(headers, rows, attrs) {
  return h("table", attrs || {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows));
}

// ---------------------------------------------------------------- data

class AuthNeeded extends Error {}

async function api(path) {
  const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
  const res = await fetch(API + path, { headers, cache: "no-store" });
  if (res.status === 401) throw new AuthNeeded();
  const doc = await res.json();
  if (!res.ok) throw new Error(doc.error || `HTTP ${res.status}`);
  return doc;
}

function parseRoute(pathname) {
  const m = pathname.match(/^\/apps\/([^/]+)(?:\/history\/(\d+))?\/?$/);
  if (!m) return { page: "apps", doc: "/apps" };
  const target = decodeURIComponent(m[1]);
  if (m[2]) return { page: "record", target, seq: Number(m[2]), doc: `/apps/${encodeURIComponent(target)}/history/${m[2]}` };
  return { page: "app", target, doc: `/apps/${encodeURIComponent(target)}` };
}

let refreshing = null;
let again = false;

// One read at a time: a change announced during a read is one more read after it, not a pile of them.
async function refresh() {
  if (refreshing) { again = true; return refreshing; }
  refreshing = read();
  try { await refreshing; } finally { refreshing = null; }
  if (again) { again = false; refresh(); }
}

async function read() {
  const route = parseRoute(location.pathname);
  const main = document.getElementById("main");
  try {
    const doc = await api(route.doc);
    if (parseRoute(location.pathname).doc !== route.doc) return;   // navigated away meanwhile
    state.doc = doc;
    state.route = route;
    render(main, route, doc);
    // Another replica's targets: this replica's event stream does not hear of their changes.
    const remote = doc.replica || (doc.apps || []).some((a) => a.replica);
    if (remote && !remoteTimer) remoteTimer = setInterval(refresh, REMOTE_POLL_MS);
    if (!remote && remoteTimer) { clearInterval(remoteTimer); remoteTimer = null; }
  } catch (err) {
    if (err instanceof AuthNeeded) { askToken(main); return; }
    main.replaceChildren(h("p", { class: "error" }, `Cannot read ${route.doc}: ${err.message}`));
  }
}

function askToken(main) {
  stopLive();
  const input = h("input", { type: "password", id: "token", autocomplete: "off", placeholder: "token" });
  const form = h("form", { class: "card token", onsubmit: (e) => {
    e.preventDefault();
    state.token = input.value.trim();
    sessionStorage.setItem("gitopsd-token", state.token);
    startLive();
    refresh();
  } }, h("h2", {}, "This gitopsd's web view needs a token"),
  h("p", { class: "muted" }, "The token is in the file given to gitopsd run --ui-token-file. It is kept in this tab only."),
  input, h("button", { type: "submit" }, "Open"));
  main.replaceChildren(form);
  input.focus();
}

// ---------------------------------------------------------------- pages

function render(main, route, doc) {
  const crumbs = document.getElementById("crumbs");
  crumbs.replaceChildren(link("/", "apps"));
  if (route.page !== "apps") crumbs.append(" / ", link(appPath(route.target), route.target));
  if (route.page === "record") crumbs.append(" / ", `#${route.seq}`);
  document.title = route.page === "apps" ? "gitopsd — apps" : `gitopsd — ${route.target}`;
  if (route.page === "apps") renderApps(main, doc);
  else if (route.page === "app") main.replaceChildren(...appPage(doc));
  else main.replaceChildren(...recordPage(doc));
}

// --- the apps table

const COLUMNS = [
  ["app", "App", (a) => a.app], ["cluster", "Cluster", (a) => a.cluster || ""],
  ["revision", "Revision", (a) => (a.commit && a.commit.subject) || a.revision || ""],
  ["result", "Result", (a) => a.result], ["health", "Health", (a) => a.health],
  ["drift", "Last drift", (a) => (a.lastDrift && a.lastDrift.time) || ""],
  ["release", "Release", (a) => (a.release && a.release.state) || ""],
  ["next", "Next run", (a) => a.nextRun || ""],
];

function renderApps(main, doc) {
  let controls = main.querySelector("#controls");
  if (!controls) {
    const q = h("input", { id: "filter", type: "search", placeholder: "filter: app, cluster, commit, author, reason",
      value: state.filter.q, oninput: (e) => { state.filter.q = e.target.value; renderApps(main, state.doc); } });
    const pick = (id, key) => h("select", { id, onchange: (e) => { state.filter[key] = e.target.value; renderApps(main, state.doc); } });
    controls = h("div", { id: "controls", class: "controls" }, q, pick("result-filter", "result"), pick("health-filter", "health"));
    main.replaceChildren(controls, h("div", { id: "summary", class: "muted" }), h("div", { id: "apps-table" }));
  }
  fillSelect(controls.querySelector("#result-filter"), "all results", doc.apps.map((a) => a.result), state.filter.result);
  fillSelect(controls.querySelector("#health-filter"), "all health", doc.apps.map((a) => a.health), state.filter.health);
  const shown = doc.apps.filter(matches).sort(compare);
  main.querySelector("#summary").textContent =
    `${shown.length} of ${doc.apps.length} apps · instance ${doc.instance}${doc.leader ? " (leader)" : " (standby)"}` +
    (doc.clusters || []).filter((c) => !c.reachable).map((c) => ` · cluster ${c.name} unreachable`).join("");
  const headers = COLUMNS.map(([key, title]) => h("th", { class: "sortable", "data-key": key,
    "aria-sort": state.sort.key === key ? (state.sort.dir > 0 ? "ascending" : "descending") : null,
    onclick: () => { state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 }; renderApps(main, state.doc); } },
  title, state.sort.key === key ? (state.sort.dir > 0 ? " ▲" : " ▼") : ""));
  const rows = shown.map((a) => h("tr", { "data-app": a.target },
    h("td", {}, link(appPath(a.target), a.app),
      a.suspended ? h("span", { class: "muted" }, " suspended") : "",
      a.replica ? h("span", { class: "muted replica", title: `run by the replica at ${a.replica}` }, " ⇄") : ""),
    h("td", {}, a.cluster || ""),
    h("td", { class: "revision" }, revisionCell(a)),
    h("td", {}, badge(a.result, a.reason)),
    h("td", {}, badge(a.health)),
    h("td", {}, a.lastDrift ? [when(a.lastDrift.time), " ", h("span", { class: "mono" }, a.lastDrift.object),
      (a.lastDrift.managers || []).length ? h("span", { class: "muted" }, ` by ${a.lastDrift.managers.join(", ")}`) : ""] : ""),
    h("td", {}, releaseText(a.release)),
    h("td", {}, when(a.nextRun))));
  main.querySelector("#apps-table").replaceChildren(
    h("table", { id: "apps" }, h("thead", {}, h("tr", {}, headers)), h("tbody", {}, rows)),
    shown.length ? "" : h("p", { class: "muted" }, doc.apps.length ? "No app matches the filter." : "No apps yet."));
}

function fillSelect(select, all, values, chosen) {
  const options = [...new Set(values.filter(Boolean))].sort();
  select.replaceChildren(h("option", { value: "" }, all), ...options.map((v) => h("option", { value: v, selected: v === chosen }, v)));
}

function matches(a) {
  const f = state.filter;
  if (f.result && a.result !== f.result) return false;
  if (f.health && a.health !== f.health) return false;
  if (!f.q) return true;
  const c = a.commit || {};
  const hay = [a.app, a.cluster, a.revision, c.subject, c.author, a.result, a.health, a.reason].join(" ").toLowerCase();
  return f.q.toLowerCase().split(/\s+/).every((word) => hay.includes(word));
}

function compare(x, y) {
  const get = COLUMNS.find(([key]) => key === state.sort.key)[2];
  const a = String(get(x) || ""), b = String(get(y) || "");
  return (a < b ? -1 : a > b ? 1 : x.target < y.target ? -1 : 1) * state.sort.dir;
}

function revisionCell(a) {
  const c = a.commit;
  if (!c && !a.revision) return h("span", { class: "muted" }, "none yet");
  return [h("span", { class: "mono sha", title: (c && c.sha) || a.revision }, short((c && c.sha) || a.revision)), " ",
    c ? h("span", { class: "subject" }, c.subject) : "", c ? h("span", { class: "muted" }, ` — ${c.author}`) : ""];
}

function releaseText(r) {
  if (!r || !r.state || r.state === "following") return "";
  const parts = [badge(r.state === "held" ? "Held" : r.state === "rolledBack" ? "RolledBack" : r.state)];
  if (r.quarantined) parts.push(h("span", { class: "quarantine", title: "quarantined: not applied again" },
    ` quarantined ${short(r.quarantined)}`));
  if (r.by) parts.push(h("span", { class: "muted" }, ` by ${r.by}`));
  return parts;
}

// --- one app

function appPage(doc) {
  const a = doc.app;
  const head = h("section", { class: "card app-head" },
    h("h1", {}, a.app, a.cluster && a.cluster !== "in-cluster" ? h("span", { class: "muted" }, ` @ ${a.cluster}`) : "",
      " ", badge(a.result), " ", badge(a.health)),
    a.reason ? h("p", { class: "reason" }, a.reason) : "",
    h("dl", {},
      h("dt", {}, "Source"), h("dd", { class: "mono" }, `${doc.repo.url} @ ${doc.repo.ref}${doc.repo.path && doc.repo.path !== "." ? " : " + doc.repo.path : ""}`),
      h("dt", {}, "Revision"), h("dd", {}, revisionCell(a)),
      h("dt", {}, "Last transition"), h("dd", {}, when(a.lastTransition)),
      h("dt", {}, "Release"), h("dd", {}, releaseText(a.release) || "following the branch"),
      h("dt", {}, "Audit chain"), h("dd", { id: "verify" }, verifyText(doc.verify))));
  const out = [head, objectsSection(doc.objects)];
  if (doc.trailError) out.push(section("Audit trail", h("p", { class: "error" }, doc.trailError)));
  else out.push(lastTransitionSection(a, doc.lastTransition), driftSection(doc.drifts), historySection(a.target, doc.transitions));
  return out;
}

function verifyText(v) {
  if (!v) return "not checked";
  return h("span", { class: v.ok ? "ok" : "error" }, v.ok ? "✔ " : "✘ ", v.message);
}

function objectsSection(objects) {
  const rows = objects.map((o) => h("tr", { "data-object": objectName(o) },
    h("td", {}, kindIcon(o.kind), " ", o.kind), h("td", { class: "mono" }, (o.namespace ? o.namespace + "/" : "") + o.name),
    h("td", { class: "mono muted" }, o.file || ""), h("td", {}, badge(o.health)), h("td", { class: "muted" }, o.message || "")));
  return section(`Objects (${objects.length})`, objects.length ? table(["Kind", "Name", "File", "Health", ""], rows, { id: "objects" })
    : h("p", { class: "muted" }, "No objects planned yet."));
}

function planList(plan) {
  const objects = (plan && plan.objects) || [];
  if (!objects.length) return h("p", { class: "muted" }, `Nothing to change (${(plan && plan.unchanged) || 0} unchanged).`);
  return h("ul", { class: "plan" }, objects.map((o) => h("li", { "data-action": o.action },
    h("span", { class: `action ${o.action}` }, o.action), " ", kindIcon(o.kind), " ", h("span", { class: "mono" }, objectName(o)),
    o.done ? "" : h("span", { class: "muted" }, " (not written)"),
    (o.fields || []).length ? h("div", { class: "fields mono" }, o.fields.join(", ")) : "",
    (o.took_over || []).length ? h("div", { class: "muted" }, `took over fields of ${o.took_over.join(", ")}`) : "")),
  plan.unchanged ? h("li", { class: "muted" }, `${plan.unchanged} unchanged`) : "");
}

function lastTransitionSection(a, rec) {
  if (!rec) return section("Last transition", h("p", { class: "muted" }, "No transition recorded yet."));
  return section("Last transition",
    h("p", {}, link(`${appPath(a.target)}/history/${rec.seq}`, `#${rec.seq}`), " ", badge(rec.result), " ",
      badge((rec.health || {}).outcome), " ", when(rec.time), ` · ${rec.trigger || ""}`,
      rec.revision ? [" · ", h("span", { class: "mono" }, short(rec.revision))] : ""),
    rec.reason ? h("p", { class: "reason" }, rec.reason) : "",
    (rec.errors || []).length ? h("ul", { class: "errors" }, rec.errors.map((e) => h("li", {}, e))) : "",
    planList(rec.plan));
}

function driftSection(drifts) {
  if (!drifts.length) return section("Drift", h("p", { class: "muted" }, "No drift recorded."));
  const rows = drifts.map((d) => h("tr", { class: "drift" },
    h("td", {}, when(d.time)), h("td", { class: "mono" }, objectName(d.object || {})),
    h("td", { class: "mono" }, d.deleted ? "(deleted)" : (d.fields || []).join(", ")),
    h("td", { class: "managers" }, (d.managers || []).join(", ") || "?"), h("td", {}, badge(d.action, d.error))));
  return section(`Drift (${drifts.length})`, table(["When", "Object", "Fields", "Changed by", "Action"], rows, { id: "drifts" }));
}

function historySection(target, transitions) {
  const rows = transitions.map((t) => h("tr", {},
    h("td", {}, link(`${appPath(target)}/history/${t.seq}`, `#${t.seq}`)), h("td", {}, when(t.time)),
    h("td", {}, t.type === "release" ? `${t.action} by ${t.by}` : [h("span", { class: "mono" }, short(t.revision)), " ", t.subject || ""]),
    h("td", { class: "muted" }, t.author || ""), h("td", {}, t.trigger || ""),
    h("td", {}, t.duration !== null && t.duration !== undefined ? `${t.duration}s` : ""),
    h("td", {}, badge(t.result)), h("td", {}, badge(t.health))));
  return section(`History (${transitions.length})`, transitions.length
    ? table(["#", "When", "Commit", "Author", "Trigger", "Took", "Result", "Health"], rows, { id: "history" })
    : h("p", { class: "muted" }, "No transitions recorded yet."));
}

// --- one record

function recordPage(doc) {
  const r = doc.record;
  const commit = r.commit || {};
  const rows = [
    ["Type", r.type], ["Time", r.time], ["Trigger", r.trigger], ["Revision", r.revision], ["Previous", r.previous],
    ["Author", commit.author], ["Message", commit.message], ["Result", r.result], ["Health", (r.health || {}).outcome],
    ["Duration", r.duration_seconds !== undefined ? `${r.duration_seconds}s` : null], ["Reason", r.reason],
    ["By", r.by], ["Action", r.action], ["Instance", r.instance], ["Hash", r.hash], ["Previous hash", r.prev_hash],
  ].filter(([, v]) => v !== null && v !== undefined && v !== "");
  const out = [h("section", { class: "card" }, h("h1", {}, `${doc.app.target} #${r.seq}`, " ", badge(r.result || r.action)),
    h("dl", {}, rows.map(([k, v]) => [h("dt", {}, k), h("dd", { class: k === "Message" ? "message" : "mono" }, String(v))])),
    (r.errors || []).length ? h("ul", { class: "errors" }, r.errors.map((e) => h("li", {}, e))) : "")];
  if (r.type === "transition") out.push(section("Plan", planList(r.plan)));
  if (r.type === "drift") out.push(section("Drift", h("p", { class: "mono" }, objectName(r.object || {})),
    h("p", {}, "Fields: ", h("span", { class: "mono" }, (r.fields || []).join(", ") || "(deleted)")),
    h("p", {}, "Changed by: ", h("span", { class: "managers" }, (r.managers || []).join(", ") || "?"))));
  if (r.type === "transition") {
    out.push(section("Diff", doc.diff ? diffBlock(doc.diff) : h("p", { class: "muted" }, doc.diffNote || "No diff.")));
  }
  return out;
}

function diffBlock(text) {
  return h("pre", { class: "diff", id: "diff" }, text.split("\n").map((line) => {
    const tone = /^[+~!-] (create|update|recreate|prune) /.test(line) ? "object"
      : line.startsWith("+++") || line.startsWith("---") ? "file" : line.startsWith("+") ? "add"
      : line.startsWith("-") ? "del" : line.startsWith("@@") ? "hunk" : "";
    return h("span", { class: tone }, line + "\n");
  }));
}

// ---------------------------------------------------------------- navigation and live updates

document.addEventListener("click", (e) => {
  const a = e.target.closest("a[data-nav]");
  if (!a || e.metaKey || e.ctrlKey || e.shiftKey || e.button !== 0) return;
  e.preventDefault();
  if (a.getAttribute("href") !== location.pathname) history.pushState(null, "", a.getAttribute("href"));
  navigate();
});
window.addEventListener("popstate", navigate);

function navigate() {
  document.getElementById("main").replaceChildren(h("p", { class: "muted" }, "Loading…"));
  window.scrollTo(0, 0);
  refresh();
}

let stream = null;
let pollTimer = null;

function setLive(mode) {
  state.live = mode;
  const el = document.getElementById("live");
  el.textContent = { live: "● live", polling: "◌ polling", connecting: "connecting…" }[mode] || mode;
  el.className = `live ${mode}`;
}

function stopLive() {
  if (stream) stream.abort();
  stream = null;
  clearInterval(pollTimer);
  pollTimer = null;
}

// Server-sent events read with fetch (EventSource cannot send the token), falling back to polling.
async function startLive() {
  stopLive();
  const ctrl = new AbortController();
  stream = ctrl;
  try {
    const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
    const res = await fetch(API + "/events", { headers, signal: ctrl.signal, cache: "no-store" });
    if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
    setLive("live");
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const message = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (/^event: change$/m.test(message)) refresh();
      }
    }
  } catch (err) {
    if (ctrl.signal.aborted) return;
  }
  if (stream !== ctrl) return;
  stream = null;
  setLive("polling");
  pollTimer = setInterval(refresh, POLL_MS);
  setTimeout(() => { if (state.live === "polling") startLive(); }, 30000);   // try the stream again later
}

navigate();
startLive();
