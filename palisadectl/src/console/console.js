// The palisade console: the live traffic map (server-sent events from
// /api/stream), the reasons behind an edge, learn -> audit -> enforce, and
// the policies in force. No libraries: the page is served by the node's
// daemon with nothing fetched from elsewhere.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

// Layout: groups (namespaces, the node, outside) in GROUP_COLS columns;
// the nodes of a group on a grid of NODE_COLS columns, each in the first
// free slot when it appears. A node keeps its slot while it is on the map,
// so an update never moves what is already drawn (a growing group only
// pushes down the groups below it).
const GROUP_COLS = 3;
const NODE_COLS = 5;
const CELL = 130;
const GROUP_HEAD = 34;
const ROW = CELL * 1.5;
const GROUP_GAP = 36;
const RADIUS = { pod: 13, workload: 17, namespace: 22 };
const BEND = { allowed: 18, audit: 30, denied: 42 };

const st = {
  nodes: new Map(), // id -> {data, el, x, y}
  edges: new Map(), // id -> {data, el}
  groups: new Map(), // name -> {index, slots: Map(id -> slot), el}
  groupCount: 0,
  es: null,
  external: null,
  selectedEdge: null,
  fitted: false,
  view: { x: 0, y: 0, w: 1200, h: 700 },
};

