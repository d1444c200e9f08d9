// bertstream dashboard: renders the summary that /api/events pushes.
// Every value from Redis is user content or derived from it, so it only ever
// reaches the page through textContent and attributes, never as markup (the
// server's Content-Security-Policy also requires Trusted Types, which makes
// innerHTML with a string throw).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const LABELS = ["negative", "neutral", "positive"];
const CLASS = { negative: "neg", neutral: "neu", positive: "pos" };
const $ = (id) => document.getElementById(id);
let shownIds = new Set();

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

const fmt = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : "–");

function duration(s) {
  if (typeof s !== "number" || !isFinite(s)) return "–";
  const a = Math.abs(s);
  if (a < 60) return s.toFixed(2) + " s";
  if (a < 3600) return (s / 60).toFixed(1) + " min";
  if (a < 86400) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

// "2026-11-20T10:00:02.417Z" -> "10:00:02" (UTC, as the pipeline writes it).
function clock(iso) {
  const t = Date.parse(iso);
  return isNaN(t) ? String(iso || "") : new Date(t).toISOString().slice(11, 19);
}

function renderTiles(s) {
  $("t-results").textContent = fmt(s.results);
  for (const label of LABELS) $("t-" + label).textContent = fmt(s.labels[label]);
  $("t-dead").textContent = fmt(s.dead_letters);
  $("t-late").textContent = fmt(s.late);
  $("t-rate").textContent = s.tweets_per_second.toFixed(1);
  const lat = s.latency_seconds;
  if (lat) {
    $("t-latency-kind").textContent = lat.kind === "publish->result"
      ? "publish → result latency (p50 / p95)"
      : "event → result latency (p50 / p95; no publish time in results)";
    $("t-latency").textContent = duration(lat.p50) + " / " + duration(lat.p95);
  } else {
    $("t-latency-kind").textContent = "latency";
    $("t-latency").textContent = "–";
  }
  const models = $("t-models");
  models.replaceChildren(...s.model_versions.map((v) =>
    el("span", { class: "chip", title: "results among the recent ones; last at " + (v.last_seen || "?") },
       (v.version || "(none)") + " (" + fmt(v.results) + ")")));
  if (!s.model_versions.length) models.textContent = "–";
  $("scope").textContent = "Totals from " + s.keys.stats_key + "; label counts over the " +
    fmt(s.results_read) + " results read from " + s.keys.stream +
    "; rate, latency and model versions over the most recent of them. " +
    "Channel " + s.keys.channel + ": " + fmt(s.channel_subscribers) + " subscriber(s).";
}

function renderChart(windows) {
  const chart = $("chart");
  $("chart-empty").hidden = windows.length > 0;
  chart.replaceChildren();
  if (!windows.length) return;
  const W = 960, H = 260, left = 40, right = 8, top = 18, bottom = 22;
  const max = Math.max(1, ...windows.map((w) => w.total));
  const step = (W - left - right) / windows.length;
  const barW = Math.max(1, step * 0.8);
  const y = (n) => top + (H - top - bottom) * (1 - n / max);
  for (const n of [0, Math.round(max / 2), max]) {
    chart.append(svg("line", { class: "grid", x1: left, x2: W - right, y1: y(n), y2: y(n) }));
    chart.append(svg("text", { class: "axis", x: left - 4, y: y(n) + 4, "text-anchor": "end" }, n));
  }
  windows.forEach((w, i) => {
    const x = left + i * step + (step - barW) / 2;
    const g = svg("g", { class: "window" + (w.late ? " late" : ""), "data-start": w.start });
    g.append(svg("title", {}, clock(w.start) + "–" + clock(w.end) + " UTC: " +
      LABELS.map((l) => l + " " + w[l]).join(", ") + (w.late ? ", late " + w.late : "")));
    let base = 0;
    for (const label of LABELS) {
      if (!w[label]) continue;
      g.append(svg("rect", { class: CLASS[label], x: x, width: barW,
        y: y(base + w[label]), height: y(base) - y(base + w[label]) }));
      base += w[label];
    }
    if (w.late) {
      const cx = x + barW / 2, top0 = y(base) - 3;
      g.append(svg("path", { class: "late-mark",
        d: `M${cx - 4},${top0 - 6} L${cx + 4},${top0 - 6} L${cx},${top0} Z` }));
      g.append(svg("text", { class: "late-count", x: cx, y: top0 - 8, "text-anchor": "middle" }, w.late));
    }
    chart.append(g);
  });
  const ticks = windows.length < 3 ? [0, windows.length - 1]
    : [0, Math.floor((windows.length - 1) / 2), windows.length - 1];
  const firstDay = (windows[0].start || "").slice(0, 10);
  for (const i of [...new Set(ticks)]) {
    const w = windows[i];
    const day = (w.start || "").slice(0, 10);
    const anchor = i === 0 ? "start" : i === windows.length - 1 ? "end" : "middle";
    chart.append(svg("text", { class: "axis", x: left + i * step + step / 2, y: H - 6,
      "text-anchor": anchor }, (i === 0 || day !== firstDay ? day + " " : "") + clock(w.start)));
  }
}

function renderResults(rows) {
  const seen = new Set();
  const body = $("results").tBodies[0];
  body.replaceChildren(...rows.map((r) => {
    seen.add(r.tweet_id);
    const tr = el("tr", { "data-tweet-id": r.tweet_id });
    if (shownIds.size && !shownIds.has(r.tweet_id)) tr.classList.add("fresh");
    tr.append(el("td", { title: r.event_time }, clock(r.event_time)));
    const label = el("td");
    label.append(el("span", { class: "label " + (CLASS[r.label] ? r.label : "other") }, r.label));
    if (r.late) label.append(el("span", { class: "tag-late", title: "arrived after its window closed" }, "late"));
    tr.append(label);
    tr.append(el("td", {}, typeof r.score === "number" ? r.score.toFixed(2) : "–"));
    tr.append(el("td", { class: "model" }, r.model_version));
    tr.append(el("td", { class: "text" }, r.text));
    return tr;
  }));
  shownIds = seen;
}

function renderDead(rows) {
  $("dead").tBodies[0].replaceChildren(...rows.map((d) => {
    const tr = el("tr");
    tr.append(el("td", { title: d.failed_at }, clock(d.failed_at)));
    tr.append(el("td", {}, d.stage));
    tr.append(el("td", { class: "reason" }, d.reason));
    tr.append(el("td", { class: "text" }, d.raw));
    return tr;
  }));
}

const pct = (x) => (typeof x === "number" ? (100 * x).toFixed(1) + "%" : "–");

function renderRollout(rows) {
  $("rollout-empty").hidden = rows.length > 0;
  $("rollout").tBodies[0].replaceChildren(...rows.map((m) => {
    const tr = el("tr", { "data-version": m.version, class: "state-" + m.state });
    tr.append(el("td", {}, m.version));
    tr.append(el("td", { title: "since " + (m.since || "?") }, m.state));
    tr.append(el("td", {}, m.scored ? fmt(m.scored) : "–"));
    tr.append(el("td", {}, pct(m.agreement)));
    tr.append(el("td", {}, m.scored ? LABELS.map((l) => fmt(m.labels[l])).join(" / ") : "–"));
    tr.append(el("td", {}, typeof m.mean_confidence === "number" ? m.mean_confidence.toFixed(2) : "–"));
    tr.append(el("td", {}, typeof m.mean_batch_seconds === "number" ? m.mean_batch_seconds.toFixed(3) : "–"));
    tr.append(el("td", {}, m.scored || m.errors ? fmt(m.errors) : "–"));
    tr.append(el("td", { class: "reason" }, m.reason));
    return tr;
  }));
}

function render(s) {
  const banner = $("banner");
  const conn = $("conn");
  if (s.redis.ok) {
    banner.hidden = true;
    conn.textContent = "live";
    conn.className = "pill live";
  } else {
    banner.hidden = false;
    banner.textContent = "Redis unavailable since " + clock(s.redis.since) + " UTC (" +
      (s.redis.error || "no answer") + "): retrying; showing the last data read.";
    conn.textContent = "Redis unavailable";
    conn.className = "pill down";
  }
  $("source").textContent = s.redis.url;
  renderTiles(s);
  renderRollout(s.rollout || []);
  renderChart(s.windows);
  renderResults(s.latest_results);
  renderDead(s.latest_dead_letters);
}

function connect() {
  const events = new EventSource("/api/events");
  events.addEventListener("summary", (e) => render(JSON.parse(e.data)));
  events.onerror = () => {
    // EventSource reconnects by itself (the server asks for 2 s).
    $("conn").textContent = "reconnecting to the dashboard…";
    $("conn").className = "pill down";
  };
}

connect();
