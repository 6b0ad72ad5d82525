// labelgw dashboard: polls the admin JSON view (/api/state) every second and redraws. Plain DOM, no framework.
// Every value from the gateway is put in the page as text (textContent), never as HTML: container names and
// label values come from whoever starts containers.
"use strict";

const PERIOD_MS = 1000;
// Per backend id: the counters of the previous update, for requests per second and error rate.
let previous = new Map();

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, String(value));
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Columns of numbers: right-aligned, headers too.
const NUMERIC = new Set(["traffic share", "sticky clients", "ready backends", "window requests", "window errors", "window p99 ms", "latency ms", "in flight", "req/s", "errors", "requests", "weight"]);

function table(headers, rows, attrs) {
  const head = el("tr", {}, ...headers.map((h) => el("th", { scope: "col", class: NUMERIC.has(h) ? "num" : null }, h)));
  return el("table", attrs, el("thead", {}, head), el("tbody", {}, ...rows));
}

function fixed(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

// What a backend's row says about whether it gets traffic, and why not.
function backendState(b) {
  if (b.ready) return b.slow_start !== null && b.slow_start < 1 ? ["ready", "ready (slow start " + Math.round(b.slow_start * 100) + " %)"] : ["ready", "ready"];
  if (!b.container_ready) {
    if (b.docker_health && b.docker_health !== "healthy") return ["down", "Docker health: " + b.docker_health];
    return ["down", "stopped"];
  }
  if (b.ejected) return ["ejected", "ejected " + fixed(b.ejected_for, 0) + " s more (" + b.ejections + "×)"];
  if (b.health && b.health !== "healthy") return ["down", "health check: " + b.health];
  return ["down", "not ready"];
}

function rates(b, now) {
  const before = previous.get(b.id);
  if (!before || now <= before.time) return [null, null];
  const seconds = now - before.time;
  const requests = b.requests - before.requests;
  const errors = b.errors - before.errors;
  if (requests < 0 || errors < 0) return [null, null];
  return [requests / seconds, requests > 0 ? (100 * errors) / requests : null];
}

// A version's canary state: a "cut" badge and the reason, "stable" for the reference, else its limits.
function canaryCell(canary) {
  if (!canary) return "–";
  if (canary.cut) return el("span", {}, el("span", { class: "badge badge-cut", title: canary.reason }, "cut"), " ", canary.reason);
  if (canary.stable) return "stable (reference)";
  const limits = [];
  if (canary.max_error_rate !== null) limits.push("errors +" + fixed(100 * canary.max_error_rate, 1) + " %");
  if (canary.max_latency_ratio !== null) limits.push("p99 ×" + canary.max_latency_ratio);
  return limits.length ? "watched: " + limits.join(", ") : "–";
}

// The service's middlewares (labelgw.middleware.chain), as the admin view describes them; null without any.
function middlewareLine(mw) {
  if (!mw) return null;
  const parts = [];
  if (mw.ratelimit) parts.push("rate limit " + fixed(mw.ratelimit.rate_per_second, 2) + "/s, burst " + mw.ratelimit.burst +
    " by " + mw.ratelimit.key + ": " + mw.ratelimit.keys + " keys, " + mw.ratelimit.limited + " limited");
  if (mw.breaker) parts.push("breaker " + mw.breaker.state + " (" + mw.breaker.window_failures + " of " +
    mw.breaker.window_requests + " failed in its window, opened " + mw.breaker.opened + "×)");
  if (mw.concurrency) parts.push("max in flight " + mw.concurrency.max_inflight + ": " + mw.concurrency.active + " active, " +
    mw.concurrency.pending + " / " + mw.concurrency.max_pending + " waiting, " + mw.concurrency.rejected + " turned away, " +
    mw.concurrency.timeouts + " timed out");
  if (mw.fallback) parts.push("fallback " + (mw.fallback.service ? "to service " + mw.fallback.service : "status " + mw.fallback.status) +
    ": used " + mw.fallback.used + "×");
  return parts.length ? el("p", { class: "middleware", "data-field": "middleware" }, "middlewares: " + parts.join(" · ")) : null;
}

function serviceCard(name, service, routes, now) {
  const where = routes.filter((r) => r.service === name);
  const routeList = el("ul", { class: "routes" }, ...where.map((r) =>
    el("li", {}, el("code", {}, r.scheme + "://" + r.host + r.path), r.strip_prefix ? " (prefix stripped)" : "")));
  const versionNames = Object.keys(service.versions).sort();
  const versioned = versionNames.length > 1 || (versionNames.length === 1 && versionNames[0] !== "");
  const versionTable = versioned ? table(
    ["version", "traffic share", "sticky clients", "ready backends", "window requests", "window errors", "window p99 ms", "canary"],
    versionNames.map((v) => {
      const entry = service.versions[v];
      // Canary analysis (labelgw.core.canary): the version's sliding window, and a cut with its reason.
      const canary = (service.canary || {})[v];
      return el("tr", { "data-version": v, "data-cut": canary && canary.cut ? "true" : "false", class: canary && canary.cut ? "cut" : null },
        el("td", {}, v || "(none)"),
        el("td", { class: "num" }, fixed(entry.share, 1) + " %"),
        el("td", { class: "num" }, entry.sticky_clients === undefined ? "–" : entry.sticky_clients),
        el("td", { class: "num" }, entry.ready + " / " + entry.backends.length),
        el("td", { class: "num", "data-field": "window-requests" }, canary ? canary.requests : "–"),
        el("td", { class: "num", "data-field": "window-errors" }, canary && canary.requests ? fixed(100 * canary.error_rate, 1) + " %" : "–"),
        el("td", { class: "num", "data-field": "window-p99" }, canary ? fixed(canary.p99_ms, 1) : "–"),
        el("td", { "data-field": "canary" }, canaryCell(canary)));
    }),
    { class: "versions" }) : null;
  const rows = service.backends.map((b) => {
    const [state, text] = backendState(b);
    const [rps, errorRate] = rates(b, now);
    return el("tr", { "data-backend": b.container, "data-state": state, class: "state-" + state },
      el("td", {}, b.container),
      el("td", {}, el("code", {}, b.address)),
      versioned ? el("td", {}, b.version || "–") : null,
      el("td", { class: "state", "data-field": "health" }, text),
      el("td", { class: "num", "data-field": "latency" }, fixed(b.latency_ms, 1)),
      el("td", { class: "num", "data-field": "in-flight" }, b.in_flight),
      el("td", { class: "num", "data-field": "rps" }, fixed(rps, 1)),
      el("td", { class: "num", "data-field": "error-rate" }, errorRate === null ? "–" : fixed(errorRate, 1) + " %"),
      el("td", { class: "num", "data-field": "requests" }, b.requests),
      el("td", { class: "num", "data-field": "weight" }, b.weight));
  });
  const headers = ["backend", "address"].concat(versioned ? ["version"] : [],
    ["health", "latency ms", "in flight", "req/s", "errors", "requests", "weight"]);
  const summary = service.ready + " of " + service.total + " ready" + (service.ejected ? ", " + service.ejected + " ejected" : "") + " · balancer " + service.balancer;
  return el("article", { class: "service", "data-service": name },
    el("h2", {}, name, el("span", { class: "summary" }, summary)),
    routeList, middlewareLine(service.middleware), versionTable, table(headers, rows, { class: "backends" }));
}

function render(view) {
  const now = view.time;
  const names = Object.keys(view.services).sort();
  const services = document.getElementById("services");
  services.replaceChildren(...(names.length ? names.map((n) => serviceCard(n, view.services[n], view.routes, now))
    : [el("p", { class: "note" }, "No service is routed yet: start a container with a labelgw.service label.")]));
  const skipped = document.getElementById("skipped");
  skipped.replaceChildren(view.rejections.length ? table(["container", "label", "value", "reason"],
    view.rejections.map((r) => el("tr", { "data-skipped": r.container },
      el("td", {}, r.container), el("td", {}, el("code", {}, r.label)), el("td", {}, el("code", {}, r.value)),
      el("td", {}, r.reason))), { class: "skipped" }) : el("p", { class: "note" }, "None."));
  const next = new Map();
  let ready = 0, total = 0;
  for (const name of names) {
    for (const b of view.services[name].backends) {
      next.set(b.id, { time: now, requests: b.requests, errors: b.errors });
      total += 1;
      if (b.ready) ready += 1;
    }
  }
  previous = next;
  const status = document.getElementById("status");
  status.dataset.state = "live";
  status.textContent = "live · " + names.length + (names.length === 1 ? " service · " : " services · ") + ready + " of " + total + " backends ready · updated " + new Date().toLocaleTimeString();
}

async function poll() {
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (error) {
    const status = document.getElementById("status");
    status.dataset.state = "error";
    status.textContent = "not updating: " + error.message + " (retrying every second)";
  }
  setTimeout(poll, PERIOD_MS);
}

async function explain(event) {
  event.preventDefault();
  const out = document.getElementById("explain-result");
  const answer = document.getElementById("explain-answer");
  const query = new URLSearchParams({ url: document.getElementById("explain-url").value });
  const version = document.getElementById("explain-version").value.trim();
  if (version) query.set("version", version);
  try {
    const response = await fetch("/explain?" + query.toString(), { cache: "no-store" });
    const view = await response.json();
    answer.textContent = view.answer || view.error || "";
    out.textContent = JSON.stringify(view, null, 2);
  } catch (error) {
    answer.textContent = "explain failed: " + error.message;
  }
}

document.getElementById("explain-form").addEventListener("submit", explain);
poll();