function el(name, attrs, parent) {
  const e = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function h(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function filters() {
  const p = new URLSearchParams();
  for (const k of ["namespace", "pod", "verdict", "port", "window", "level"]) {
    const v = $("f-" + k).value.trim();
    if (v) p.set(k, v);
  }
  return p;
}

// The token: from the fragment of the URL `palisadectl console` prints
// (never sent to the server in the address), kept for this tab only.
function token() {
  const given = new URLSearchParams(location.hash.slice(1)).get("token");
  if (given) {
    sessionStorage.setItem("palisade-console-token", given);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("palisade-console-token") || "";
}

function authorised(options) {
  const o = Object.assign({ credentials: "omit", cache: "no-store" }, options || {});
  o.headers = Object.assign({ Authorization: "Bearer " + token() }, o.headers || {});
  return o;
}

async function api(path, options) {
  const r = await fetch(path, authorised(options));
  const body = await r.json().catch(() => ({ error: "the daemon answered " + r.status }));
  if (!r.ok) throw new Error(body.error || "the daemon answered " + r.status);
  return body;
}

// ---- the map ----

function groupOf(name) {
  let g = st.groups.get(name);
  if (!g) {
    g = { index: st.groupCount++, slots: new Map(), el: null, label: null, x: 0, y: 0 };
    const cls = name === "outside" ? "outside" : name === "node" || name === "nodes" ? "node" : "";
    g.el = el("rect", { class: "group-box " + cls, rx: 8 }, $("layer-groups"));
    g.label = el("text", { class: "group-label" }, $("layer-groups"));
    g.label.textContent = name === "node" ? "this node" : name === "nodes" ? "other nodes" : name === "outside" ? "outside" : "namespace " + name;
    st.groups.set(name, g);
  }
  return g;
}

function freeSlot(g) {
  const used = new Set(g.slots.values());
  let s = 0;
  while (used.has(s)) s++;
  return s;
}

function rowsOf(g) {
  let max = -1;
  for (const s of g.slots.values()) max = Math.max(max, s);
  return Math.max(1, Math.floor(max / NODE_COLS) + 1);
}

// Place groups (column by index, stacked) and every node in its slot.
function colsOf(g) {
  let max = 0;
  for (const s of g.slots.values()) max = Math.max(max, s);
  return Math.min(NODE_COLS, max + 1);
}

function widthOf(g) {
  return Math.max(2, colsOf(g)) * CELL + 24;
}

// Groups flow in rows of GROUP_COLS, each as wide as the columns its pods
// use: a group moves only when one before it gains a column or a row.
function layout() {
  const ordered = [...st.groups.values()].filter((g) => g.slots.size > 0).sort((a, b) => a.index - b.index);
  for (const g of st.groups.values()) {
    const shown = g.slots.size > 0;
    for (const e of [g.el, g.label]) {
      if (shown) e.removeAttribute("display");
      else e.setAttribute("display", "none");
    }
  }
  let x = 0, y = 0, rowHeight = 0;
  ordered.forEach((g, i) => {
    if (i > 0 && i % GROUP_COLS === 0) {
      x = 0;
      y += rowHeight + GROUP_GAP;
      rowHeight = 0;
    }
    g.x = x;
    g.y = y;
    g.w = widthOf(g);
    const height = GROUP_HEAD + rowsOf(g) * ROW;
    rowHeight = Math.max(rowHeight, height);
    x += g.w + GROUP_GAP;
    g.el.setAttribute("x", g.x);
    g.el.setAttribute("y", g.y);
    g.el.setAttribute("width", g.w);
    g.el.setAttribute("height", height);
    g.label.setAttribute("x", g.x + 10);
    g.label.setAttribute("y", g.y + 20);
  });
  for (const n of st.nodes.values()) {
    const g = st.groups.get(n.data.group);
    const s = g.slots.get(n.data.id);
    const x = g.x + 12 + (s % NODE_COLS) * CELL + CELL / 2;
    // Every other column half a row lower: three pods in a row are not on
    // one line, so an edge between two of them does not cross the third.
    const y = g.y + GROUP_HEAD + Math.floor(s / NODE_COLS) * ROW + CELL / 2 - 10 + ((s % NODE_COLS) % 2) * (CELL / 2);
    if (x !== n.x || y !== n.y) {
      n.x = x;
      n.y = y;
      n.el.setAttribute("transform", `translate(${x},${y})`);
      n.moved = true;
    }
  }
  for (const e of st.edges.values()) {
    const a = st.nodes.get(e.data.from);
    const b = st.nodes.get(e.data.to);
    if (e.fresh || (a && a.moved) || (b && b.moved)) drawEdge(e);
  }
  for (const n of st.nodes.values()) n.moved = false;
}

function describeNode(d) {
  if (d.kind === "pod") return `pod ${d.group}/${d.label}`;
  if (d.kind === "workload") return `workload ${d.label} in ${d.group} (${d.pods} pods)`;
  if (d.kind === "namespace") return `namespace ${d.label} (${d.pods} pods)`;
  return d.label;
}

function upsertNode(d) {
  let n = st.nodes.get(d.id);
  const g = groupOf(d.group);
  if (!n) {
    g.slots.set(d.id, freeSlot(g));
    const e = el("g", { class: "node kind-" + d.kind, tabindex: "0", role: "button", "data-id": d.id });
    el("circle", { r: RADIUS[d.kind] || 13 }, e);
    const t = el("text", { y: (RADIUS[d.kind] || 13) + 14 }, e);
    e.addEventListener("click", () => selectNode(d.id));
    e.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") {
        ev.preventDefault();
        selectNode(d.id);
      }
    });
    $("layer-nodes").appendChild(e);
    n = { data: d, el: e, text: t, x: null, y: null };
    st.nodes.set(d.id, n);
  }
  n.data = d;
  n.text.textContent = d.label;
  n.el.setAttribute("aria-label", describeNode(d));
}

function removeNode(id) {
  const n = st.nodes.get(id);
  if (!n) return;
  n.el.remove();
  const g = st.groups.get(n.data.group);
  if (g) g.slots.delete(id);
  st.nodes.delete(id);
}

function portsText(d) {
  const ports = d.ports.slice(0, 3).join(", ") + (d.ports.length > 3 ? ` +${d.ports.length - 3}` : "");
  return `${ports} ×${d.connections}`;
}

