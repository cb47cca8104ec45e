// Portico admin page: plain DOM, no framework. Every call goes to /api/v1 with the session
// cookie; every change carries the session's CSRF token in X-CSRF-Token. Data is put into the
// page with textContent only, never as HTML.
'use strict';

const POLL_MS = 2000;
const SAMPLES = 90;
const PORT_TYPES = ['http', 'https', 'sip', 'sips', 'ldap', 'ldaps', 'h323', 'h323_tls'];
const SVG = 'http://www.w3.org/2000/svg';

let csrf = null;
let timer = null;
let busy = false;
const samples = [];

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : String(c));
  return e;
}

function duration(s) {
  s = Math.max(0, Math.floor(s));
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

function showError(msg) { $('#app-error').textContent = msg || ''; }

async function api(method, path, body) {
  const opt = { method, credentials: 'same-origin', headers: {} };
  if (method !== 'GET') opt.headers['X-CSRF-Token'] = csrf || '';
  if (body !== undefined) {
    opt.headers['Content-Type'] = 'application/json';
    opt.body = JSON.stringify(body);
  }
  const r = await fetch(path, opt);
  if (r.status === 401) {
    showLogin('The session ended; log in again.');
    throw new Error('not logged in');
  }
  const text = await r.text();
  let data = text;
  if ((r.headers.get('content-type') || '').startsWith('application/json') && text) data = JSON.parse(text);
  if (!r.ok) throw new Error((data && data.error) || `${r.status} ${r.statusText}`);
  return data;
}

// --- login -----------------------------------------------------------------------------------

function showLogin(msg) {
  csrf = null;
  if (timer) clearInterval(timer);
  timer = null;
  $('#app').hidden = true;
  $('#logout').hidden = true;
  $('#login-view').hidden = false;
  $('#login-error').textContent = msg || '';
  $('#token').focus();
}

function showApp(session) {
  csrf = session.csrf_token;
  $('#login-view').hidden = true;
  $('#app').hidden = false;
  $('#logout').hidden = false;
  samples.length = 0;
  refresh();
  loadConfig();
  if (!timer) timer = setInterval(refresh, POLL_MS);
}

async function login(ev) {
  ev.preventDefault();
  const token = $('#token').value.trim();
  const r = await fetch('/admin/login', {
    method: 'POST', credentials: 'same-origin',
    headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ token }),
  });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    $('#login-error').textContent = data.error || `login failed: ${r.status}`;
    return;
  }
  $('#token').value = '';
  showApp(data);
}

async function logout() {
  try { await api('POST', '/admin/logout'); } catch (e) { /* the session is gone either way */ }
  showLogin('Logged out.');
}

// --- status and charts -----------------------------------------------------------------------

function renderStatus(s) {
  const dp = s.dataplane || {};
  const items = [
    ['Dataplane', dp.running ? `running (pid ${dp.pid})` : 'NOT RUNNING', !dp.running],
    ['Driver', `${s.driver} × ${s.workers} worker${s.workers === 1 ? '' : 's'}`],
    ['Dataplane uptime', duration(dp.uptime_seconds || 0)],
    ['Dataplane restarts', dp.restarts, dp.restarts > 0],
    ['Heartbeat age', `${dp.heartbeat_age_ms} ms`, dp.heartbeat_age_ms > 2000],
    ['Control plane', `pid ${s.controlplane.pid}, up ${duration(s.controlplane.uptime_seconds)}`],
    ['Configuration', `generation ${s.config.applied_generation}/${s.config.generation}`,
      s.config.applied_generation !== s.config.generation],
    ['Config file', s.config.file, false, 'wide'],
  ];
  $('#version').textContent = `v${s.version}`;
  $('#status-list').replaceChildren(...items.map(([k, v, bad, wide]) =>
    el('div', wide ? { class: wide } : {}, el('dt', {}, k), el('dd', bad ? { class: 'bad' } : {}, v))));
}

