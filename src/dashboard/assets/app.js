// llm-gateway dashboard: reads /admin/api/{overview,usage,keys,trouble} every 10 seconds and
// draws them. No framework, no build step; every text from the API is set as text, never as
// HTML. Charts are SVG drawn here.
"use strict";

const REFRESH_MS = 10000;
const COLORS = ["#3b6fd8", "#e08a1e", "#2a9d66", "#c2453a", "#8759c9", "#1f9db3", "#b0882b", "#9aa3ad"];
const SVG = "http://www.w3.org/2000/svg";
let data = null;
let timer = null;

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function usd(nano, places = 6) {
  return "$" + (nano / 1e9).toFixed(places);
}

function number(n) {
  return Number(n || 0).toLocaleString("en-US");
}

function when(unixOrText) {
  if (unixOrText === null || unixOrText === undefined) return "";
  const d = typeof unixOrText === "number" ? new Date(unixOrText * 1000) : new Date(unixOrText);
  return isNaN(d) ? String(unixOrText) : d.toISOString().replace("T", " ").slice(0, 16) + " UTC";
}

function bar(fraction, label) {
  const f = Math.max(0, Math.min(1, fraction));
  const cls = f >= 1 ? "bar full" : f >= 0.9 ? "bar high" : "bar";
  const span = el("span");
  span.style.width = (f * 100).toFixed(1) + "%";
  return el("span", {}, el("span", { class: cls, title: label }, span), label);
}