function upsertEdge(d) {
  let e = st.edges.get(d.id);
  if (!e) {
    const g = el("g", {
      class: "edge " + d.verdict,
      tabindex: "0",
      role: "button",
      "data-id": d.id,
      "data-from": d.from,
      "data-to": d.to,
      "data-verdict": d.verdict,
    });
    const line = el("path", { class: "line", "marker-end": `url(#arrow-${d.verdict})` }, g);
    const handle = el("circle", { class: "edge-handle", r: 6 }, g);
    const label = el("text", {}, g);
    g.addEventListener("click", () => selectEdge(d.id));
    g.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") {
        ev.preventDefault();
        selectEdge(d.id);
      }
    });
    $("layer-edges").appendChild(g);
    e = { data: d, el: g, line, handle, label, fresh: true };
    st.edges.set(d.id, e);
  }
  e.data = d;
  e.fresh = true;
  e.el.setAttribute("data-ports", d.ports.join(","));
  e.el.setAttribute("data-connections", d.connections);
  // When the browser drew this edge's last change (the benchmark reads it).
  e.el.setAttribute("data-updated", Date.now());
  const from = st.nodes.get(d.from);
  const to = st.nodes.get(d.to);
  e.el.setAttribute(
    "aria-label",
    `${from ? describeNode(from.data) : d.from} to ${to ? describeNode(to.data) : d.to}: ${d.ports.join(", ")}, ${d.verdict}, ${d.connections} connections`,
  );
  e.label.textContent = portsText(d);
}

function drawEdge(e) {
  e.fresh = false;
  const a = st.nodes.get(e.data.from);
  const b = st.nodes.get(e.data.to);
  if (!a || !b || a.x === null || b.x === null) return;
  const bend = BEND[e.data.verdict] || 20;
  let path, mid;
  if (a === b) {
    const r = RADIUS[a.data.kind] || 13;
    const x = a.x, y = a.y - r;
    path = `M${x - 6},${y} C${x - 40},${y - bend - 30} ${x + 40},${y - bend - 30} ${x + 6},${y}`;
    mid = { x, y: y - bend - 8 };
  } else {
    const dx = b.x - a.x, dy = b.y - a.y;
    const len = Math.hypot(dx, dy) || 1;
    const nx = -dy / len, ny = dx / len;
    const cx = (a.x + b.x) / 2 + nx * bend, cy = (a.y + b.y) / 2 + ny * bend;
    const rb = (RADIUS[b.data.kind] || 13) + 3;
    const ex = cx - b.x, ey = cy - b.y;
    const el2 = Math.hypot(ex, ey) || 1;
    const bx = b.x + (ex / el2) * rb, by = b.y + (ey / el2) * rb;
    path = `M${a.x},${a.y} Q${cx},${cy} ${bx},${by}`;
    mid = { x: 0.25 * a.x + 0.5 * cx + 0.25 * bx, y: 0.25 * a.y + 0.5 * cy + 0.25 * by };
  }
  e.line.setAttribute("d", path);
  e.handle.setAttribute("cx", mid.x);
  e.handle.setAttribute("cy", mid.y);
  e.label.setAttribute("x", mid.x + 8);
  e.label.setAttribute("y", mid.y - 6);
}

function removeEdge(id) {
  const e = st.edges.get(id);
  if (!e) return;
  e.el.remove();
  st.edges.delete(id);
  if (st.selectedEdge === id) st.selectedEdge = null;
}

function clearMap() {
  for (const id of [...st.edges.keys()]) removeEdge(id);
  for (const id of [...st.nodes.keys()]) removeNode(id);
  $("layer-groups").replaceChildren();
  st.groups.clear();
  st.groupCount = 0;
  st.fitted = false;
}