// Sums every series of each family in the Prometheus text exposition.
function parseMetrics(text) {
  const sums = {};
  for (const line of text.split('\n')) {
    if (!line || line[0] === '#') continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const v = Number(m[3]);
    if (Number.isFinite(v)) sums[m[1]] = (sums[m[1]] || 0) + v;
  }
  return sums;
}

const CHARTS = {
  packets: { metric: 'portico_dataplane_rx_packets_total', rate: true },
  allocations: { metric: 'portico_turn_allocations_active', rate: false },
  requests: { metric: 'portico_proxy_requests_total', rate: true },
  suspicious: { metric: 'portico_fraud_suspicious_events_total', rate: true },
};

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function drawCharts() {
  for (const [name, c] of Object.entries(CHARTS)) {
    const fig = document.querySelector(`figure[data-chart="${name}"]`);
    const pts = [];
    for (let i = 0; i < samples.length; i++) {
      const s = samples[i], v = s.m[c.metric] || 0;
      if (!c.rate) pts.push(v);
      else if (i > 0) {
        const p = samples[i - 1], dt = (s.t - p.t) / 1000;
        pts.push(dt > 0 ? Math.max(0, (v - (p.m[c.metric] || 0)) / dt) : 0);
      }
    }
    // The window grows with the samples up to SAMPLES, so a fresh page shows a curve too.
    const W = 300, H = 70, max = Math.max(1, ...pts), n = Math.max(pts.length, 12);
    const xy = pts.map((v, i) => `${(W * (i + n - pts.length) / (n - 1)).toFixed(1)},${(H - 2 - (H - 4) * v / max).toFixed(1)}`);
    const chart = svg('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', role: 'img' });
    if (xy.length > 1) {
      const first = xy[0].split(',')[0], last = xy[xy.length - 1].split(',')[0];
      chart.append(svg('polygon', { points: `${first},${H} ${xy.join(' ')} ${last},${H}` }));
      chart.append(svg('polyline', { points: xy.join(' '), 'vector-effect': 'non-scaling-stroke' }));
    }
    const now = pts.length ? pts[pts.length - 1] : 0;
    const cap = el('figcaption', {}, fig.dataset.title || (fig.dataset.title = fig.querySelector('figcaption').textContent),
      el('span', { class: 'value' }, `${c.rate ? now.toFixed(1) : now} (max ${c.rate ? max.toFixed(1) : max})`));
    fig.replaceChildren(cap, chart);
    fig.dataset.max = String(Math.max(0, ...pts));
  }
}

// --- allocations ---------------------------------------------------------------------------

function renderAllocations(list) {
  const rows = list.map((a) => el('tr', { 'data-alloc-row': a.id },
    el('td', {}, a.id), el('td', {}, a.client), el('td', {}, a.relayed), el('td', {}, a.user),
    el('td', {}, duration(a.lifetime_remaining)),
    el('td', {}, `${a.to_peer.packets} / ${a.to_client.packets}`),
    el('td', { class: 'actions' }, el('button', {
      type: 'button', class: 'danger', 'data-delete-alloc': a.id,
      onclick: () => act(`delete allocation ${a.id}`, () => api('DELETE', `/api/v1/turn/allocations/${a.id}`)),
    }, 'Delete'))));
  if (!rows.length) rows.push(el('tr', { class: 'empty' }, el('td', { colspan: 7 }, 'No allocations.')));
  $('#alloc-rows').replaceChildren(...rows);
}

// --- fraud lists ---------------------------------------------------------------------------

function when(unix) {
  if (!unix) return 'never';
  return `in ${duration(unix - Date.now() / 1000)}`;
}

