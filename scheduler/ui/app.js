// The surge console: one page, hash routes, polling of the aggregated /v1/ui endpoints (never a
// per-sandbox list). No build step: this file is embedded in the surge binary as is.
"use strict";
(function () {
  const POLL_MS = 2000;
  const HISTORY_MAX = 300;
  const $ = (id) => document.getElementById(id);
  const history = []; // [at_ms, allocated cpu fraction, used cpu fraction]
  let timer = null;
  let route = "";

  const tokenInput = $("token");
  tokenInput.value = sessionStorage.getItem("surge-token") || "";
  tokenInput.addEventListener("change", () => { sessionStorage.setItem("surge-token", tokenInput.value); refresh(); });

  function esc(s) {
    return String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function cores(m) { return (m / 1000).toFixed(m % 1000 === 0 ? 0 : 1); }
  function gib(mib) { return (mib / 1024).toFixed(1); }
  function pct(a, b) { return b > 0 ? Math.min(100, (100 * a) / b) : 0; }
  function ago(ms) { const s = Math.max(0, (Date.now() - ms) / 1000); return s < 90 ? s.toFixed(0) + " s" : s < 5400 ? (s / 60).toFixed(0) + " min" : (s / 3600).toFixed(1) + " h"; }
  function pill(s) { return `<span class="pill ${esc(s)}">${esc(s)}</span>`; }

  async function api(path, options) {
    const headers = { accept: "application/json" };
    const token = tokenInput.value.trim();
    if (token) headers.authorization = "Bearer " + token;
    const r = await fetch(path, Object.assign({ headers, cache: "no-store" }, options || {}));
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || r.status + " " + r.statusText);
    return body;
  }

  function showError(e) {
    const el = $("error");
    if (e) { el.textContent = String(e.message || e); el.hidden = false; } else { el.hidden = true; }
  }

  // ---- overview ----
  function spark() {
    if (history.length < 2) return '<svg class="spark"></svg>';
    const t0 = history[0][0], t1 = history[history.length - 1][0], w = 1000, h = 90;
    const line = (k) => history.map((p, i) => `${i ? "L" : "M"}${((p[0] - t0) / Math.max(1, t1 - t0)) * w},${h - 4 - p[k] * (h - 8)}`).join(" ");
    return `<svg class="spark" viewBox="0 0 ${w} ${h}" preserveAspectRatio="none">
      <path d="${line(1)}" fill="none" stroke="#4fb3ff" stroke-width="2" vector-effect="non-scaling-stroke"/>
      <path d="${line(2)}" fill="none" stroke="#3fbf7f" stroke-width="2" vector-effect="non-scaling-stroke"/></svg>`;
  }

  function stateBar(counts, total) {
    const seg = (n, cls) => (n > 0 ? `<span class="${cls}" style="left:${counts._x}%;width:${pct(n, total)}%"></span>` : "");
    let out = "";
    counts._x = 0;
    for (const [n, cls] of [[counts.succeeded, "seg-ok"], [counts.running + (counts.paused || 0), "seg-run"], [counts.placed, "seg-warn"], [(counts.failed || 0) + (counts["oom-killed"] || counts.oom_killed || 0) + (counts.lost || 0), "seg-bad"]]) {
      out += seg(n || 0, cls);
      counts._x += pct(n || 0, total);
    }
    delete counts._x;
    return `<div class="bar">${out}</div>`;
  }

  async function overview() {
    const o = await api("/v1/ui/overview");
    const c = o.capacity, cl = c.cluster;
    history.push([o.at_ms, cl.allocatable.cpu_millis ? cl.allocated.cpu_millis / cl.allocatable.cpu_millis : 0, cl.allocatable.cpu_millis ? cl.used.cpu_millis / cl.allocatable.cpu_millis : 0]);
    if (history.length > HISTORY_MAX) history.shift();
    const sb = c.sandboxes;
    const replicas = o.replicas.map((r) => `<tr><td>${esc(r.id)}${r.id === o.leader ? " " + pill("leader") : ""}</td><td>${esc(r.address)}</td></tr>`).join("");
    const waiting = o.waiting.map((w) => `<tr><td><a href="#/job/${w.id}">${w.id}</a></td><td>${esc(w.tenant)}</td><td>${esc(w.name)}</td><td class="num">${w.pending}</td><td>${ago(w.submitted_at_ms)}</td><td>${esc(w.reason || "waiting for the next plan")}</td></tr>`).join("");
    return `<h1>Overview</h1>
    <div class="cards">
      <div class="card"><div class="k">nodes ready</div><div class="v" id="nodes-ready">${c.nodes.ready}</div><div class="k">${c.nodes.down} down, ${c.nodes.draining} draining</div></div>
      <div class="card"><div class="k">sandboxes running</div><div class="v" id="sandboxes-running">${sb.running}</div><div class="k">${sb.pending} pending, ${sb.placed} placed</div></div>
      <div class="card"><div class="k">CPU reserved</div><div class="v" id="cpu-allocated">${pct(cl.allocated.cpu_millis, cl.allocatable.cpu_millis).toFixed(0)}%</div><div class="k">${cores(cl.allocated.cpu_millis)} of ${cores(cl.allocatable.cpu_millis)} cores; used ${cores(cl.used.cpu_millis)}</div></div>
      <div class="card"><div class="k">memory reserved</div><div class="v">${pct(cl.allocated.memory_mib, cl.allocatable.memory_mib).toFixed(0)}%</div><div class="k">${gib(cl.allocated.memory_mib)} of ${gib(cl.allocatable.memory_mib)} GiB</div></div>
      <div class="card"><div class="k">jobs waiting</div><div class="v" id="jobs-waiting">${o.jobs_waiting}</div><div class="k">${c.jobs.running} running, ${c.jobs.failed} failed</div></div>
      <div class="card"><div class="k">raft</div><div class="v">term ${o.term}</div><div class="k">leader ${esc(o.leader)}, this replica ${esc(o.replica)} at ${o.applied_index}</div></div>
    </div>
    <h2>CPU utilisation since this page opened <span class="dim">(blue: reserved, green: used)</span></h2>${spark()}
    <h2>Sandboxes by state</h2>
    <table><tr>${Object.keys(sb).map((k) => `<th class="num">${esc(k)}</th>`).join("")}</tr><tr>${Object.values(sb).map((v) => `<td class="num">${v}</td>`).join("")}</tr></table>
    <h2>Replicas</h2><table><tr><th>id</th><th>address</th></tr>${replicas}</table>
    <h2>Jobs waiting, oldest first (${o.jobs_waiting})</h2>
    <table><tr><th>job</th><th>tenant</th><th>name</th><th class="num">pending</th><th>waiting</th><th>why</th></tr>${waiting || '<tr><td colspan="6" class="dim">none</td></tr>'}</table>`;
  }

  // ---- heatmap ----
  const METRICS = {
    "allocated cpu": (n) => (n[2] ? n[4] / n[2] : 0),
    "allocated memory": (n) => (n[3] ? n[5] / n[3] : 0),
    "used cpu": (n) => (n[2] ? n[6] / n[2] : 0),
    "used memory": (n) => (n[3] ? n[7] / n[3] : 0),
  };
  let metric = "allocated cpu";
  function colour(f) {
    const x = Math.max(0, Math.min(1, f));
    // dark blue (idle) -> teal -> yellow -> red (full)
    const stops = [[30, 45, 70], [40, 150, 140], [230, 190, 60], [226, 82, 92]];
    const p = x * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(p)), t = p - i;
    const c = stops[i].map((v, k) => Math.round(v + (stops[i + 1][k] - v) * t));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }
  function renderHeatmap(h) {
    const f = METRICS[metric];
    const parts = [`<h1>Nodes <span class="dim">(${h.nodes}${h.truncated ? ", truncated" : ""})</span></h1>
      <div class="legend">colour by<select id="metric">${Object.keys(METRICS).map((k) => `<option${k === metric ? " selected" : ""}>${k}</option>`).join("")}</select>
      &nbsp; idle <span class="cell" style="display:inline-block;background:${colour(0)}"></span> &rarr; full <span class="cell" style="display:inline-block;background:${colour(1)}"></span>; outlined: down</div>
      <div id="heatmap">`];
    for (const p of h.pools) {
      parts.push(`<div class="pool"><h3>pool ${esc(p.pool)} &middot; ${p.nodes.length} nodes</h3><div class="grid">`);
      for (const n of p.nodes) {
        parts.push(`<div class="cell${n[1] === "ready" ? "" : " " + esc(n[1])}" data-node="${esc(n[0])}" style="background:${colour(f(n))}"></div>`);
      }
      parts.push("</div></div>");
    }
    parts.push("</div>");
    return parts.join("");
  }
  let lastHeatmap = null;
  async function nodes() {
    lastHeatmap = await api("/v1/ui/nodes");
    return renderHeatmap(lastHeatmap);
  }
  function nodeRow(id) {
    if (!lastHeatmap) return null;
    for (const p of lastHeatmap.pools) for (const n of p.nodes) if (n[0] === id) return [p.pool, n];
    return null;
  }
  document.addEventListener("mouseover", (e) => {
    const tip = $("tip");
    const id = e.target && e.target.dataset && e.target.dataset.node;
    const row = id && nodeRow(id);
    if (!row) { tip.hidden = true; return; }
    const n = row[1];
    tip.textContent = `${n[0]} (pool ${row[0]}, ${n[1]})\ncpu  reserved ${cores(n[4])} / ${cores(n[2])}  used ${cores(n[6])}\nmem  reserved ${gib(n[5])} / ${gib(n[3])} GiB  used ${gib(n[7])}\nsandboxes ${n[8]}`;
    tip.style.left = e.clientX + 14 + "px";
    tip.style.top = e.clientY + 14 + "px";
    tip.hidden = false;
  });
  document.addEventListener("click", (e) => {
    const id = e.target && e.target.dataset && e.target.dataset.node;
    if (id) location.hash = "#/node/" + encodeURIComponent(id);
  });
  document.addEventListener("change", (e) => {
    if (e.target.id === "metric") { metric = e.target.value; if (lastHeatmap) $("main").innerHTML = renderHeatmap(lastHeatmap); }
    if (e.target.dataset && e.target.dataset.filter !== undefined) refresh();
  });

  async function node(id) {
    const n = await api("/v1/ui/nodes/" + encodeURIComponent(id));
    const jobs = n.jobs.map((j) => `<tr><td><a href="#/job/${j.job}">${j.job}</a></td><td>${esc(j.tenant)}</td><td>${Object.entries(j.sandboxes).map(([s, c]) => `${pill(s)} ${c}`).join(" ")}</td></tr>`).join("");
    return `<h1>Node ${esc(n.id)} ${pill(n.state)}</h1>
    <div class="cards">
      <div class="card"><div class="k">pool</div><div class="v">${esc(n.pool)}</div><div class="k">${esc(n.runtime)} ${esc(n.os)}/${esc(n.arch)}</div></div>
      <div class="card"><div class="k">CPU reserved / offered</div><div class="v">${cores(n.allocated.cpu_millis)} / ${cores(n.allocatable.cpu_millis)}</div><div class="k">used ${cores(n.used.cpu_millis)}</div></div>
      <div class="card"><div class="k">memory reserved / offered</div><div class="v">${gib(n.allocated.memory_mib)} / ${gib(n.allocatable.memory_mib)}</div><div class="k">GiB; used ${gib(n.used.memory_mib)}</div></div>
      <div class="card"><div class="k">sandboxes</div><div class="v">${n.sandboxes}</div><div class="k">cap ${n.max_sandboxes || "none"}</div></div>
    </div>
    <h2>Templates</h2><div>${n.templates.map(esc).join(", ") || '<span class="dim">none</span>'}</div>
    <h2>Labels</h2><div>${Object.entries(n.labels).map(([k, v]) => esc(k + "=" + v)).join(", ") || '<span class="dim">none</span>'}</div>
    <h2>Sandboxes by job (${n.jobs_total})</h2><table><tr><th>job</th><th>tenant</th><th>sandboxes</th></tr>${jobs || '<tr><td colspan="3" class="dim">none</td></tr>'}</table>`;
  }

  // ---- jobs ----
  const filters = { tenant: "", state: "", labels: "" };
  function progress(j) {
    const c = j.counts;
    return stateBar({ succeeded: c.succeeded, running: c.running, paused: c.paused, placed: c.placed, failed: c.failed, oom_killed: c.oom_killed, lost: c.lost }, j.count);
  }
  async function jobs() {
    for (const k of Object.keys(filters)) { const el = document.querySelector(`[data-filter="${k}"]`); if (el) filters[k] = el.value.trim(); }
    const q = new URLSearchParams({ limit: "200" });
    for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v);
    const [list, o] = await Promise.all([api("/v1/jobs?" + q), api("/v1/ui/overview")]);
    const rows = list.map((j) => `<tr data-job="${j.id}"><td><a href="#/job/${j.id}">${j.id}</a></td><td>${esc(j.name)}</td><td>${esc(j.tenant)}</td><td>${pill(j.state)}</td><td class="num">${j.count}</td><td>${progress(j)}</td><td>${esc(Object.entries(j.labels).map(([k, v]) => k + "=" + v).join(","))}</td><td class="dim">${esc(j.pending_reason)}</td></tr>`).join("");
    const states = ["", "pending", "running", "complete", "failed", "cancelled"];
    return `<h1>Jobs</h1>
    <div class="cards">${Object.entries(o.capacity.jobs).map(([s, n]) => `<div class="card"><div class="k">${esc(s)}</div><div class="v" id="jobs-${esc(s)}">${n}</div></div>`).join("")}</div>
    <h2>Newest ${list.length}</h2>
    <div class="filters">
      <input data-filter="tenant" placeholder="tenant" value="${esc(filters.tenant)}">
      <select data-filter="state">${states.map((s) => `<option value="${s}"${s === filters.state ? " selected" : ""}>${s || "any state"}</option>`).join("")}</select>
      <input data-filter="labels" placeholder="labels k=v,k2=v2" value="${esc(filters.labels)}">
    </div>
    <table id="jobs"><tr><th>id</th><th>name</th><th>tenant</th><th>state</th><th class="num">sandboxes</th><th>progress</th><th>labels</th><th>pending reason</th></tr>${rows || '<tr><td colspan="8" class="dim">none</td></tr>'}</table>`;
  }

  async function job(id) {
    const d = await api("/v1/ui/jobs/" + encodeURIComponent(id));
    const j = d.job, c = j.counts;
    const done = c.succeeded + c.failed + c.oom_killed + c.lost + c.cancelled + c.stopped;
    const live = j.state === "pending" || j.state === "running";
    const byNode = d.by_node.map((r) => `<tr><td>${r.node ? `<a href="#/node/${encodeURIComponent(r.node)}">${esc(r.node)}</a>` : '<span class="dim">unplaced</span>'}</td><td>${pill(r.state)}</td><td class="num">${r.count}</td></tr>`).join("");
    const exits = j.exits.map((e) => `<tr><td>${pill(e.state)}</td><td class="num">${e.exit_code == null ? "&ndash;" : e.exit_code}</td><td>${esc(e.reason)}</td><td class="num">${e.count}</td></tr>`).join("");
    const outs = d.outcomes.map((o) => `<tr class="outcome"><td class="num">${o.index}</td><td>${pill(o.state)}</td><td class="num exit-code">${o.exit_code == null ? "&ndash;" : o.exit_code}</td><td>${esc(o.reason || "")}</td><td>${esc(o.node)}</td><td>${o.message ? `<div class="dim">${esc(o.message)}</div>` : ""}<pre class="output-tail">${esc(o.output_tail)}</pre></td></tr>`).join("");
    return `<h1>Job ${j.id} ${pill(j.state)} <span class="dim">${esc(j.name)}</span></h1>
    <div class="cards">
      <div class="card"><div class="k">tenant</div><div class="v">${esc(j.tenant)}</div><div class="k">priority ${j.priority}${j.gang ? ", gang" : ""}</div></div>
      <div class="card"><div class="k">progress</div><div class="v" id="job-progress">${done} / ${j.count}</div>${progress(j)}</div>
      <div class="card"><div class="k">running</div><div class="v">${c.running}</div><div class="k">${c.pending} pending, ${c.placed} placed</div></div>
      <div class="card"><div class="k">failed</div><div class="v">${c.failed + c.oom_killed + c.lost}</div><div class="k">${c.preempted} preempted so far</div></div>
      <div class="card"><div class="k">size</div><div class="v">${cores(j.cpu_millis)} cpu</div><div class="k">${j.memory_mib} MiB, ${esc(j.template)}</div></div>
    </div>
    ${j.pending_reason ? `<h2>Why it waits</h2><div>${esc(j.pending_reason)}</div>` : ""}
    ${live ? '<h2>Actions</h2><button class="danger" id="cancel">Cancel job&hellip;</button>' : ""}
    <h2>Ends by reason and exit code</h2><table><tr><th>state</th><th class="num">exit code</th><th>reason</th><th class="num">sandboxes</th></tr>${exits || '<tr><td colspan="4" class="dim">none</td></tr>'}</table>
    <h2>Sandboxes by node and state (${d.rows_total} groups)</h2><table><tr><th>node</th><th>state</th><th class="num">sandboxes</th></tr>${byNode}</table>
    <h2>Outcomes kept (failures first)</h2><table id="outcomes"><tr><th class="num">index</th><th>state</th><th class="num">exit code</th><th>reason</th><th>node</th><th>output tail</th></tr>${outs || '<tr><td colspan="6" class="dim">none</td></tr>'}</table>
    <div class="dim">command: ${esc(j.command.join(" "))}</div>`;
  }
  document.addEventListener("click", async (e) => {
    if (e.target.id !== "cancel") return;
    const id = route.split("/")[2];
    if (!window.confirm(`Cancel job ${id}? Its sandboxes stop and it will not run again.`)) return;
    try { await api("/v1/jobs/" + encodeURIComponent(id), { method: "DELETE" }); refresh(); } catch (err) { showError(err); }
  });

  // ---- tenants ----
  async function tenants() {
    const t = await api("/v1/ui/tenants");
    const bar = (a, q) => (q ? `<div class="bar"><span class="${a > q ? "seg-bad" : "seg-run"}" style="width:${pct(a, q)}%"></span></div>` : '<span class="dim">no quota</span>');
    const rows = t.tenants.map(({ tenant, usage: u }) => `<tr><td>${esc(tenant)}</td><td class="num">${u.jobs_live}</td><td class="num">${u.sandboxes_active}</td><td class="num">${u.sandboxes_pending}</td>
      <td class="num">${cores(u.allocated.cpu_millis)}${u.quota && u.quota.cpu_millis ? " / " + cores(u.quota.cpu_millis) : ""}</td><td>${bar(u.allocated.cpu_millis, u.quota && u.quota.cpu_millis)}</td>
      <td class="num">${gib(u.allocated.memory_mib)}${u.quota && u.quota.memory_mib ? " / " + gib(u.quota.memory_mib) : ""}</td><td>${bar(u.allocated.memory_mib, u.quota && u.quota.memory_mib)}</td></tr>`).join("");
    return `<h1>Tenants</h1><table id="tenants"><tr><th>tenant</th><th class="num">live jobs</th><th class="num">active</th><th class="num">pending</th><th class="num">CPU cores</th><th>of quota</th><th class="num">memory GiB</th><th>of quota</th></tr>${rows || '<tr><td colspan="8" class="dim">none</td></tr>'}</table>`;
  }

  // ---- routing and polling ----
  async function refresh() {
    clearTimeout(timer);
    route = location.hash.replace(/^#/, "") || "/";
    const parts = route.split("/");
    const page = parts[1] || "overview";
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === (page === "job" ? "jobs" : page === "node" ? "nodes" : page));
    const focused = document.activeElement && document.activeElement.dataset && document.activeElement.dataset.filter;
    try {
      const render = { overview, nodes, node: () => node(decodeURIComponent(parts[2] || "")), jobs, job: () => job(parts[2]), tenants }[page] || overview;
      const html = await render();
      if (route === (location.hash.replace(/^#/, "") || "/")) {
        $("main").innerHTML = html;
        if (focused) { const el = document.querySelector(`[data-filter="${focused}"]`); if (el) { el.focus(); } }
      }
      showError(null);
      $("status").textContent = "updated " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = String((+document.body.dataset.loaded || 0) + 1);
    } catch (e) {
      showError(e);
    }
    timer = setTimeout(refresh, POLL_MS);
  }
  window.addEventListener("hashchange", refresh);
  // For tests and operators' scripts: render a heatmap from given data (the 10,000-node bound).
  window.surge = { renderHeatmap: (h) => { lastHeatmap = h; $("main").innerHTML = renderHeatmap(h); return document.querySelectorAll("#heatmap .cell").length; } };
  refresh();
})();