function applyDelta(d) {
  if (d.full) {
    // A reconnection keeps the layout of the nodes still there.
    const keep = new Set(d.nodes.map((n) => n.id));
    for (const id of [...st.edges.keys()]) removeEdge(id);
    for (const id of [...st.nodes.keys()]) if (!keep.has(id)) removeNode(id);
  }
  for (const id of d.removedEdges) removeEdge(id);
  for (const id of d.removedNodes) removeNode(id);
  for (const n of d.nodes) upsertNode(n);
  for (const e of d.edges) upsertEdge(e);
  layout();
  document.body.dataset.level = d.level || "";
  $("counts").textContent = `${st.nodes.size} nodes, ${st.edges.size} edges, showing ${d.level}s`;
  renderTable();
  if (!st.fitted && st.nodes.size > 0) fit();
  if (!document.body.dataset.ready) {
    // Milliseconds from the page's navigation to the first map drawn.
    document.body.dataset.readyAt = String(Math.round(performance.now()));
  }
  document.body.dataset.ready = "1";
}

let tableTimer = null;
let tableDrawn = 0;
function renderTable() {
  // Many updates a second on a busy node: draw the table at most twice a
  // second (at once when it was not drawn for that long).
  if (tableTimer) return;
  const wait = Math.max(0, tableDrawn + 500 - Date.now());
  tableTimer = setTimeout(() => {
    tableTimer = null;
    tableDrawn = Date.now();
    const body = $("edges-table").tBodies[0];
    const rows = [];
    const sorted = [...st.edges.values()].sort((a, b) => b.data.connections - a.data.connections).slice(0, 500);
    for (const e of sorted) {
      const d = e.data;
      const tr = h("tr");
      tr.dataset.id = d.id;
      const name = (id) => {
        const n = st.nodes.get(id);
        return n ? (n.data.kind === "pod" ? `${n.data.group}/${n.data.label}` : n.data.label) : id;
      };
      const from = h("td");
      const b = h("button", name(d.from));
      b.type = "button";
      b.addEventListener("click", () => selectEdge(d.id));
      from.appendChild(b);
      tr.appendChild(from);
      tr.appendChild(h("td", name(d.to)));
      tr.appendChild(h("td", d.ports.join(", ")));
      tr.appendChild(h("td", d.verdict, d.verdict));
      tr.appendChild(h("td", String(d.connections)));
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }, wait);
}

function setView() {
  const v = st.view;
  $("map").setAttribute("viewBox", `${v.x} ${v.y} ${v.w} ${v.h}`);
}

function fit() {
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const g of st.groups.values()) {
    if (g.slots.size === 0) continue;
    x0 = Math.min(x0, g.x);
    y0 = Math.min(y0, g.y);
    x1 = Math.max(x1, g.x + g.w);
    y1 = Math.max(y1, g.y + GROUP_HEAD + rowsOf(g) * ROW);
  }
  if (!isFinite(x0)) return;
  const box = $("map").getBoundingClientRect();
  const aspect = box.width > 0 && box.height > 0 ? box.width / box.height : 16 / 9;
  let w = x1 - x0 + 40, hgt = y1 - y0 + 40;
  if (w / hgt < aspect) w = hgt * aspect;
  else hgt = w / aspect;
  st.view = { x: x0 - 20, y: y0 - 20, w, h: hgt };
  setView();
  st.fitted = true;
}

// The live map: server-sent events read from a fetch (an EventSource
// cannot send the token), reconnecting after a second when cut.
function connect() {
  if (st.es) st.es.abort();
  const ctl = new AbortController();
  st.es = ctl;
  const live = $("live");
  live.textContent = "connecting…";
  live.className = "";
  const run = async () => {
    const r = await fetch("/api/stream?" + filters().toString(), authorised({ signal: ctl.signal }));
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error || "the daemon answered " + r.status);
    }
    live.textContent = "live";
    live.className = "on";
    const reader = r.body.getReader();
    const text = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += text.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let event = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (event === "map" && data) applyDelta(JSON.parse(data));
      }
    }
    throw new Error("the stream ended");
  };
  run().catch((err) => {
    if (ctl.signal.aborted) return;
    live.textContent = `disconnected (${err.message}), retrying…`;
    live.className = "off";
    setTimeout(() => {
      if (st.es === ctl) connect();
    }, 1000);
  });
}