async function get(path) {
  const r = await fetch("/admin/api/" + path, { credentials: "same-origin", headers: { accept: "application/json" } });
  if (r.status === 401 || r.status === 403) throw { login: true };
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

async function signedIn() {
  const r = await fetch("/dashboard/session", { credentials: "same-origin" });
  return r.ok && (await r.json()).signed_in === true;
}

async function load() {
  try {
    if (!(await signedIn())) throw { login: true };
    const [overview, usage, keys, trouble] = await Promise.all(["overview", "usage", "keys", "trouble"].map(get));
    data = { overview, usage, keys, trouble };
    $("login").hidden = true;
    $("panels").hidden = false;
    render();
  } catch (e) {
    if (e && e.login) {
      $("panels").hidden = true;
      $("login").hidden = false;
      return;
    }
    $("updated").textContent = "could not refresh: " + (e && e.message ? e.message : e);
  } finally {
    clearTimeout(timer);
    timer = setTimeout(load, REFRESH_MS);
  }
}

function render() {
  const started = performance.now();
  renderHeader(data.overview, data.trouble);
  renderAccounts(data.overview.accounts || []);
  renderUsage(data.usage);
  renderKeys(data.keys);
  renderTrouble(data.trouble);
  window.__renderMs = performance.now() - started;
  window.__rendered = (window.__rendered || 0) + 1;
}

function renderHeader(o, t) {
  const ready = t.health && t.health.ready;
  const health = $("health");
  health.textContent = ready ? "ready" : "not ready";
  health.className = "pill " + (ready ? "ok" : "bad");
  const state = o.state || {};
  const shared = state.backend === "redis" ? ` · Redis ${state.redis}` : " · local state";
  $("instance").textContent = `v${o.version} · up ${Math.floor(o.uptime_secs / 60)} min · workers ${o.workers.busy}/${o.workers.max}${shared}`;
  $("updated").textContent = "updated " + new Date().toISOString().slice(11, 19) + " UTC";
}

function windowCell(w) {
  if (!w || w.utilization === null || w.utilization === undefined) return el("td", { class: "muted" }, "no reading");
  const label = Math.round(w.utilization * 100) + "%" + (w.reset ? " · resets " + when(w.reset) : "");
  return el("td", {}, bar(w.utilization, label));
}

function renderAccounts(accounts) {
  const body = $("accounts").tBodies[0];
  body.replaceChildren(...accounts.map((a) => {
    const q = a.quota || {};
    const state = el("td", { class: "state-" + a.state }, a.state);
    if (a.reason) state.append(el("div", { class: "muted" }, a.reason));
    if (a.cooldown_until) state.append(el("div", { class: "muted" }, "until " + when(a.cooldown_until)));
    return el("tr", { "data-account": a.name },
      el("td", {}, a.name, el("div", { class: "muted" }, a.kind + " · " + a.id)),
      state,
      el("td", { class: "num" }, String(a.in_flight)),
      el("td", { class: "num" }, String(a.queued)),
      windowCell(q.five_hour),
      windowCell(q.seven_day),
      el("td", {}, a.token_expires_at ? when(a.token_expires_at) : "—"));
  }));
}

function renderUsage(u) {
  if (!u.enabled) {
    $("usage-panel").replaceChildren(el("h2", {}, "Usage and cost"), el("p", { class: "muted" }, "the usage ledger is off"));
    return;
  }
  const by = $("by").value;
  const metric = $("metric").value;
  $("hourly-scope").textContent = "(" + u.hourly_scope + ")";
  $("daily-scope").textContent = "(" + u.daily_scope + ")";
  // One colour per label over both charts: the labels largest over 30 days first.
  const colors = new Map();
  const sum = (s) => s[metric].reduce((a, b) => a + b, 0);
  const labels = [...(u.daily[by] || []), ...(u.hourly[by] || [])]
    .map((s) => [s.name, sum(s)])
    .sort((a, b) => b[1] - a[1]);
  for (const [name] of labels) {
    if (!colors.has(name) && colors.size < COLORS.length - 1) colors.set(name, COLORS[colors.size]);
  }
  drawChart($("hourly"), u.hourly, by, metric, 3600, colors);
  drawChart($("daily"), u.daily, by, metric, 86400, colors);
  $("legend").replaceChildren(...[...colors].map(([name, color]) => {
    const swatch = el("i");
    swatch.style.background = color;
    return el("span", {}, swatch, name);
  }));
}

function format(metric, v) {
  return metric === "cost_nano_usd" ? usd(v, v >= 1e9 ? 2 : 4) : number(v);
}

// A stacked bar chart of `chart[by]`'s series in `metric`, slot by slot: the 7 largest
// series, the rest as "other".
function drawChart(box, chart, by, metric, slotSecs, colors) {
  // The labels that have a colour, in their order; the rest as "other".
  const series = chart[by] || [];
  const top = series.filter((s) => colors.has(s.name));
  const rest = series.filter((s) => !colors.has(s.name));
  if (rest.length) {
    const other = { name: "other", [metric]: new Array(chart.count).fill(0) };
    for (const s of rest) s[metric].forEach((v, i) => { other[metric][i] += v; });
    top.push(other);
    colors.set("other", COLORS[COLORS.length - 1]);
  }
  const totals = new Array(chart.count).fill(0);
  for (const s of top) s[metric].forEach((v, i) => { totals[i] += v; });
  const max = Math.max(1, ...totals);
  const W = 960, H = 180, left = 70, bottom = 20, plotH = H - bottom - 8, slotW = (W - left) / chart.count;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "chart" });
  for (const f of [0, 0.5, 1]) {
    const y = 8 + plotH * (1 - f);
    root.append(svg("line", { x1: left, x2: W, y1: y, y2: y, stroke: "#e3e6ea" }));
    const label = svg("text", { x: left - 6, y: y + 3, "text-anchor": "end" });
    label.textContent = format(metric, max * f);
    root.append(label);
  }
  for (let i = 0; i < chart.count; i++) {
    let y = 8 + plotH;
    const start = new Date((chart.first + i) * slotSecs * 1000).toISOString();
    for (const s of top) {
      const v = s[metric][i];
      if (!v) continue;
      const h = (v / max) * plotH;
      y -= h;
      const rect = svg("rect", { x: left + i * slotW + 1, y, width: Math.max(1, slotW - 2), height: h, fill: colors.get(s.name) });
      const tip = svg("title");
      tip.textContent = `${s.name} ${start.slice(0, slotSecs === 3600 ? 13 : 10)}: ${format(metric, v)}`;
      rect.append(tip);
      root.append(rect);
    }
    if (i % (slotSecs === 3600 ? 3 : 5) === 0) {
      const t = svg("text", { x: left + i * slotW + slotW / 2, y: H - 5, "text-anchor": "middle" });
      t.textContent = slotSecs === 3600 ? start.slice(11, 13) + ":00" : start.slice(5, 10);
      root.append(t);
    }
  }
  const total = totals.reduce((a, b) => a + b, 0);
  box.replaceChildren(root);
  box.setAttribute("data-total", String(total));
}

