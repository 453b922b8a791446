// tunepipe ui: the page. No framework, no CDN: DOM built with textContent only (nothing a run
// folder holds is ever parsed as HTML), charts drawn as SVG, live data from server-sent events.
"use strict";

window.tunepipeLoadedAt = window.tunepipeLoadedAt || Date.now(); // tests: the page never reloads

const $main = document.getElementById("main");
let cleanup = [];
let routeGen = 0; // a page's awaits that return after the user moved on do nothing

function el(tag, attrs, ...children) {
  const ns = ["svg", "polyline", "line", "text", "g", "circle"].includes(tag)
    ? "http://www.w3.org/2000/svg" : null;
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.setAttribute("class", v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k === "value") e.value = v;
    else if (k === "checked") e.checked = !!v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

async function api(path, opts = {}) {
  const r = await fetch(path, {
    credentials: "same-origin",
    ...opts,
    headers: { "X-Tunepipe-UI": "1", "Content-Type": "application/json", ...(opts.headers || {}) },
  });
  let body = {};
  try { body = await r.json(); } catch (_) { body = { error: r.statusText }; }
  if (!r.ok) {
    const err = new Error(body.error || r.statusText);
    err.fields = body.fields || [];
    err.status = r.status;
    throw err;
  }
  return body;
}
const post = (path, body) => api(path, { method: "POST", body: JSON.stringify(body || {}) });

function dur(s) {
  if (s === null || s === undefined) return "—";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(2)} h`;
}
const num = (v) => (typeof v === "number" ? (Math.abs(v) < 1000 ? v.toFixed(4) : v.toFixed(1)) : "—");
const badge = (status) => el("span", { class: `badge ${status || ""}`, dataset: { status: status || "" } }, status || "?");

// ------------------------------------------------------------------ router

function route() {
  cleanup.forEach((f) => f());
  cleanup = [];
  routeGen += 1;
  const h = location.hash || "#/";
  const m = h.match(/^#\/run\/([^/]+)$/);
  if (m) return runPage(decodeURIComponent(m[1]));
  if (h === "#/new") return newRunPage();
  return runsPage();
}
window.addEventListener("hashchange", route);

// ------------------------------------------------------------------ runs list

async function runsPage() {
  const table = el("tbody");
  const root = el("span", { class: "muted" });
  $main.replaceChildren(
    el("h1", {}, "Runs"), el("p", {}, root, " ", el("a", { href: "#/new" }, "Start a run")),
    el("table", { id: "runs" },
      el("thead", {}, el("tr", {}, ["run", "status", "stage", "time used / budget", "best metric", "updated"]
        .map((t) => el("th", {}, t)))),
      table));
  async function refresh() {
    try {
      const data = await api("api/runs");
      root.textContent = `runs folder: ${data.root}`;
      table.replaceChildren(...(data.runs.length ? data.runs.map((r) => el("tr", { dataset: { run: r.name } },
        el("td", {}, el("a", { href: `#/run/${encodeURIComponent(r.name)}` }, r.name)),
        el("td", {}, badge(r.status)),
        el("td", {}, r.stage || "—"),
        el("td", {}, r.status === "unreadable" ? (r.error || "") : `${dur(r.used_s)} / ${r.budget_s ? dur(r.budget_s) : "no limit"}`),
        el("td", {}, r.best ? `${r.best.metric} ${num(r.best.value)} (${r.best.model}, ${r.best.set})` : "—"),
        el("td", { class: "muted" }, r.updated_at || "—"))) :
        [el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No runs here yet: start one."))]));
    } catch (e) { root.textContent = `error: ${e.message}`; }
  }
  const gen = routeGen;
  await refresh();
  if (gen !== routeGen) return;
  const t = setInterval(refresh, 3000);
  cleanup.push(() => clearInterval(t));
}

// ------------------------------------------------------------------ charts

