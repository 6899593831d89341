// The status page of `loom monitor` (GET /): one self-contained HTML document (inline CSS and vanilla JS, no
// external resources) that fetches /status.json once a second and renders, for the current epoch of the job:
//   - a header: job, epoch, uptime, hang threshold, p99 heartbeat gap, ranks alive, time of the last update
//   - the ranks: node, host, tp/dp rank, state (coloured), step, loss, tokens/s, snapshot version, collectives
//     completed, heartbeat age; each row is <tr id="rank-N" data-state="alive|done|lost|error|silent">
//   - the nodes: ranks per node, how many are alive, their steps and summed throughput
//   - the collective-latency heatmap: one row per rank, one column per "<group> <op>"; a cell shows the rank's
//     mean latency in ms, coloured by its ratio to the column's median (green at or below it, red at 4x)
//   - the link matrix: mean ms of each src -> dst transfer, coloured the same way against the median link
//   - the verdicts (id="verdicts"), newest first: kind, summary, ranks/node/link, detection time, evidence
//   - the monitor's counters: frames, connections, refused (token/epoch/job) and malformed frames
// It keeps showing the last data it got when a fetch fails, and says so in the header.
#include "launch/monitor/server.h"

namespace loom::mon {

std::string status_page_html() {
  return R"PAGE(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Loom monitor</title>
<style>
  :root { --fg: #1d2330; --muted: #6b7385; --line: #dde1e8; --bg: #f6f7f9; --card: #fff;
          --alive: #1f9d55; --done: #3d6fb6; --lost: #d64545; --error: #a01c1c; --silent: #d98b1a; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); }
  header { background: #1d2330; color: #fff; padding: 12px 20px; display: flex; flex-wrap: wrap; align-items: baseline; gap: 8px 24px; }
  header h1 { font-size: 18px; margin: 0; font-weight: 600; }
  header .kv { color: #c3c8d4; }
  header .kv b { color: #fff; font-weight: 600; }
  #conn.ok { color: #8fd6a8; }
  #conn.bad { color: #ff9a9a; font-weight: 600; }
  main { padding: 16px 20px; display: grid; gap: 16px; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); }
  section { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px; overflow-x: auto; }
  section.wide { grid-column: 1 / -1; }
  h2 { font-size: 15px; margin: 0 0 8px; }
  h2 small { color: var(--muted); font-weight: normal; margin-left: 6px; }
  table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
  th, td { padding: 3px 8px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
  th { font-weight: 600; color: var(--muted); font-size: 12px; }
  th.l, td.l { text-align: left; }
  tbody tr:hover { background: #f0f3f8; }
  .state { display: inline-block; min-width: 52px; text-align: center; padding: 0 6px; border-radius: 9px; color: #fff; font-size: 12px; }
  .state-alive { background: var(--alive); } .state-done { background: var(--done); } .state-lost { background: var(--lost); }
  .state-error { background: var(--error); } .state-silent { background: var(--silent); }
  tr[data-state="lost"] td, tr[data-state="error"] td { color: var(--lost); }
  tr[data-state="silent"] td { color: var(--silent); }
  table.heat { width: auto; }
  .heat td.cell { min-width: 72px; }
  .heat th { text-align: center; }
  .empty { color: var(--muted); font-style: italic; }
  .legend { color: var(--muted); font-size: 12px; margin-top: 6px; }
  .legend span { display: inline-block; width: 28px; height: 10px; vertical-align: middle; margin: 0 2px; }
  #verdicts { list-style: none; margin: 0; padding: 0; }
  #verdicts li { border-left: 4px solid var(--lost); background: #fdf3f3; padding: 6px 10px; margin-bottom: 8px; }
  #verdicts .kind { font-weight: 700; margin-right: 8px; }
  #verdicts .meta { color: var(--muted); font-size: 12px; }
  #verdicts pre { margin: 4px 0 0; font-size: 12px; white-space: pre-wrap; }
  .counters { display: grid; grid-template-columns: repeat(auto-fill, minmax(130px, 1fr)); gap: 6px; }
  .counter { border: 1px solid var(--line); border-radius: 4px; padding: 4px 8px; }
  .counter .n { font-size: 18px; font-weight: 600; font-variant-numeric: tabular-nums; }
  .counter .k { color: var(--muted); font-size: 12px; }
  .counter.bad { border-color: var(--lost); } .counter.bad .n { color: var(--lost); }
</style>
</head>
<body>
<header>
  <h1>Loom monitor &middot; <span id="job">&hellip;</span></h1>
  <span class="kv">epoch <b id="epoch">&ndash;</b></span>
  <span class="kv">uptime <b id="uptime">&ndash;</b></span>
  <span class="kv">hang threshold <b id="hang">&ndash;</b></span>
  <span class="kv">p99 gap <b id="p99">&ndash;</b></span>
  <span class="kv">ranks alive <b id="alive">&ndash;</b></span>
  <span class="kv" id="conn">waiting for /status.json&hellip;</span>
</header>
<main>
  <section class="wide"><h2>Ranks</h2>
    <table><thead><tr>
      <th>rank</th><th>node</th><th class="l">host</th><th>pid</th><th>tp</th><th>dp</th><th class="l">state</th>
      <th>step</th><th>loss</th><th>tokens/s</th><th>snapshot</th><th>collectives</th><th>heartbeat age</th>
    </tr></thead><tbody id="ranks"></tbody></table>
  </section>
  <section><h2>Nodes</h2>
    <table><thead><tr>
      <th>node</th><th class="l">host</th><th class="l">ranks</th><th>alive</th><th>steps</th><th>tokens/s</th>
    </tr></thead><tbody id="nodes"></tbody></table>
  </section>
  <section><h2>Verdicts</h2><ol id="verdicts"></ol></section>
  <section class="wide"><h2>Collective latency <small>mean ms per rank; colour: ratio to the column's median</small></h2>
    <div id="heatmap"></div>
    <div class="legend">&le;1&times; <span style="background:hsl(120,60%,82%)"></span><span style="background:hsl(60,60%,82%)"></span>
      <span style="background:hsl(0,60%,82%)"></span> &ge;4&times; median</div>
  </section>
  <section><h2>Links <small>mean ms, src &rarr; dst</small></h2><div id="links"></div></section>
  <section><h2>Monitor</h2><div class="counters" id="counters"></div></section>
</main>
<script>
'use strict';
const $ = (id) => document.getElementById(id);

// el('td', {class: 'l'}, 'text', childNode, ...): text is always inserted as text, never as HTML.
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === 'class') e.className = v;
    else if (k === 'style') e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const kid of kids.flat()) if (kid !== undefined && kid !== null) e.append(kid instanceof Node ? kid : String(kid));
  return e;
}

const num = (x) => typeof x === 'number' && isFinite(x);
function fmt(x, digits) {
  if (!num(x)) return '\u2013';
  return digits === undefined ? x.toLocaleString('en-US') : x.toFixed(digits);
}
function dur(s) {
  if (!num(s)) return '\u2013';
  if (s < 60) return s.toFixed(1) + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' m ' + Math.floor(s % 60) + ' s';
  return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' m';
}
function ms(x) { return !num(x) ? '\u2013' : x < 10 ? x.toFixed(3) : x < 100 ? x.toFixed(2) : x.toFixed(1); }
function median(xs) {
  const v = xs.filter((x) => num(x) && x > 0).sort((a, b) => a - b);
  if (!v.length) return 0;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}
// Green at or below the median, yellow at 2x, red at 4x and above.
function heat(value, med) {
  if (!num(value) || !(med > 0) || value <= 0) return '';
  const t = Math.max(0, Math.min(1, Math.log2(value / med) / 2));
  return 'background:hsl(' + Math.round(120 * (1 - t)) + ',60%,82%)';
}
function empty(text, cols) {
  return cols ? el('tr', {}, el('td', {class: 'empty l', colspan: cols}, text)) : el('p', {class: 'empty'}, text);
}

function renderHeader(s) {
  $('job').textContent = s.job;
  document.title = 'Loom monitor \u00b7 ' + s.job;
  $('epoch').textContent = fmt(s.epoch);
  $('uptime').textContent = dur(s.uptime_s);
  $('hang').textContent = num(s.hang_threshold_s) && s.hang_threshold_s > 0 ? dur(s.hang_threshold_s) : 'learning';
  $('p99').textContent = num(s.p99_gap_s) && s.p99_gap_s > 0 ? (1e3 * s.p99_gap_s).toFixed(1) + ' ms' : '\u2013';
  const alive = s.ranks.filter((r) => r.state === 'alive').length;
  $('alive').textContent = alive + ' / ' + s.ranks.length;
}

function renderRanks(s) {
  const rows = s.ranks.map((r) => el('tr', {id: 'rank-' + r.rank, 'data-state': r.state},
    el('td', {}, r.rank), el('td', {}, r.node), el('td', {class: 'l'}, r.host), el('td', {}, r.pid),
    el('td', {}, r.tp_rank), el('td', {}, r.dp_rank),
    el('td', {class: 'l'}, el('span', {class: 'state state-' + r.state}, r.state)),
    el('td', {}, fmt(r.step)), el('td', {}, fmt(r.loss, 4)), el('td', {}, fmt(num(r.tokens_per_s) ? Math.round(r.tokens_per_s) : null)),
    el('td', {}, r.snapshot >= 0 ? fmt(r.snapshot) : '\u2013'),
    el('td', {title: 'launched ' + fmt(r.launched)}, fmt(r.completed)),
    el('td', {}, dur(r.heartbeat_age_s))));
  $('ranks').replaceChildren(...(rows.length ? rows : [empty('no rank has connected yet', 13)]));
}

function renderNodes(s) {
  const nodes = new Map();
  for (const r of s.ranks) {
    if (!nodes.has(r.node)) nodes.set(r.node, {hosts: new Set(), ranks: [], alive: 0, steps: [], tps: 0});
    const n = nodes.get(r.node);
    n.hosts.add(r.host);
    n.ranks.push(r.rank);
    if (r.state === 'alive') n.alive += 1;
    if (num(r.step)) n.steps.push(r.step);
    if (num(r.tokens_per_s)) n.tps += r.tokens_per_s;
  }
  const rows = [...nodes.entries()].sort((a, b) => a[0] - b[0]).map(([node, n]) => {
    const lo = Math.min(...n.steps), hi = Math.max(...n.steps);
    return el('tr', {id: 'node-' + node},
      el('td', {}, node), el('td', {class: 'l'}, [...n.hosts].join(', ')), el('td', {class: 'l'}, n.ranks.join(', ')),
      el('td', {style: n.alive < n.ranks.length ? 'color:var(--lost);font-weight:600' : ''}, n.alive + ' / ' + n.ranks.length),
      el('td', {}, !n.steps.length ? '\u2013' : lo === hi ? fmt(lo) : fmt(lo) + '\u2013' + fmt(hi)),
      el('td', {}, fmt(Math.round(n.tps))));
  });
  $('nodes').replaceChildren(...(rows.length ? rows : [empty('no nodes yet', 6)]));
}

function renderHeatmap(s) {
  const cols = Object.keys(s.latency || {}).sort();
  if (!cols.length) { $('heatmap').replaceChildren(empty('no collective has been traced yet')); return; }
  const ranks = new Set(s.ranks.map((r) => r.rank));
  for (const c of cols) for (const r of Object.keys(s.latency[c])) ranks.add(Number(r));
  const medians = cols.map((c) => median(Object.values(s.latency[c])));
  const head = el('tr', {}, el('th', {}, 'rank'), cols.map((c, i) => el('th', {title: 'median ' + ms(medians[i]) + ' ms'}, c)));
  const body = [...ranks].sort((a, b) => a - b).map((r) => el('tr', {},
    el('th', {}, r),
    cols.map((c, i) => {
      const v = s.latency[c][String(r)];
      return el('td', {class: 'cell', style: heat(v, medians[i]),
                       title: num(v) && medians[i] > 0 ? (v / medians[i]).toFixed(2) + '\u00d7 median' : null}, ms(v));
    })));
  $('heatmap').replaceChildren(el('table', {class: 'heat'}, el('thead', {}, head), el('tbody', {}, body)));
}

function renderLinks(s) {
  const links = s.links || [];
  if (!links.length) { $('links').replaceChildren(empty('no link has been measured yet')); return; }
  const ids = [...new Set(links.flatMap((l) => [l.src, l.dst]))].sort((a, b) => a - b);
  const at = new Map(links.map((l) => [l.src + '>' + l.dst, l.mean_ms]));
  const med = median(links.map((l) => l.mean_ms));
  const head = el('tr', {}, el('th', {}, 'src \\ dst'), ids.map((d) => el('th', {}, d)));
  const body = ids.map((src) => el('tr', {}, el('th', {}, src), ids.map((dst) => {
    const v = at.get(src + '>' + dst);
    return el('td', {class: 'cell', style: heat(v, med)}, v === undefined ? '' : ms(v));
  })));
  $('links').replaceChildren(el('table', {class: 'heat'}, el('thead', {}, head), el('tbody', {}, body)));
}

function renderVerdicts(s) {
  const items = (s.verdicts || []).slice().reverse().map((v) => {
    const where = [];
    if (v.ranks && v.ranks.length) where.push('ranks ' + v.ranks.join(', '));
    if (num(v.node) && v.node >= 0) where.push('node ' + v.node + (v.host ? ' (' + v.host + ')' : ''));
    if (v.link) where.push('link ' + v.link.src + ' \u2192 ' + v.link.dst);
    where.push('epoch ' + v.epoch);
    where.push('detected ' + (num(v.detection_s) ? v.detection_s.toFixed(2) + ' s' : '\u2013') + ' after onset');
    return el('li', {'data-kind': v.kind},
      el('div', {}, el('span', {class: 'kind'}, v.kind), el('span', {class: 'summary'}, v.summary)),
      el('div', {class: 'meta'}, where.join(' \u00b7 ')),
      v.evidence === undefined ? null
        : el('details', {}, el('summary', {class: 'meta'}, 'evidence'), el('pre', {}, JSON.stringify(v.evidence, null, 1))));
  });
  $('verdicts').replaceChildren(...(items.length ? items : [el('li', {class: 'empty', style: 'border:0;background:none'}, 'none')]));
}

function renderCounters(s) {
  const c = s.counters || {};
  const shown = [['frames', 'frames'], ['connections', 'connections'], ['refused_token', 'refused: token'],
                 ['refused_epoch', 'refused: epoch'], ['refused_job', 'refused: job'], ['malformed', 'malformed frames'],
                 ['http_requests', 'HTTP requests']];
  $('counters').replaceChildren(...shown.map(([k, label]) => el('div',
    {id: 'counter-' + k, class: 'counter' + ((k.startsWith('refused') || k === 'malformed') && c[k] > 0 ? ' bad' : '')},
    el('div', {class: 'n'}, fmt(c[k])), el('div', {class: 'k'}, label))));
}

async function refresh() {
  const conn = $('conn');
  try {
    const res = await fetch('/status.json', {cache: 'no-store'});
    if (!res.ok) throw new Error('HTTP ' + res.status);
    const s = await res.json();
    s.ranks = (s.ranks || []).slice().sort((a, b) => a.rank - b.rank);
    renderHeader(s);
    renderRanks(s);
    renderNodes(s);
    renderHeatmap(s);
    renderLinks(s);
    renderVerdicts(s);
    renderCounters(s);
    conn.className = 'kv ok';
    conn.textContent = 'updated ' + new Date().toLocaleTimeString();
  } catch (e) {
    conn.className = 'kv bad';
    conn.textContent = 'monitor unreachable (' + e.message + '); showing the last data';
  } finally {
    setTimeout(refresh, 1000);
  }
}
refresh();
</script>
</body>
</html>
)PAGE";
}

}  // namespace loom::mon