// ---- details ----

function decidedBy(r) {
  if (r.policy) return r.policy;
  if (r.isolatedBy && r.isolatedBy.length) return `default deny (isolated by ${r.isolatedBy.join(", ")})`;
  return r.reason;
}

function partyName(p) {
  return p.namespace && p.name ? `${p.namespace}/${p.name}` : p.address;
}

let edgeAsked = 0;
async function selectEdge(id) {
  const asked = ++edgeAsked;
  if (st.selectedEdge) {
    const old = st.edges.get(st.selectedEdge);
    if (old) old.el.classList.remove("selected");
  }
  st.selectedEdge = id;
  const e = st.edges.get(id);
  if (e) e.el.classList.add("selected");
  const box = $("details");
  box.replaceChildren(h("h2", "Details"), h("p", "loading…", "hint"));
  const p = filters();
  p.set("id", id);
  if (!p.get("level") && document.body.dataset.level) p.set("level", document.body.dataset.level);
  let d;
  try {
    d = await api("/api/edge?" + p.toString());
  } catch (err) {
    if (asked === edgeAsked) box.replaceChildren(h("h2", "Details"), h("p", err.message, "error"));
    return;
  }
  // Another edge was chosen while this one loaded.
  if (asked !== edgeAsked) return;
  const parts = [h("h2", "Details")];
  const from = st.nodes.get(d.edge.from), to = st.nodes.get(d.edge.to);
  const title = h("p");
  title.append(
    `${from ? describeNode(from.data) : d.edge.from} → ${to ? describeNode(to.data) : d.edge.to}: `,
    h("span", d.edge.verdict, "verdict-" + d.edge.verdict),
    ` on ${d.edge.ports.join(", ")} (${d.edge.connections} connections)`,
  );
  title.id = "edge-title";
  parts.push(title);
  if (d.isolatedBy && d.isolatedBy.length) {
    const iso = h("p");
    iso.id = "isolated-by";
    iso.append(h("strong", "Isolated by: "), d.isolatedBy.join(", "));
    parts.push(iso);
  }
  parts.push(h("h3", "Why (the same answer as palisadectl explain)"));
  for (const x of d.explanations) {
    const head = h("p");
    head.append(`${x.from} → ${x.to} ${x.port}: `);
    if (x.error) head.append(h("span", x.error, "error"));
    else head.append(h("span", x.verdict, "verdict-" + x.verdict));
    parts.push(head);
    if (x.text) {
      const pre = h("pre", x.text);
      pre.className = "explain";
      parts.push(pre);
    }
  }
  parts.push(h("h3", `Flow records (${d.records.length}, newest last)`));
  const t = h("table");
  t.id = "edge-records";
  const head = h("tr");
  for (const c of ["time", "seen at", "peer", "port", "verdict", "decided by"]) {
    const th = h("th", c);
    th.scope = "col";
    head.appendChild(th);
  }
  t.appendChild(h("thead")).appendChild(head);
  const tb = h("tbody");
  for (const r of d.records) {
    const tr = h("tr");
    tr.append(
      h("td", r.time.replace("T", " ").replace("Z", "")),
      h("td", `${partyName(r.endpoint)} (${r.direction})`),
      h("td", partyName(r.peer)),
      h("td", r.dport ? `${r.dport}/${r.protocol}` : r.protocol),
      h("td", r.verdict, r.verdict),
      h("td", decidedBy(r)),
    );
    tb.appendChild(tr);
  }
  t.appendChild(tb);
  parts.push(t);
  box.replaceChildren(...parts);
}