function drawChart(svg, points) {
  const W = 340, H = 170, L = 46, R = 8, T = 8, B = 20;
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.dataset.points = String(points.length);
  svg.append(el("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    el("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  if (!points.length) {
    svg.append(el("text", { x: W / 2 - 30, y: H / 2 }, "no steps yet"));
    return;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += Math.abs(y1) * 0.05 || 1; y0 -= Math.abs(y0) * 0.05 || 1; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - B - T);
  svg.append(el("polyline", { class: "line", points: points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") }));
  if (points.length === 1) svg.append(el("circle", { cx: sx(xs[0]), cy: sy(ys[0]), r: 2.5, fill: "#2f5d8a" }));
  const fmt = (v) => (Math.abs(v) >= 1000 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(1) : v.toPrecision(3));
  svg.append(el("text", { x: 2, y: T + 8 }, fmt(y1)), el("text", { x: 2, y: H - B }, fmt(y0)),
    el("text", { x: L, y: H - 4 }, `step ${x0}`), el("text", { x: W - R - 50, y: H - 4 }, `step ${x1}`));
}

// ------------------------------------------------------------------ run page

async function runPage(name) {
  const enc = encodeURIComponent(name);
  const series = {}; // stage -> key -> [[step, value]]
  const charts = {}; // stage -> key -> {svg, last}
  let info = null;
  let history = [];

  const head = el("div");
  const timeline = el("div", { class: "timeline", id: "timeline" });
  const chartsBox = el("div", { id: "curves" });
  const rest = el("div");
  const chatBox = el("div", { class: "chat", id: "chat" });
  const output = el("pre", { id: "output" });
  const outputBox = el("div", { hidden: true }, el("h2", {}, "Output of the command the dashboard ran"), output);
  $main.replaceChildren(head, el("h2", {}, "Stages"), timeline, el("h2", {}, "Training curves"), chartsBox,
    el("h2", {}, "Chat"), chatBox, rest, outputBox);

  function ensureCharts() {
    for (const [stage, curves] of Object.entries(info.curves)) {
      charts[stage] = charts[stage] || {};
      let group = chartsBox.querySelector(`[data-stage-group="${stage}"]`);
      if (!group) {
        group = el("div", { dataset: { stageGroup: stage } }, el("h3", {}, info.stage_titles[stage] || stage),
          el("div", { class: "charts" }));
        chartsBox.append(group);
      }
      for (const c of curves) {
        if (charts[stage][c.key]) continue;
        const svg = el("svg", { class: "chart", dataset: { stage, key: c.key, points: "0" } });
        const last = el("span");
        group.lastChild.append(el("div", { class: "chart-box" }, el("div", { class: "title" }, el("span", {}, c.label), last), svg));
        charts[stage][c.key] = { svg, last };
        redraw(stage, c.key);
      }
    }
  }
  function redraw(stage, key) {
    const c = charts[stage] && charts[stage][key];
    if (!c) return;
    const pts = ((series[stage] || {})[key]) || [];
    drawChart(c.svg, pts);
    c.last.textContent = pts.length ? `step ${pts[pts.length - 1][0]}: ${pts[pts.length - 1][1].toPrecision(4)}` : "";
    // The group hides curves the trainer never logs (e.g. grad_norm of a stage without it).
    c.svg.parentNode.hidden = !pts.length && key !== "loss";
  }
  const SKIP = new Set(["step", "epoch", "elapsed_s", "max_steps", "t0"]);
  function addRows(stage, rows, reset) {
    series[stage] = reset ? {} : (series[stage] || {});
    for (const r of rows) {
      if (typeof r.step !== "number") continue;
      for (const [k, v] of Object.entries(r)) {
        if (typeof v !== "number" || SKIP.has(k)) continue;
        const pts = (series[stage][k] = series[stage][k] || []);
        while (pts.length && pts[pts.length - 1][0] >= r.step) pts.pop(); // a step logged again
        pts.push([r.step, v]);
      }
    }
    for (const key of Object.keys(charts[stage] || {})) redraw(stage, key);
  }

  let actionMsg = "";
  let stopSent = false;
  let lastStatus = null;
  function renderHead() {
    if (lastStatus !== null && lastStatus !== info.status) actionMsg = ""; // said what it had to say
    lastStatus = info.status;
    const stopBtn = el("button", { id: "btn-stop", disabled: !info.stoppable || stopSent, onclick: async () => {
      stopBtn.disabled = true;
      try {
        await post(`api/runs/${enc}/stop`);
        stopSent = true;
        msg.textContent = actionMsg = "SIGTERM sent: the run saves a checkpoint and stops (exit 75)";
      } catch (e) { msg.textContent = actionMsg = e.message; stopBtn.disabled = false; }
    } }, "Stop");
    if (!info.stoppable) stopSent = false;
    const resumeBtn = el("button", { id: "btn-resume", class: "secondary", disabled: !info.resumable || info.status === "done", onclick: async () => {
      resumeBtn.disabled = true;
      try { await post(`api/runs/${enc}/resume`); actionMsg = `running again: ${info.command}`; await reload(); }
      catch (e) { msg.textContent = actionMsg = e.message; resumeBtn.disabled = false; }
    } }, info.status === "done" ? "Done" : "Resume");
    const msg = el("span", { class: "muted", id: "action-msg" }, actionMsg);
    const p = info.progress;
    head.replaceChildren(
      el("h1", {}, info.name, " ", el("span", { id: "run-status" }, badge(info.status))),
      el("div", { class: "bar" },
        el("div", { class: "item" }, el("b", {}, "stage"), el("span", { id: "current-stage" }, info.stage || "—")),
        el("div", { class: "item" }, el("b", {}, "progress"), p ? `step ${p.step} / ${p.max_steps}` : "—"),
        el("div", { class: "item" }, el("b", {}, "stage ETA"), p && p.seconds_left !== null ? dur(p.seconds_left) : "—"),
        el("div", { class: "item" }, el("b", {}, "time used / budget"), `${dur(info.used_s)} / ${info.budget_s ? dur(info.budget_s) : "no limit"}`),
        el("div", { class: "item" }, el("b", {}, "budget left"), info.budget_left_s !== null ? dur(info.budget_left_s) : "—"),
        el("div", { class: "item" }, el("b", {}, "best"), info.best ? `${info.best.metric} ${num(info.best.value)} (${info.best.model})` : "—"),
        stopBtn, resumeBtn, msg),
      info.command ? el("div", { class: "muted" }, "command: ", el("code", {}, info.command)) : null);
    timeline.replaceChildren(...info.timeline.map((s) => el("div", { class: `stage ${s.status || ""}`, dataset: { stage: s.name, status: s.status || "" } },
      el("div", { class: "name" }, s.title, " ", badge(s.status)),
      el("div", { class: "muted" }, s.seconds !== null && s.seconds !== undefined ? dur(s.seconds) : ""),
      el("div", { class: "gates" }, ...(s.gates || []).map((g) => el("div", { class: `gate ${g.passed ? "pass" : "fail"}`, title: g.detail },
        `${g.passed ? "✓" : "✗"} ${g.name}`))),
      s.error ? el("div", { class: "field-error" }, s.error.slice(0, 300)) : null)));
  }

  function table(rows, numeric) {
    if (!rows || !rows.length) return el("p", { class: "muted" }, "—");
    return el("table", {}, el("thead", {}, el("tr", {}, rows[0].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.slice(1).map((r) => el("tr", {}, r.map((c, i) => {
        const s = String(c);
        const isNum = numeric && i >= 2 && /^[-+]?[\d.]+|—/.test(s);
        return el("td", { class: `${isNum ? "num" : ""} ${s.includes("⚠") ? "worse" : ""}` }, s);
      })))));
  }

  let restKey = "";
  let reportFrame = null;
  function renderRest() {
    const key = JSON.stringify([info.warnings, info.metrics, info.samples, info.data, info.report, info.config, info.status]);
    if (key === restKey) return; // unchanged: keep open <details>, scroll and the report frame
    restKey = key;
    if (info.report && !reportFrame) reportFrame = el("iframe", { class: "report", src: `runs/${enc}/report/report.html`, title: "report" });
    else if (info.report && reportFrame && info.status !== "running") reportFrame.src = `runs/${enc}/report/report.html`;
    const d = info.data;
    const sources = [["stage", "split", "file", "format", "in", "accepted", "rejected"],
      ...d.sources.map((s) => [s.stage, s.split, String(s.file).split("/").pop(), s.format, s.rows_in, s.rows_accepted, s.rows_rejected])];
    const splits = [["split", "rows", "tokens", "mean", "p95", "max", "truncated"],
      ...Object.entries(d.splits).map(([n, s]) => [n, s.rows, s.tokens, s.mean, s.p95, s.max, s.truncated || 0])];
    const rejects = [["file", "line", "reason"], ...d.rejects.map((r) => [String(r.file || "").split("/").pop(), r.line ?? "", r.reason || ""])];
    const samples = Object.entries(info.samples).map(([set, rows]) => el("div", {}, el("h3", {}, set), el("div", { class: "samples" }, table(rows, false))));
    rest.replaceChildren(
      el("h2", {}, "Warnings"),
      info.warnings.length ? el("ul", { class: "warnings", id: "warnings" }, info.warnings.map((w) => el("li", {}, w))) : el("p", { class: "muted" }, "none"),
      el("h2", {}, "Metrics"), el("div", { id: "metrics" }, table(info.metrics, true)),
      el("h2", {}, "Samples"), ...(samples.length ? samples : [el("p", { class: "muted" }, "— (after eval)")]),
      el("h2", {}, "Data"), el("div", { class: "two" }, el("div", {}, table(sources, true)), el("div", {}, table(splits, true))),
      d.rejects_total ? el("details", {}, el("summary", {}, `${d.rejects_total} rejected rows (file, line, reason)`), table(rejects, false)) : el("p", { class: "muted" }, "no rejected rows"),
      el("h2", {}, "Report"),
      info.report ? el("div", {}, el("p", {}, el("a", { href: `runs/${enc}/report/report.html`, target: "_blank" }, "open report.html")),
        reportFrame) : el("p", { class: "muted" }, "— (the report stage writes it)"),
      el("h2", {}, "Config"), el("details", {}, el("summary", {}, "config.resolved.yaml"), el("pre", {}, info.config || "—")));
  }

  function renderChat() {
    history = []; // a new panel, a new conversation
    const select = el("select", { id: "chat-stage" }, info.chat_models.map((m) => el("option", { value: m }, m)));
    select.value = info.chat_models[info.chat_models.length - 1];
    const log = el("div", { class: "log", id: "chat-log" });
    const input = el("textarea", { id: "chat-input", rows: 2, placeholder: "Message (Enter sends, Shift+Enter new line)" });
    const send = el("button", { id: "chat-send" }, "Send");
    const reset = el("button", { class: "secondary", onclick: () => { history = []; log.replaceChildren(); } }, "New chat");
    async function ask() {
      const text = input.value.trim();
      if (!text) return;
      input.value = "";
      send.disabled = true;
      log.append(el("div", { class: "msg user" }, el("span", { class: "who" }, "you"), text));
      const out = el("span", { class: "text" });
      const bubble = el("div", { class: "msg assistant", dataset: { done: "0" } }, el("span", { class: "who" }, select.value), out);
      log.append(bubble);
      try {
        const r = await fetch(`api/runs/${enc}/chat`, { method: "POST", credentials: "same-origin",
          headers: { "X-Tunepipe-UI": "1", "Content-Type": "application/json" },
          body: JSON.stringify({ stage: select.value, prompt: text, history }) });
        if (!r.ok) { const b = await r.json().catch(() => ({})); throw new Error(b.error || r.statusText); }
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            const frame = buf.slice(0, i); buf = buf.slice(i + 2);
            const ev = (frame.match(/^event: (.*)$/m) || [])[1];
            const data = JSON.parse((frame.match(/^data: (.*)$/m) || [, "{}"])[1]);
            if (ev === "token") { out.textContent += data.text; bubble.dataset.streamed = String(Number(bubble.dataset.streamed || 0) + 1); }
            else if (ev === "status") out.textContent = "";
            else if (ev === "done") { out.textContent = data.text; history.push({ role: "user", content: text }, { role: "assistant", content: data.text }); }
            else if (ev === "error") throw new Error(data.message);
          }
          log.scrollTop = log.scrollHeight;
        }
      } catch (e) {
        out.textContent = `error: ${e.message}`;
        bubble.classList.add("error");
      } finally {
        bubble.dataset.done = "1";
        send.disabled = false;
      }
    }
    send.addEventListener("click", ask);
    input.addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); ask(); } });
    chatBox.replaceChildren(el("div", { class: "row" }, el("label", {}, "model ", select), reset), log, el("div", { class: "row" }, input, send));
  }

  let chatModels = "";
  async function reload() {
    try {
      info = await api(`api/runs/${enc}`);
    } catch (e) {
      if (!info) head.replaceChildren(el("h1", {}, name), el("p", { class: "field-error" }, e.message));
      return;
    }
    renderHead();
    ensureCharts();
    renderRest();
    outputBox.hidden = !info.output;
    if (output.textContent !== (info.output || "")) {
      const atEnd = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
      output.textContent = info.output || "";
      if (atEnd) output.scrollTop = output.scrollHeight;
    }
    if (chatModels !== info.chat_models.join()) { chatModels = info.chat_models.join(); renderChat(); }
  }
  const gen = routeGen;
  await reload();
  // A run just started may not have its folder yet: look again for a while.
  for (let i = 0; !info && i < 60 && gen === routeGen; i++) {
    await new Promise((r) => setTimeout(r, 1000));
    await reload();
  }
  if (!info || gen !== routeGen) return;

  const conn = document.getElementById("conn");
  const es = new EventSource(`api/runs/${enc}/events`);
  let pending = null;
  es.addEventListener("open", () => { conn.textContent = "● live"; });
  es.addEventListener("error", () => { conn.textContent = "○ reconnecting"; });
  es.addEventListener("log", (e) => {
    const d = JSON.parse(e.data);
    if (!charts[d.stage]) ensureCharts();
    addRows(d.stage, d.rows, d.reset);
  });
  es.addEventListener("gone", () => {
    es.close();
    head.append(el("p", { class: "field-error" }, "this run folder was removed"));
  });
  es.addEventListener("state", () => {
    clearTimeout(pending);
    pending = setTimeout(reload, 150); // coalesce bursts of state writes
  });
  // The header (step, ETA) follows the curves between state changes.
  const t = setInterval(() => { if (info && info.status === "running") reload(); }, 4000);
  cleanup.push(() => { es.close(); clearInterval(t); clearTimeout(pending); conn.textContent = ""; });
}