function renderFraud(entries) {
  entries.sort((a, b) => (a.kind === b.kind ? a.source.localeCompare(b.source) : a.kind === 'black' ? -1 : 1));
  const rows = entries.map((e) => {
    const path = `/api/v1/fraud/entries/${encodeURIComponent(e.source)}`;
    const buttons = [el('button', {
      type: 'button', class: 'secondary', 'data-remove': e.source,
      onclick: () => act(`remove ${e.source}`, () => api('DELETE', path)),
    }, 'Remove')];
    if (e.kind === 'black') {
      buttons.unshift(el('button', {
        type: 'button', 'data-whitelist': e.source,
        onclick: () => act(`whitelist ${e.source}`, () => api('POST', `${path}/whitelist`)),
      }, 'Whitelist'));
    }
    return el('tr', { 'data-entry': e.source, 'data-kind': e.kind },
      el('td', {}, e.source), el('td', { class: `kind-${e.kind}` }, e.kind), el('td', {}, e.origin),
      el('td', {}, when(e.expires_at)), el('td', { class: 'note' }, e.note || ''),
      el('td', { class: 'actions' }, ...buttons));
  });
  if (!rows.length) rows.push(el('tr', { class: 'empty' }, el('td', { colspan: 6 }, 'Both lists are empty.')));
  $('#fraud-rows').replaceChildren(...rows);
}

async function addEntry(ev) {
  ev.preventDefault();
  const body = { ip: $('#fraud-ip').value.trim(), kind: $('#fraud-kind').value };
  const ttl = $('#fraud-ttl').value.trim();
  if (ttl) body.ttl_seconds = Number(ttl);
  const note = $('#fraud-note').value.trim();
  if (note) body.note = note;
  const ok = await act(`add ${body.ip}`, () => api('POST', '/api/v1/fraud/entries', body));
  if (ok) $('#fraud-add').reset();
}

// --- services and configuration ------------------------------------------------------------

function renderServices(config) {
  const services = (config.proxy && config.proxy.services) || [];
  const rows = services.map((s) => el('tr', {},
    el('td', {}, s.name), el('td', {}, s.host),
    el('td', {}, PORT_TYPES.filter((t) => s[t]).map((t) => `${t} ${s[t]}`).join(', ')),
    el('td', {}, (s.urls || []).join(' '))));
  if (!rows.length) rows.push(el('tr', { class: 'empty' }, el('td', { colspan: 4 }, 'No services configured.')));
  $('#service-rows').replaceChildren(...rows);
}

async function loadConfig() {
  try {
    const [json, toml] = await Promise.all([
      api('GET', '/api/v1/config'), api('GET', '/api/v1/config?format=toml'),
    ]);
    renderServices(json);
    $('#config-text').textContent = toml;
  } catch (e) { showError(`configuration: ${e.message}`); }
}

// --- refresh ---------------------------------------------------------------------------------

async function act(what, fn) {
  try {
    await fn();
    showError('');
    await refresh();
    return true;
  } catch (e) {
    showError(`${what}: ${e.message}`);
    return false;
  }
}

async function refresh() {
  if (busy || !csrf) return;
  busy = true;
  try {
    const [status, allocs, fraud, metrics] = await Promise.all([
      api('GET', '/api/v1/status'), api('GET', '/api/v1/turn/allocations'),
      api('GET', '/api/v1/fraud/entries'), fetch('/metrics').then((r) => r.text()),
    ]);
    renderStatus(status);
    renderAllocations(allocs.allocations);
    renderFraud(fraud.entries);
    samples.push({ t: Date.now(), m: parseMetrics(metrics) });
    if (samples.length > SAMPLES) samples.shift();
    drawCharts();
    document.body.dataset.refreshed = String(Date.now());
  } catch (e) {
    if (csrf) showError(e.message);
  } finally {
    busy = false;
  }
}

async function start() {
  $('#login').addEventListener('submit', login);
  $('#logout').addEventListener('click', logout);
  $('#fraud-add').addEventListener('submit', addEntry);
  $('#config-reload').addEventListener('click', loadConfig);
  const r = await fetch('/admin/session', { credentials: 'same-origin' });
  if (r.ok) showApp(await r.json());
  else showLogin('');
}

document.addEventListener('DOMContentLoaded', start);