function selectNode(id) {
  const n = st.nodes.get(id);
  if (!n) return;
  for (const o of st.nodes.values()) o.el.classList.toggle("selected", o === n);
  const d = n.data;
  if (d.kind === "pod" || d.kind === "workload") $("l-workload").value = d.id;
  if (d.kind !== "outside" && d.kind !== "host" && d.kind !== "node") $("l-namespace").value = d.group;
  const box = $("details");
  const parts = [h("h2", "Details"), h("p", describeNode(d))];
  const dl = h("dl");
  const row = (k, v) => {
    dl.append(h("dt", k), h("dd", v));
  };
  if (d.meta) {
    if (d.meta.node) row("node", d.meta.node);
    if (d.meta.runtime) row("attached by", d.meta.runtime);
  }
  const labels = Object.entries(d.labels || {}).map(([k, v]) => `${k}=${v}`);
  if (labels.length) row("labels", labels.join(", "));
  if (d.domains && d.domains.length) row("names", d.domains.join(", "));
  parts.push(dl);
  box.replaceChildren(...parts);
}

// ---- learn, stage, enforce ----

async function learnPolicies() {
  const p = new URLSearchParams();
  const ns = $("l-namespace").value.trim(), wl = $("l-workload").value.trim();
  if (wl) p.set("workload", wl);
  else if (ns) p.set("namespace", ns);
  const w = $("f-window").value;
  if (w) p.set("window", w);
  p.set("mode", "audit");
  const out = $("l-out");
  $("l-result").textContent = "";
  try {
    const d = await api("/api/learn?" + p.toString());
    $("l-yaml").value = d.yaml;
    const report = $("l-report");
    report.replaceChildren(...d.report.map((r) => h("li", r)));
    out.hidden = false;
    $("l-result").textContent = `${d.policies} policies learned from ${d.records} flow records`;
  } catch (err) {
    out.hidden = false;
    $("l-result").textContent = err.message;
  }
}

async function applyPolicies(mode) {
  const result = $("l-result");
  result.textContent = `applying in ${mode} mode…`;
  try {
    const d = await api("/api/apply", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ yaml: $("l-yaml").value, mode }),
    });
    const what = d.changes.map((c) => `${c.object} ${c.change}`).join(", ");
    result.textContent = `${mode}: ${what}` + (d.warnings.length ? ` (warnings: ${d.warnings.join("; ")})` : "");
    result.dataset.mode = mode;
    result.className = "";
  } catch (err) {
    result.textContent = err.message;
    result.className = "error";
  }
}

// ---- policies ----

async function showPolicies() {
  const p = new URLSearchParams();
  const ns = $("p-namespace").value.trim();
  if (ns) p.set("namespace", ns);
  const box = $("policies");
  let d;
  try {
    d = await api("/api/policies?" + p.toString());
  } catch (err) {
    box.replaceChildren(h("p", err.message, "error"));
    return;
  }
  const t = h("table");
  const head = h("tr");
  for (const c of ["pod", "policies (mode)", "ingress allowed from", "egress allowed to"]) {
    const th = h("th", c);
    th.scope = "col";
    head.appendChild(th);
  }
  t.appendChild(h("thead")).appendChild(head);
  const tb = h("tbody");
  const list = (isolated, rules) => {
    if (!isolated) return h("td", "everything (not isolated)");
    const td = h("td");
    if (!rules.length) td.textContent = "nothing";
    for (const r of rules) td.appendChild(h("div", `${r.allows} (${r.policy})`));
    return td;
  };
  for (const pod of d.pods) {
    const tr = h("tr");
    tr.dataset.pod = pod.pod;
    tr.append(
      h("td", pod.pod),
      h("td", pod.policies.map((x) => `${x.name} (${x.mode})`).join(", ") || "none"),
      list(pod.ingressIsolated, pod.ingressAllows),
      list(pod.egressIsolated, pod.egressAllows),
    );
    tb.appendChild(tr);
  }
  t.appendChild(tb);
  // And the other way round: the pods each policy selects.
  const s = h("table");
  s.id = "policy-pods";
  const sh = h("tr");
  for (const c of ["policy", "selects"]) {
    const th = h("th", c);
    th.scope = "col";
    sh.appendChild(th);
  }
  s.appendChild(h("thead")).appendChild(sh);
  const sb = h("tbody");
  for (const [name, pods] of Object.entries(d.selects)) {
    const tr = h("tr");
    tr.dataset.policy = name;
    tr.append(h("td", name), h("td", pods.join(", ")));
    sb.appendChild(tr);
  }
  s.appendChild(sb);
  box.replaceChildren(t, h("h3", "Pods each policy selects"), s);
}