// ------------------------------------------------------------------ start a run

async function newRunPage() {
  const list = el("datalist", { id: "configs" });
  const path = el("input", { type: "text", id: "cfg-path", list: "configs", placeholder: "examples/quickstart.yaml" });
  const overrides = el("textarea", { id: "cfg-overrides", rows: 4, placeholder: "sft.max_steps=50\nsft.learning_rate=1e-4" });
  const smoke = el("input", { type: "checkbox", id: "cfg-smoke" });
  const pathErr = el("div", { class: "field-error", id: "err-config" });
  const overErr = el("div", { id: "err-overrides" });
  const result = el("div", { id: "cfg-result" });
  const validateBtn = el("button", { id: "btn-validate", class: "secondary", onclick: () => check(false) }, "Validate");
  const startBtn = el("button", { id: "btn-start", onclick: () => check(true) }, "Start");
  const project = el("span", { class: "muted" });
  $main.replaceChildren(el("h1", {}, "Start a run"), el("p", {}, project),
    el("div", { class: "form two" },
      el("div", {},
        el("label", { for: "cfg-path" }, "Config file"), path, list, pathErr,
        el("label", { for: "cfg-overrides" }, "Overrides (KEY=VALUE, one per line)"), overrides, overErr,
        el("label", {}, smoke, " smoke run (tiny subset, few steps, same code path; writes <output_dir>-smoke)"),
        el("p", {}, validateBtn, " ", startBtn)),
      result));
  api("api/configs").then((d) => {
    project.textContent = `configs are read from ${d.project}`;
    list.replaceChildren(...d.configs.map((c) => el("option", { value: c })));
    if (!path.value && d.configs.length) path.placeholder = d.configs[0];
  }).catch(() => {});

  function body() {
    return { config: path.value.trim(), overrides: overrides.value.split("\n").map((s) => s.trim()).filter(Boolean), smoke: smoke.checked };
  }
  function show(res) {
    const errs = res.errors || [];
    pathErr.textContent = errs.filter((e) => e.field === "config").map((e) => e.message).join("\n");
    const lines = body().overrides;
    overErr.replaceChildren(...errs.filter((e) => e.field === "override").map((e) =>
      el("div", { class: "field-error", dataset: { index: e.index } }, `${lines[e.index] || ""} — ${e.message}`)));
    const keyErrs = errs.filter((e) => e.field === "key");
    const yaml = (res.yaml || "").split("\n");
    const byLine = {};
    const loose = [];
    for (const e of keyErrs) { if (e.line) (byLine[e.line] = byLine[e.line] || []).push(e); else loose.push(e); }
    const view = el("div", { class: "yaml", id: "cfg-yaml" }, yaml.map((tx, i) => {
      const n = i + 1;
      const here = byLine[n] || [];
      return [el("div", { class: `ln ${here.length ? "bad" : ""}`, dataset: { line: n } }, el("span", { class: "no" }, n), el("span", { class: "tx" }, tx)),
        ...here.map((e) => el("div", { class: "ann field-error", dataset: { key: e.key } }, `↑ ${e.key}: ${e.message}`))];
    }));
    result.replaceChildren(
      res.ok ? el("div", { class: "ok-box", id: "cfg-ok" }, `valid: run folder ${res.run}, stages ${res.pipeline.join(" → ")}`, el("br"), el("code", {}, res.command)) : null,
      ...loose.map((e) => el("div", { class: "field-error", dataset: { key: e.key } }, `${e.key || "config"}: ${e.message}`)),
      res.yaml ? view : null);
  }
  async function check(start) {
    validateBtn.disabled = startBtn.disabled = true;
    try {
      const res = await post("api/validate", body());
      show(res);
      if (start && res.ok) {
        const r = await post("api/start", body());
        location.hash = `#/run/${encodeURIComponent(r.run)}`;
      }
    } catch (e) {
      if (e.fields && e.fields.length) show({ errors: e.fields });
      else pathErr.textContent = e.message;
    } finally { validateBtn.disabled = startBtn.disabled = false; }
  }
}

route();