function budgetLine(b) {
  const f = b.limit ? b.used / b.limit : 0;
  const text = b.usd ? `${usd(b.used, 2)} of ${usd(b.limit, 2)}` : `${number(b.used)} of ${number(b.limit)} tokens`;
  const name = b.budget.replace("_usd", "").replace("_tokens", "");
  return el("span", { class: "budget" }, bar(f, `${name}: ${text}${b.resets_at ? " · resets " + when(b.resets_at) : ""}`));
}

function renderKeys(k) {
  $("keys-scope").textContent = k.enabled ? `(since ${k.month_since}, ${k.scope})` : "";
  const body = $("keys").tBodies[0];
  body.replaceChildren(...(k.keys || []).map((key) => {
    const m = key.month;
    const budgets = key.budgets.length ? key.budgets.map(budgetLine) : [el("span", { class: "muted" }, "no budget")];
    return el("tr", { "data-key": key.name },
      el("td", {}, key.name, el("div", { class: "muted" }, key.id)),
      el("td", { class: "num" }, usd(m.cost_nano_usd) + (m.unpriced_requests ? ` + ${m.unpriced_requests} unpriced` : "")),
      el("td", { class: "num" }, number(m.total_tokens)),
      el("td", { class: "num" }, number(m.requests)),
      el("td", {}, ...budgets));
  }));
}

function renderTrouble(t) {
  const h = t.health || {};
  const parts = [h.ready ? "ready" : "not ready", h.accounts_available ? "accounts available" : "no account available"];
  if (h.threads_failing && h.threads_failing.length) parts.push("threads failing: " + h.threads_failing.join(", "));
  if (h.reload_error) parts.push("config: " + h.reload_error);
  if (h.state) parts.push(h.state.backend === "redis" ? "Redis " + h.state.redis + (h.state.error ? " (" + h.state.error + ")" : "") : "local state");
  $("trouble-health").textContent = parts.join(" · ");
  const body = $("trouble").tBodies[0];
  const rows = (t.recent || []).map((r) => el("tr", {},
    el("td", {}, when(r.time)),
    el("td", { class: "num" }, String(r.status)),
    el("td", {}, r.client),
    el("td", {}, r.account),
    el("td", {}, r.model || ""),
    el("td", { class: "wrap" }, [r.error, ...r.failover.map((f) => "failed over: " + f)].filter(Boolean).join(" · "))));
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "6", class: "muted" }, "nothing went wrong recently"))]));
}

async function login(event) {
  event.preventDefault();
  const key = $("login-key").value.trim();
  const r = await fetch("/dashboard/login", { method: "POST", credentials: "same-origin", headers: { "x-api-key": key } });
  $("login-key").value = "";
  if (r.ok) {
    const answer = await r.json().catch(() => ({}));
    if (!(await signedIn())) {
      $("login-error").textContent = answer.secure_cookie
        ? "the key is right, but the browser dropped the session cookie: it is Secure and this page is plain HTTP. Use HTTPS (a TLS proxy in front), or the admin listener on this machine."
        : "the key is right, but the browser did not keep the session cookie";
      return;
    }
    $("login-error").textContent = "";
    load();
  } else {
    const body = await r.json().catch(() => ({}));
    $("login-error").textContent = (body.error && body.error.message) || "sign-in failed (HTTP " + r.status + ")";
  }
}

async function logout() {
  await fetch("/dashboard/logout", { method: "POST", credentials: "same-origin" });
  load();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("by").addEventListener("change", () => data && renderUsage(data.usage));
  $("metric").addEventListener("change", () => data && renderUsage(data.usage));
  load();
});