function showTab(which) {
  const map = which === "map";
  $("view-map").hidden = !map;
  $("view-policies").hidden = map;
  $("tab-map").setAttribute("aria-pressed", String(map));
  $("tab-policies").setAttribute("aria-pressed", String(!map));
  if (!map) showPolicies();
}

// ---- pan and zoom ----

function panZoom() {
  const svg = $("map");
  svg.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const box = svg.getBoundingClientRect();
    const v = st.view;
    const f = ev.deltaY > 0 ? 1.15 : 1 / 1.15;
    const px = v.x + ((ev.clientX - box.left) / box.width) * v.w;
    const py = v.y + ((ev.clientY - box.top) / box.height) * v.h;
    st.view = { x: px - (px - v.x) * f, y: py - (py - v.y) * f, w: v.w * f, h: v.h * f };
    setView();
  }, { passive: false });
  let drag = null;
  svg.addEventListener("mousedown", (ev) => {
    if (ev.target.closest(".edge, .node")) return;
    drag = { x: ev.clientX, y: ev.clientY, v: Object.assign({}, st.view) };
  });
  window.addEventListener("mousemove", (ev) => {
    if (!drag) return;
    const box = svg.getBoundingClientRect();
    const k = drag.v.w / box.width;
    st.view = Object.assign({}, drag.v, { x: drag.v.x - (ev.clientX - drag.x) * k, y: drag.v.y - (ev.clientY - drag.y) * k });
    setView();
  });
  window.addEventListener("mouseup", () => {
    drag = null;
  });
}

async function main() {
  // Filters from the address (a link to a filtered map), in its query or
  // beside the token in its fragment.
  const given = new URLSearchParams(location.search);
  for (const [k, v] of new URLSearchParams(location.hash.slice(1))) given.set(k, v);
  if (!token()) {
    $("live").textContent = "no token: open the URL that `palisadectl console` prints on the node";
    $("live").className = "off";
    return;
  }
  for (const k of ["namespace", "pod", "verdict", "port", "window", "level"]) {
    if (given.get(k)) $("f-" + k).value = given.get(k);
  }
  setView();
  panZoom();
  $("filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    clearMap();
    connect();
  });
  $("tab-map").addEventListener("click", () => showTab("map"));
  $("tab-policies").addEventListener("click", () => showTab("policies"));
  $("p-refresh").addEventListener("click", showPolicies);
  $("l-learn").addEventListener("click", learnPolicies);
  $("l-audit").addEventListener("click", () => applyPolicies("audit"));
  $("l-enforce").addEventListener("click", () => applyPolicies("enforce"));
  $("l-download").addEventListener("click", () => {
    const blob = new Blob([$("l-yaml").value], { type: "application/yaml" });
    $("l-download").href = URL.createObjectURL(blob);
  });
  try {
    const s = await api("/api/status");
    $("node").textContent = "node " + s.node;
    st.external = s.external;
    if (s.external) {
      $("l-audit").hidden = true;
      $("l-enforce").hidden = true;
      $("l-result").textContent = `Policies come from ${s.external}: download the YAML and apply it there.`;
    }
  } catch (err) {
    $("live").textContent = err.message;
  }
  connect();
}

main();
