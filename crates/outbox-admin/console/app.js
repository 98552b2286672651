// app.js: the whole client of the outbox operator console. It routes on the
// URL hash (#/overview, #/dead, #/keys, #/scheduled, #/reconcile, #/captures,
// #/audit) between the sections of index.html and fills them from the JSON
// API under /api/v1/. Everything the API returns is untrusted text: it goes
// into the page through apiText() (DOM text nodes, never HTML, with hidden
// characters spelled out). No framework, no build step, nothing fetched but
// our own API.
'use strict';

const API = '/api/v1/';
const TOKEN_KEY = 'outbox-console-token';
const REFRESH_MS = 5000;
const DEAD_LIMIT = 100;
const LIST_LIMIT = 100;
const FILTER_FIELDS = ['exchange', 'routing_key', 'ordering_key', 'error', 'since', 'until', 'ids'];
const PAST_TENSE = { requeue: 'requeued', discard: 'discarded' };
// A table cell shows at most this much of a value (the column cuts it far
// sooner); the tooltip and the detail panel have all of it.
const CELL_CHARS = 400;

const state = {
  route: null,
  readOnly: false,
  overviewTimer: null,
  overviewBusy: false,
  overviewFailed: false,
  deadFilter: {}, // the filter the dead-letter list shows (as applied, not as typed)
  deadRows: [],
  deadTotal: 0,
  deadSeq: 0,
  selected: new Set(),
  pendingAction: null, // {action, filter} awaiting Confirm
};

// ---------------------------------------------------------------- DOM helpers

function $(selector, root = document) {
  return root.querySelector(selector);
}

function ref(section, name) {
  return section.querySelector(`[data-ref="${name}"]`);
}

function page(name) {
  return document.querySelector(`section[data-page="${name}"]`);
}

// el('td', {class: 'num', text: 42}, child…): attributes are set with
// setAttribute, `text` with textContent, `on…` as listeners; string children
// become text nodes.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  appendAll(node, children);
  return node;
}

const SVG_NS = 'http://www.w3.org/2000/svg';

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  appendAll(node, children);
  return node;
}

function setAttrs(node, attrs) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'text') node.textContent = String(value);
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key === 'className' ? 'class' : key, value === true ? '' : String(value));
  }
}

function appendAll(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
}

// table([{key, label, cell, class}], rows, row => attrs): a plain data table;
// each cell gets data-col=key so tests and styles can find it. A cell given
// as a string is API text (a number, a name) and goes through apiText; long
// values come as cellText() and are cut at the column's width.
function table(columns, rows, rowAttrs = () => ({})) {
  const head = el('tr', {}, columns.map((c) => el('th', { class: c.class }, c.head ?? c.label)));
  const body = rows.map((row) => el('tr', rowAttrs(row), columns.map((c) => {
    const content = c.cell(row);
    return el('td', { class: c.class, 'data-col': c.key }, typeof content === 'string' ? apiText(content) : content);
  })));
  return el('table', { class: 'grid' }, el('thead', {}, head), el('tbody', {}, body));
}

function tableOrEmpty(columns, rows, emptyText, rowAttrs) {
  return rows.length ? table(columns, rows, rowAttrs) : el('p', { class: 'empty', text: emptyText });
}

function loading(box) {
  box.replaceChildren(el('p', { class: 'muted', text: 'loading…' }));
}

// ------------------------------------------------------- untrusted API text

// Characters that do not show as themselves: C0 and C1 controls (Cc), format
// characters (Cf: the bidi embeddings, overrides, isolates and marks U+202A–
// U+202E, U+2066–U+2069, U+200E, U+200F, U+061C, the zero widths, the soft
// hyphen, the BOM, tag characters) and the line and paragraph separators.
// Left as they are, U+202E shows "abc\u202Eevil" as "abclive", and a zero-width
// space makes two different keys look the same.
const HIDDEN_CHARS = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu;

// U+202E → "\u202E"; beyond the BMP "\u{E0041}".
function escapeChar(ch) {
  const hex = ch.codePointAt(0).toString(16).toUpperCase();
  return hex.length <= 4 ? `\\u${hex.padStart(4, '0')}` : `\\u{${hex}}`;
}

// The text with its hidden characters spelled out, for places that take a
// plain string (a tooltip); `keep` lists the ones to leave as they are.
function spelledOut(text, keep = '') {
  return String(text).replace(HIDDEN_CHARS, (ch) => (keep.includes(ch) ? ch : escapeChar(ch)));
}

// The one way API text enters the page: a <span class="api"> (a bidi
// isolate, see style.css) of text nodes, each hidden character shown as
// "\u202E" in a subtle <span class="ctl">. `multiline` keeps tabs and
// newlines, for the payload, headers and error blocks.
function apiText(value, { multiline = false } = {}) {
  const text = String(value ?? '');
  const keep = multiline ? '\t\n' : '';
  const span = el('span', { class: 'api' });
  let done = 0;
  for (const match of text.matchAll(HIDDEN_CHARS)) {
    if (keep.includes(match[0])) continue;
    span.append(text.slice(done, match.index), el('span', { class: 'ctl', text: escapeChar(match[0]) }));
    done = match.index + match[0].length;
  }
  span.append(text.slice(done));
  return span;
}

// node with `text` as its tooltip, hidden characters spelled out. Set as the
// DOM property: the value never passes through markup.
function withTitle(node, text) {
  if (text !== null && text !== undefined && text !== '') node.title = spelledOut(text);
  return node;
}

// At most CELL_CHARS of text, not splitting a surrogate pair.
function cut(text) {
  if (text.length <= CELL_CHARS) return text;
  const end = /[\uD800-\uDBFF]/.test(text[CELL_CHARS - 1]) ? CELL_CHARS - 1 : CELL_CHARS;
  return `${text.slice(0, end)}…`;
}

// `shown` on one line, cut with an ellipsis at the column's width (a
// 100,000-character key must not widen the table), `title` as the tooltip.
function clipped(shown, title) {
  return withTitle(el('span', { class: 'clip' }, apiText(cut(String(shown)))), title);
}

// An API value in a table cell: `shown` (default the value, or – when empty)
// clipped, the whole of it in the tooltip.
function cellText(value, shown = orDash(value)) {
  return clipped(shown, value === null || value === undefined || value === '' ? '' : shown);
}

// ----------------------------------------------------------------- formatting

function fmtNumber(n) {
  if (n === null || n === undefined || n === '') return '–';
  const value = Number(n);
  return Number.isFinite(value) ? value.toLocaleString('en-US') : String(n);
}

// 850ms, 12.3s, 4m 5s, 2h 3m, 3d 4h
function fmtAge(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(Number(seconds))) return '–';
  const s = Math.max(0, Number(seconds));
  const ms = Math.round(s * 1000);
  if (ms < 1000) return `${ms}ms`;
  const tenths = Math.round(s * 10) / 10;
  if (tenths < 60) return `${tenths.toFixed(1)}s`;
  const whole = Math.round(s);
  if (whole < 3600) return `${Math.floor(whole / 60)}m ${whole % 60}s`;
  const minutes = Math.floor(whole / 60);
  if (minutes < 1440) return `${Math.floor(minutes / 60)}h ${minutes % 60}m`;
  const hours = Math.floor(minutes / 60);
  return `${Math.floor(hours / 24)}d ${hours % 24}h`;
}

function fmtMs(ms) {
  return fmtAge(Number(ms) / 1000);
}

// RFC 3339 → "2026-12-06 16:05:03Z" (UTC, no fraction); anything else as is.
function fmtTime(text) {
  if (text === null || text === undefined || text === '') return '–';
  const date = new Date(text);
  if (Number.isNaN(date.getTime())) return String(text);
  return date.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

// A time in a table: "2026-12-06 16:05:03Z", the API's own text as tooltip.
function timeCell(text) {
  return clipped(fmtTime(text), text);
}

function fmtExchange(name) {
  return name === '' ? '(default)' : (name ?? '–');
}

function orDash(value) {
  return value === null || value === undefined || value === '' ? '–' : String(value);
}

function plural(n, word) {
  return `${fmtNumber(n)} ${word}${Number(n) === 1 ? '' : 's'}`;
}

// ------------------------------------------------------------------- the API

function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

function requestHeaders(method) {
  const headers = { Accept: 'application/json' };
  if (method === 'GET') return headers;
  headers['Content-Type'] = 'application/json';
  headers['X-Outbox-Via'] = 'console';
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

// api('dead-letters?exchange=x') or api('dead-letters/requeue', {method:
// 'POST', body}) → the parsed JSON; throws an Error carrying the API's
// `error` text (and .status) on a 4xx/5xx.
async function api(path, { method = 'GET', body } = {}) {
  let response;
  try {
    response = await fetch(API + path, {
      method,
      headers: requestHeaders(method),
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
  } catch (err) {
    throw new Error(`cannot reach the console server (${err.message})`);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) throw apiError(response, data, method);
  if (data === null) throw new Error(`${path}: the answer is not JSON`);
  return data;
}

function apiError(response, data, method) {
  let text = data && typeof data.error === 'string' ? data.error : `${response.status} ${response.statusText}`;
  if ((response.status === 401 || response.status === 403) && method !== 'GET' && !getToken()) {
    text += ' (paste the operator token in the token field)';
  }
  const error = new Error(text);
  error.status = response.status;
  return error;
}

// query({a: 'x', b: ''}) → "a=x": empty values are left out.
function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && String(value).trim() !== '') search.set(key, String(value).trim());
  }
  return search.toString();
}

// ------------------------------------------------------------------- banners

// The text may quote the API (an error, a name), so it goes in as API text.
function showBanner(testid, text) {
  const banner = $(`[data-testid="${testid}"]`);
  $('.banner-text', banner).replaceChildren(apiText(text, { multiline: true }));
  banner.hidden = false;
}

function hideBanner(testid) {
  $(`[data-testid="${testid}"]`).hidden = true;
}

function showError(err) {
  showBanner('error', err && err.message ? err.message : String(err));
}

function errorText(err) {
  return el('p', { class: 'error-text' }, apiText(err.message || String(err), { multiline: true }));
}

// -------------------------------------------------------------------- header

function renderHeader(overview) {
  const database = $('[data-testid="database"]');
  database.replaceChildren(apiText(overview.database ?? ''));
  withTitle(database, overview.database);
  state.readOnly = overview.read_only === true;
  $('[data-testid="read-only"]').hidden = !state.readOnly;
  updateDeadActions(page('dead'));
}

async function loadHeader() {
  try {
    renderHeader(await api('overview'));
  } catch (err) {
    showError(err);
  }
}

function initToken() {
  const input = $('[data-testid="token"]');
  input.form.addEventListener('submit', (event) => event.preventDefault());
  input.value = getToken();
  input.addEventListener('input', () => {
    const token = input.value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  });
}

// -------------------------------------------------------------------- router

const PAGES = {
  overview: showOverview,
  dead: showDead,
  keys: showKeys,
  scheduled: showScheduled,
  reconcile: () => {},
  captures: showCaptures,
  audit: showAudit,
};

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [name, search = ''] = raw.split('?');
  return { name: Object.prototype.hasOwnProperty.call(PAGES, name) ? name : 'overview', params: new URLSearchParams(search) };
}

function route() {
  const { name, params } = parseHash();
  stopOverviewRefresh();
  hideBanner('error');
  hideBanner('notice');
  state.route = name;
  for (const section of document.querySelectorAll('section[data-page]')) {
    section.hidden = section.dataset.page !== name;
  }
  for (const link of document.querySelectorAll('.nav a')) {
    const active = link.dataset.route === name;
    link.classList.toggle('active', active);
    if (active) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  PAGES[name](page(name), params);
}

// ------------------------------------------------------------------ overview

function showOverview(section) {
  refreshOverview(section);
  state.overviewTimer = setInterval(() => {
    if (!state.overviewBusy) refreshOverview(section);
  }, REFRESH_MS);
}

function stopOverviewRefresh() {
  clearInterval(state.overviewTimer);
  state.overviewTimer = null;
}

async function refreshOverview(section) {
  state.overviewBusy = true;
  try {
    const [overview, lag] = await Promise.all([api('overview'), api('lag')]);
    renderHeader(overview);
    renderOverview(section, overview, lag);
    if (state.overviewFailed) hideBanner('error');
    state.overviewFailed = false;
  } catch (err) {
    state.overviewFailed = true;
    showError(err);
  } finally {
    state.overviewBusy = false;
  }
}

function renderOverview(section, overview, lag) {
  const minutes = Array.isArray(lag.minutes) ? lag.minutes : [];
  ref(section, 'cards').replaceChildren(...overviewCards(overview, minutes));
  // The vacuum figures come as an object or at the top level.
  const vacuum = overview.vacuum || ('xmin_horizon_age_seconds' in overview ? overview : null);
  ref(section, 'vacuum').textContent = vacuumLine(vacuum);
  renderChart(ref(section, 'chart'), minutes);
  ref(section, 'exchanges').replaceChildren(exchangeTable(overview.exchanges || []));
}

function card(key, label, value, { sub, href, warn } = {}) {
  const attrs = { class: `card${warn ? ' warn' : ''}`, 'data-testid': `card-${key}`, href };
  return el(href ? 'a' : 'div', attrs,
    el('div', { class: 'card-label', text: label }),
    el('div', { class: 'value' }, apiText(value)),
    sub ? el('div', { class: 'card-sub' }, apiText(sub)) : null);
}

function overviewCards(o, minutes) {
  const schedule = o.schedule || {};
  const nextDue = schedule.next_due_in_seconds;
  const pending = Number(o.pending) || 0;
  return [
    card('pending', 'pending', fmtNumber(o.pending)),
    card('in-flight', 'in flight', fmtNumber(o.in_flight)),
    card('retrying', 'retrying', fmtNumber(o.retrying), { warn: Number(o.retrying) > 0 }),
    card('oldest', 'oldest pending', pending > 0 ? fmtAge(o.oldest_pending_seconds) : '–'),
    card('dead', 'dead', fmtNumber(o.dead), { href: '#/dead', warn: Number(o.dead) > 0 }),
    card('published', 'published (kept)', fmtNumber(o.published), { sub: publishRate(minutes) }),
    card('scheduled', 'scheduled', fmtNumber(schedule.scheduled), {
      href: '#/scheduled',
      sub: nextDue === null || nextDue === undefined ? 'none due' : `next due in ${fmtAge(nextDue)}`,
    }),
    card('relays', 'relays listening / draining', `${fmtNumber(o.relays_listening)} / ${fmtNumber(o.relays_draining)}`),
  ];
}

// The publish rate: the last whole minute's count from the lag series (the
// current minute is still filling), and the hour's total.
function publishRate(minutes) {
  const thisMinute = Math.floor(Date.now() / 60000) * 60000;
  const last = minutes.find((m) => Date.parse(m.minute) === thisMinute - 60000);
  const perMinute = last ? Number(last.published) || 0 : 0;
  const hour = minutes.reduce((sum, m) => sum + (Number(m.published) || 0), 0);
  return `${(perMinute / 60).toFixed(1)}/s last minute, ${fmtNumber(hour)} last hour`;
}

function vacuumLine(vacuum) {
  if (!vacuum) return '';
  const ratio = Number(vacuum.dead_tuple_ratio);
  const percent = Number.isFinite(ratio) ? `${(ratio * 100).toFixed(1)} %` : '–';
  return `vacuum: xmin horizon ${fmtAge(vacuum.xmin_horizon_age_seconds)} old ` +
    `(${fmtNumber(vacuum.xmin_horizon_age_xids)} xids), dead tuples ${percent} of outbox.messages`;
}

function exchangeTable(exchanges) {
  const num = (key) => (row) => fmtNumber(row[key]);
  const columns = [
    { key: 'exchange', label: 'exchange', cell: (r) => cellText(r.exchange, fmtExchange(r.exchange)) },
    { key: 'pending', label: 'pending', class: 'num', cell: num('pending') },
    { key: 'in_flight', label: 'in flight', class: 'num', cell: num('in_flight') },
    { key: 'retrying', label: 'retrying', class: 'num', cell: num('retrying') },
    { key: 'published', label: 'published', class: 'num', cell: num('published') },
    { key: 'dead', label: 'dead', class: 'num', cell: deadLink },
    { key: 'oldest', label: 'oldest pending', class: 'num',
      cell: (r) => (Number(r.pending) > 0 ? fmtAge(r.oldest_pending_seconds) : '–') },
  ];
  return tableOrEmpty(columns, exchanges, 'no messages in the outbox');
}

function deadLink(row) {
  if (!Number(row.dead)) return fmtNumber(row.dead);
  return el('a', { href: `#/dead?${query({ exchange: row.exchange })}` }, apiText(fmtNumber(row.dead)));
}

// ----------------------------------------------------------------- lag chart

const CHART = { height: 220, left: 52, right: 64, top: 14, bottom: 26, slots: 60 };

// The last hour as 60 minute slots (oldest first), each the API's row for
// that minute or null; the hour ends at the current minute or the newest row.
function lastHour(minutes) {
  const byMinute = new Map();
  let newest = Math.floor(Date.now() / 60000) * 60000;
  for (const row of minutes) {
    const t = Math.floor(new Date(row.minute).getTime() / 60000) * 60000;
    if (Number.isNaN(t)) continue;
    byMinute.set(t, row);
    newest = Math.max(newest, t);
  }
  const start = newest - (CHART.slots - 1) * 60000;
  const slots = [];
  for (let i = 0; i < CHART.slots; i++) slots.push(byMinute.get(start + i * 60000) || null);
  return { start, slots };
}

function niceCeil(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * power >= value) return m * power;
  return 10 * power;
}

function renderChart(box, minutes) {
  const { start, slots } = lastHour(minutes);
  if (!slots.some((s) => s && Number(s.published) > 0)) {
    box.replaceChildren(el('p', { class: 'empty', text: 'no messages published in the last hour' }));
    return;
  }
  const width = Math.max(480, box.clientWidth || 960);
  const geo = chartGeometry(width, slots);
  const chart = svg('svg', { width, height: CHART.height, viewBox: `0 0 ${width} ${CHART.height}`, role: 'img',
    'aria-label': 'messages published per minute and lag over the last hour' });
  chart.append(...chartAxes(geo, start), ...chartBars(geo, slots, start),
    chartLine(geo, slots, 'lag_max_ms', 'line-max'), chartLine(geo, slots, 'lag_p50_ms', 'line-p50'));
  box.replaceChildren(chart, chartLegend());
}

function chartGeometry(width, slots) {
  const plotW = width - CHART.left - CHART.right;
  const plotH = CHART.height - CHART.top - CHART.bottom;
  const maxPublished = niceCeil(Math.max(...slots.map((s) => (s ? Number(s.published) || 0 : 0))));
  const maxMs = niceCeil(Math.max(...slots.map((s) => (s ? Number(s.lag_max_ms) || 0 : 0))));
  const slot = plotW / CHART.slots;
  return {
    width, plotW, plotH, slot, maxPublished, maxMs,
    x: (i) => CHART.left + i * slot,
    yCount: (n) => CHART.top + plotH * (1 - n / maxPublished),
    yMs: (ms) => CHART.top + plotH * (1 - Math.min(ms, maxMs) / maxMs),
  };
}

function chartAxes(geo, start) {
  const nodes = [];
  for (const f of [0, 0.5, 1]) {
    const y = CHART.top + geo.plotH * (1 - f);
    nodes.push(svg('line', { class: 'grid', x1: CHART.left, x2: CHART.left + geo.plotW, y1: y, y2: y }));
    nodes.push(svg('text', { class: 'axis', x: CHART.left - 6, y: y + 4, 'text-anchor': 'end' },
      fmtNumber(Math.round(geo.maxPublished * f * 10) / 10)));
    nodes.push(svg('text', { class: 'axis', x: CHART.left + geo.plotW + 6, y: y + 4 }, f ? fmtMs(geo.maxMs * f) : '0'));
  }
  for (let i = 0; i < CHART.slots; i += 10) {
    nodes.push(svg('text', { class: 'axis', x: geo.x(i), y: CHART.height - 8 }, minuteLabel(start + i * 60000)));
  }
  nodes.push(svg('text', { class: 'axis', x: CHART.left + geo.plotW, y: CHART.height - 8, 'text-anchor': 'end' },
    `${minuteLabel(start + (CHART.slots - 1) * 60000)} UTC`));
  return nodes;
}

function minuteLabel(ms) {
  return new Date(ms).toISOString().slice(11, 16);
}

function chartBars(geo, slots, start) {
  const bars = [];
  slots.forEach((s, i) => {
    if (!s || !(Number(s.published) > 0)) return;
    const y = geo.yCount(Number(s.published));
    bars.push(svg('rect', {
      class: 'bar', x: geo.x(i) + geo.slot * 0.15, width: Math.max(1, geo.slot * 0.7),
      y, height: CHART.top + geo.plotH - y,
    }, svg('title', {}, slotTitle(s, start + i * 60000))));
  });
  return bars;
}

function slotTitle(s, ms) {
  return `${minuteLabel(ms)} UTC: ${fmtNumber(s.published)} published, ` +
    `lag p50 ${fmtMs(s.lag_p50_ms)}, max ${fmtMs(s.lag_max_ms)}`;
}

// One series as a path through the minutes that have rows (broken at gaps),
// with a dot on each so that a lone minute still shows.
function chartLine(geo, slots, key, className) {
  const group = svg('g', { class: className });
  let d = '';
  slots.forEach((s, i) => {
    if (!s || s[key] === null || s[key] === undefined) return;
    const x = geo.x(i) + geo.slot / 2;
    const y = geo.yMs(Number(s[key]));
    d += `${slots[i - 1] && slots[i - 1][key] != null ? 'L' : 'M'}${x.toFixed(1)},${y.toFixed(1)}`;
    group.append(svg('circle', { cx: x, cy: y, r: 2 }));
  });
  group.prepend(svg('path', { d: d || 'M0,0' }));
  return group;
}

function chartLegend() {
  const item = (cls, label) => el('span', { class: 'legend-item' }, el('span', { class: `swatch ${cls}` }), label);
  return el('div', { class: 'legend' },
    item('swatch-bar', 'published per minute (left axis)'),
    item('swatch-p50', 'lag p50 (right axis)'),
    item('swatch-max', 'lag max (right axis)'));
}

// -------------------------------------------------------------- dead letters

function initDead(section) {
  const form = ref(section, 'filter-form');
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    applyDeadFilter(section, filterFromForm(form));
  });
  ref(section, 'clear-filter').addEventListener('click', () => applyDeadFilter(section, {}));
  ref(section, 'requeue').addEventListener('click', () => actOnDead(section, 'requeue'));
  ref(section, 'discard').addEventListener('click', () => actOnDead(section, 'discard'));
  ref(section, 'confirm').addEventListener('click', () => confirmAction(section));
  ref(section, 'cancel').addEventListener('click', () => hidePreview(section));
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') closeDetail(section);
  });
}

function showDead(section, params) {
  const filter = normalFilter(Object.fromEntries(params));
  state.deadFilter = filter;
  fillForm(ref(section, 'filter-form'), filter);
  hidePreview(section);
  closeDetail(section);
  loadDead(section);
  if (params.get('open')) openDetail(section, params.get('open'));
}

// Shows the dead letters matching `filter`; resolves to whether they loaded.
function applyDeadFilter(section, filter) {
  state.deadFilter = filter;
  fillForm(ref(section, 'filter-form'), filter);
  const search = query(filter);
  history.replaceState(null, '', search ? `#/dead?${search}` : '#/dead');
  hideBanner('error');
  hidePreview(section);
  return loadDead(section);
}

// The filter with each value trimmed, ids as "1,2" and empty values left
// out, so that the form, the URL and the applied filter compare equal
// whenever they mean the same dead letters.
function normalFilter(raw) {
  const filter = {};
  for (const field of FILTER_FIELDS) {
    const value = String(raw[field] ?? '').trim();
    if (value) filter[field] = field === 'ids' ? splitIds(value).join(',') : value;
  }
  return filter;
}

function filterFromForm(form) {
  return normalFilter(Object.fromEntries(FILTER_FIELDS.map((field) => [field, form.elements[field].value])));
}

function sameFilter(a, b) {
  return query(normalFilter(a)) === query(normalFilter(b));
}

function fillForm(form, filter) {
  for (const field of FILTER_FIELDS) form.elements[field].value = filter[field] || '';
}

function splitIds(text) {
  return String(text).split(/[\s,]+/).filter(Boolean);
}

// The filter as the POST body wants it: ids as a list of strings.
function postFilter(filter) {
  const body = {};
  for (const [key, value] of Object.entries(filter)) {
    if (!value) continue;
    body[key] = key === 'ids' ? splitIds(value) : value;
  }
  return body;
}

// Lists the dead letters of state.deadFilter; resolves to true when this
// load is the one shown (false on an error or when a newer load overtook it).
async function loadDead(section) {
  const box = ref(section, 'table');
  const seq = ++state.deadSeq;
  box.setAttribute('aria-busy', 'true');
  try {
    const data = await api(`dead-letters?${query({ ...state.deadFilter, limit: DEAD_LIMIT })}`);
    if (seq !== state.deadSeq) return false;
    state.deadRows = Array.isArray(data.dead_letters) ? data.dead_letters : [];
    state.deadTotal = Number(data.total ?? state.deadRows.length);
    state.selected.clear();
    renderDeadTable(section);
    return true;
  } catch (err) {
    if (seq !== state.deadSeq) return false;
    state.deadRows = [];
    state.deadTotal = 0;
    state.selected.clear();
    showError(err);
    box.replaceChildren(el('p', { class: 'empty', text: 'the dead letters could not be listed: see the error above' }));
    ref(section, 'total').textContent = '';
    return false;
  } finally {
    if (seq === state.deadSeq) {
      box.removeAttribute('aria-busy');
      section.dataset.loads = String(seq);
      updateDeadActions(section);
    }
  }
}

function renderDeadTable(section) {
  const rows = state.deadRows;
  let total = `total ${fmtNumber(state.deadTotal)}`;
  if (rows.length < state.deadTotal) total += ` · showing the first ${fmtNumber(rows.length)}`;
  ref(section, 'total').textContent = total;
  const empty = Object.keys(state.deadFilter).length ? 'no dead letter matches the filter' : 'no dead letters';
  ref(section, 'table').replaceChildren(
    tableOrEmpty(deadColumns(section), rows, empty, (r) => ({ 'data-testid': 'dead-row', 'data-id': r.id })));
}

function deadColumns(section) {
  return [
    { key: 'select', class: 'check', head: selectAllBox(section), cell: (r) => selectBox(section, r) },
    { key: 'id', label: 'id', class: 'num', cell: (r) => el('button', {
      type: 'button', class: 'link', 'data-testid': 'open', onclick: () => openDetail(section, r.id) }, apiText(r.id)) },
    { key: 'message_id', label: 'message_id', class: 'mono', cell: (r) => cellText(r.message_id) },
    { key: 'dead_at', label: 'dead at', class: 'nowrap', cell: (r) => timeCell(r.dead_at) },
    { key: 'exchange', label: 'exchange', cell: (r) => cellText(r.exchange, fmtExchange(r.exchange)) },
    { key: 'routing_key', label: 'routing key', cell: (r) => cellText(r.routing_key) },
    { key: 'ordering_key', label: 'ordering key', cell: (r) => cellText(r.ordering_key) },
    { key: 'attempts', label: 'attempts', class: 'num', cell: (r) => fmtNumber(r.attempts) },
    { key: 'last_error', label: 'last error', class: 'error-cell', cell: (r) => cellText(r.last_error) },
  ];
}

function selectBox(section, row) {
  const id = String(row.id);
  return el('input', {
    type: 'checkbox', 'data-testid': 'select', 'aria-label': `select ${spelledOut(id)}`, checked: state.selected.has(id),
    onchange: (event) => {
      if (event.target.checked) state.selected.add(id);
      else state.selected.delete(id);
      syncSelectAll(section);
      updateDeadActions(section);
    },
  });
}

function selectAllBox(section) {
  return el('input', {
    type: 'checkbox', 'data-testid': 'select-all', 'aria-label': 'select all shown',
    onchange: (event) => {
      for (const row of state.deadRows) {
        if (event.target.checked) state.selected.add(String(row.id));
        else state.selected.delete(String(row.id));
      }
      for (const box of section.querySelectorAll('[data-testid="select"]')) box.checked = event.target.checked;
      updateDeadActions(section);
    },
  });
}

function syncSelectAll(section) {
  const all = $('[data-testid="select-all"]', section);
  if (all) all.checked = state.deadRows.length > 0 && state.selected.size === state.deadRows.length;
}

function updateDeadActions(section) {
  const n = state.selected.size;
  let text = '';
  if (n) text = `${n} selected: the actions apply to them`;
  else if (state.deadTotal) text = `nothing selected: the actions apply to all ${fmtNumber(state.deadTotal)} matching the filter`;
  ref(section, 'selection').textContent = text;
  for (const name of ['requeue', 'discard']) {
    const button = ref(section, name);
    button.disabled = state.readOnly || (n === 0 && state.deadTotal === 0);
    button.title = state.readOnly ? 'the console is read-only' : '';
  }
}

// ------------------------------------------------------ requeue and discard

// The toolbar's Requeue or Discard. It acts on what the form says: a filter
// typed but not applied yet is applied first (the list reloads with it, which
// drops the selection), so the list, the preview and the request all mean
// the same dead letters.
async function actOnDead(section, action) {
  let note = '';
  const typed = filterFromForm(ref(section, 'filter-form'));
  if (!sameFilter(typed, state.deadFilter)) {
    if (state.selected.size) note = 'the selection was dropped: the filter typed in the form was applied first';
    if (!(await applyDeadFilter(section, typed))) return;
  }
  const [filter, scope] = actionTarget();
  await startAction(section, action, filter, scope, note);
}

// [filter, scope] for an action: the selected rows, else the applied filter.
function actionTarget() {
  if (state.selected.size) return [{ ids: [...state.selected] }, `the ${state.selected.size} selected`];
  const filter = postFilter(state.deadFilter);
  return [filter, Object.keys(filter).length ? 'filter' : 'no filter'];
}

// Dry-runs the action on `filter` and shows the preview; Confirm then sends
// that same filter. `scope` says where the filter came from, `note` anything
// the operator should know before confirming.
async function startAction(section, action, filter, scope, note = '') {
  hidePreview(section);
  hideBanner('notice');
  hideBanner('error');
  try {
    const result = await api(`dead-letters/${action}`, { method: 'POST', body: { filter, dry_run: true } });
    state.pendingAction = { action, filter };
    showPreview(section, { action, result, filter, scope, note });
  } catch (err) {
    showError(err);
  }
}

// "would discard 44 dead letters · filter: exchange = bytes". Confirm gets
// the focus (Enter confirms) only when the filter is not empty: acting on
// every dead letter takes a deliberate click.
function showPreview(section, { action, result, filter, scope, note }) {
  const matched = Number(result.matched) || 0;
  const every = Object.keys(filter).length === 0;
  ref(section, 'preview-text').replaceChildren(
    `would ${action} ${plural(matched, 'dead letter')} · ${scope}: `,
    el('span', { class: 'preview-filter', 'data-testid': 'preview-filter' }, filterDescription(filter)));
  ref(section, 'preview-sample').replaceChildren(
    apiText([note, sampleLine(result.sample, matched), unmatchedLine(result.unmatched)].filter(Boolean).join(' · ')));
  const confirm = ref(section, 'confirm');
  confirm.textContent = matched ? `Confirm ${action}` : 'Confirm';
  confirm.disabled = matched === 0;
  const preview = ref(section, 'preview');
  preview.hidden = false;
  preview.dataset.action = action;
  preview.dataset.scope = every ? 'every' : 'filter';
  (matched && !every ? confirm : ref(section, 'cancel')).focus();
}

// How a filter field reads where it does not mean equality (see
// outbox_admin::filter::Filter): a part of the error, a time window.
const FILTER_WORDING = { error: 'error contains', since: 'since', until: 'until' };

// The filter exactly as it will be sent, one boxed "field = value" per
// condition, or "every dead letter" in bold warning colour when it is empty.
function filterDescription(filter) {
  const entries = Object.entries(filter);
  if (!entries.length) return [el('strong', { class: 'every', text: 'every dead letter' })];
  return entries.flatMap(([key, value], i) => [
    i ? ' and ' : '',
    el('code', { class: 'condition' }, `${FILTER_WORDING[key] || `${key} =`} `,
      apiText(Array.isArray(value) ? value.join(', ') : value)),
  ]);
}

// The sample as "ids: 1, 2 … and 3 more"; an item is an id or {id, message_id}.
function sampleLine(sample, matched) {
  if (!Array.isArray(sample) || !sample.length) return '';
  const ids = sample.map((item) => (item !== null && typeof item === 'object' ? String(item.id ?? item.message_id) : String(item)));
  const more = matched > ids.length ? ` … and ${fmtNumber(matched - ids.length)} more` : '';
  return `ids: ${ids.join(', ')}${more}`;
}

function unmatchedLine(unmatched) {
  if (!Array.isArray(unmatched) || !unmatched.length) return '';
  return `not dead letters (left alone): ${unmatched.map(String).join(', ')}`;
}

function hidePreview(section) {
  ref(section, 'preview').hidden = true;
  state.pendingAction = null;
}

async function confirmAction(section) {
  const pending = state.pendingAction;
  if (!pending) return;
  const confirm = ref(section, 'confirm');
  confirm.disabled = true;
  try {
    const body = { filter: pending.filter, dry_run: false };
    const result = await api(`dead-letters/${pending.action}`, { method: 'POST', body });
    hidePreview(section);
    closeDetail(section);
    const verb = PAST_TENSE[result.action || pending.action] || `${pending.action}:`;
    showBanner('notice', `${verb} ${fmtNumber(result.changed ?? 0)} of ${fmtNumber(result.matched)} matched`);
    await loadDead(section);
  } catch (err) {
    confirm.disabled = false;
    showError(err);
  }
}

// ------------------------------------------------------ dead-letter detail

async function openDetail(section, id) {
  const drawer = ref(section, 'detail');
  drawer.dataset.id = String(id);
  drawer.hidden = false;
  drawer.replaceChildren(detailHead(section, `Dead letter ${id}`), el('p', { class: 'muted', text: 'loading…' }));
  try {
    const detail = await api(`dead-letters/${encodeURIComponent(id)}`);
    if (drawer.dataset.id !== String(id)) return;
    drawer.replaceChildren(...detailView(section, detail));
  } catch (err) {
    if (drawer.dataset.id === String(id)) drawer.append(errorText(err));
  }
}

function closeDetail(section) {
  const drawer = ref(section, 'detail');
  drawer.hidden = true;
  drawer.dataset.id = '';
  drawer.replaceChildren();
}

function detailHead(section, title) {
  return el('div', { class: 'drawer-head' },
    el('h2', {}, apiText(title)), // the id may come from the URL
    el('button', { type: 'button', class: 'link', 'data-testid': 'close-detail', 'aria-label': 'close',
      text: '×', onclick: () => closeDetail(section) }));
}

const DETAIL_FIELDS = [
  ['id', 'id'], ['message_id', 'message_id'], ['exchange', 'exchange'], ['routing_key', 'routing key'],
  ['ordering_key', 'ordering key'], ['content_type', 'content type'], ['created_at', 'created at'],
  ['dead_at', 'dead at'], ['attempts', 'attempts'], ['payload_bytes', 'payload bytes'],
];
const DETAIL_SPECIAL = new Set(['headers', 'payload_text', 'payload_shown', 'last_error']);

function detailView(section, d) {
  return [
    detailHead(section, `Dead letter ${d.id}`),
    detailFields(d),
    el('h3', { text: 'last error' }),
    el('pre', { class: 'block error-text', 'data-ref': 'last-error' }, apiText(d.last_error ?? '–', { multiline: true })),
    el('h3', { text: 'headers' }),
    el('pre', { class: 'block', 'data-ref': 'headers' },
      apiText(JSON.stringify(d.headers ?? {}, null, 2), { multiline: true })),
    el('h3', { text: 'payload' }),
    payloadView(d),
    detailActions(section, d),
  ];
}

function detailFields(d) {
  const list = el('dl', { class: 'fields' });
  const known = new Set(DETAIL_FIELDS.map(([key]) => key));
  const extra = Object.keys(d).filter((k) => !known.has(k) && !DETAIL_SPECIAL.has(k)).map((k) => [k, k]);
  for (const [key, label] of [...DETAIL_FIELDS, ...extra]) {
    if (!(key in d)) continue;
    list.append(el('dt', {}, apiText(label)), el('dd', { 'data-field': key }, fieldValue(key, d[key])));
  }
  return list;
}

// A detail value in full: it wraps (style.css) rather than being cut.
function fieldValue(key, value) {
  if (key === 'exchange') return apiText(fmtExchange(value));
  if (key.endsWith('_at')) return withTitle(apiText(fmtTime(value)), value);
  if (value !== null && typeof value === 'object') return apiText(JSON.stringify(value));
  return apiText(orDash(value));
}

function payloadView(d) {
  if (d.payload_shown === false) {
    return el('p', { class: 'muted', 'data-ref': 'payload', text: 'payload hidden: set OUTBOX_CONSOLE_SHOW_PAYLOADS=true' });
  }
  if (d.payload_text === null || d.payload_text === undefined) {
    return el('p', { class: 'muted', 'data-ref': 'payload' }, apiText(`${fmtNumber(d.payload_bytes)} bytes, not UTF-8`));
  }
  return el('pre', { class: 'block', 'data-ref': 'payload' },
    apiText(prettyPayload(d.payload_text, d.content_type), { multiline: true }));
}

function prettyPayload(text, contentType) {
  if (!/json/i.test(contentType || '')) return text;
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

function detailActions(section, d) {
  const target = () => [{ ids: [String(d.id)] }, 'this dead letter'];
  const disabled = state.readOnly;
  return el('div', { class: 'buttons' },
    el('button', { type: 'button', disabled, text: 'Requeue this',
      onclick: () => startAction(section, 'requeue', ...target()) }),
    el('button', { type: 'button', class: 'danger', disabled, text: 'Discard this',
      onclick: () => startAction(section, 'discard', ...target()) }));
}

// -------------------------------------------------------------- blocked keys

async function showKeys(section) {
  const box = ref(section, 'table');
  loading(box);
  try {
    const data = await api('blocked-keys');
    box.replaceChildren(tableOrEmpty(keyColumns(), data.keys || [], 'no ordering key is blocked',
      () => ({ 'data-testid': 'key-row' })));
  } catch (err) {
    showError(err);
    box.replaceChildren(errorText(err));
  }
}

function keyColumns() {
  const detailLink = (r) => el('a', {
    href: `#/dead?${query({ ids: String(r.dead_id), open: String(r.dead_id) })}` }, apiText(r.dead_id));
  return [
    { key: 'ordering_key', label: 'ordering key', cell: (r) => cellText(r.ordering_key) },
    { key: 'waiting', label: 'waiting behind it', class: 'num', cell: (r) => fmtNumber(r.waiting) },
    { key: 'dead_id', label: 'dead head', class: 'num', cell: detailLink },
    { key: 'dead_message_id', label: 'its message_id', class: 'mono', cell: (r) => cellText(r.dead_message_id) },
    { key: 'dead_at', label: 'dead at', class: 'nowrap', cell: (r) => timeCell(r.dead_at) },
    { key: 'last_error', label: 'last error', class: 'error-cell', cell: (r) => cellText(r.last_error) },
  ];
}

// ----------------------------------------------------------------- scheduled

async function showScheduled(section) {
  const box = ref(section, 'table');
  loading(box);
  try {
    const data = await api(`scheduled?${query({ limit: LIST_LIMIT })}`);
    ref(section, 'stats').textContent = scheduleLine(data.stats || {});
    box.replaceChildren(tableOrEmpty(scheduledColumns(), data.messages || [], 'no scheduled messages'));
  } catch (err) {
    showError(err);
    box.replaceChildren(errorText(err));
  }
}

function scheduleLine(stats) {
  const next = stats.next_due_in_seconds;
  const due = next === null || next === undefined ? 'none due' : `next due in ${fmtAge(next)}`;
  return `${fmtNumber(stats.scheduled)} scheduled (${due}) · ${fmtNumber(stats.cancelled)} cancelled · ` +
    `${fmtNumber(stats.refused)} refused`;
}

function scheduledColumns() {
  return [
    { key: 'message_id', label: 'message_id', class: 'mono', cell: (r) => cellText(r.message_id) },
    { key: 'exchange', label: 'exchange', cell: (r) => cellText(r.exchange, fmtExchange(r.exchange)) },
    { key: 'routing_key', label: 'routing key', cell: (r) => cellText(r.routing_key) },
    { key: 'ordering_key', label: 'ordering key', cell: (r) => cellText(r.ordering_key) },
    { key: 'deliver_at', label: 'deliver at', class: 'nowrap', cell: (r) => timeCell(r.deliver_at) },
    { key: 'state', label: 'state', cell: (r) => el('span', { class: `state state-${String(r.state)}` }, apiText(orDash(r.state))) },
  ];
}

// ----------------------------------------------------------------- reconcile

function initReconcile(section) {
  const form = ref(section, 'form');
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    runReconcile(section, form);
  });
}

async function runReconcile(section, form) {
  const box = ref(section, 'result');
  const params = {};
  for (const name of ['since', 'until', 'exchange']) params[name] = form.elements[name].value;
  box.replaceChildren(el('p', { class: 'muted', text: 'checking…' }));
  hideBanner('error');
  try {
    box.replaceChildren(...reconcileView(await api(`reconcile?${query(params)}`)));
  } catch (err) {
    showError(err);
    box.replaceChildren(errorText(err));
  }
}

function reconcileView(data) {
  if (!data.configured) {
    return [el('p', { class: 'hint', 'data-testid': 'reconcile-hint' }, apiText(data.hint || 'reconcile is not configured'))];
  }
  const missing = Array.isArray(data.unprocessed) ? data.unprocessed : [];
  const summary = `checked ${plural(data.checked, 'message')} published from ${fmtTime(data.since)} to ` +
    `${fmtTime(data.until)}: ${fmtNumber(missing.length)} unprocessed`;
  return [
    el('p', { 'data-testid': 'reconcile-summary' }, apiText(summary)),
    data.warning ? el('p', { class: 'hint warn' }, apiText(data.warning)) : null,
    tableOrEmpty(reconcileColumns(), missing, 'every checked message reached the consumer'),
  ].filter(Boolean);
}

function reconcileColumns() {
  return [
    { key: 'id', label: 'id', class: 'num', cell: (r) => orDash(r.id) },
    { key: 'message_id', label: 'message_id', class: 'mono', cell: (r) => cellText(r.message_id) },
    { key: 'exchange', label: 'exchange', cell: (r) => cellText(r.exchange, fmtExchange(r.exchange)) },
    { key: 'routing_key', label: 'routing key', cell: (r) => cellText(r.routing_key) },
    { key: 'published_at', label: 'published at', class: 'nowrap', cell: (r) => timeCell(r.published_at) },
  ];
}

// ------------------------------------------------------------------ captures

async function showCaptures(section) {
  const box = ref(section, 'table');
  loading(box);
  try {
    const data = await api('captures');
    box.replaceChildren(tableOrEmpty(captureColumns(), data.captures || [], 'no table is captured'));
  } catch (err) {
    showError(err);
    box.replaceChildren(errorText(err));
  }
}

function captureColumns() {
  const list = (items, none) => (Array.isArray(items) && items.length ? items.join(', ') : none);
  return [
    { key: 'table', label: 'table', class: 'mono', cell: (r) => cellText(r.table) },
    { key: 'exchange', label: 'exchange', cell: (r) => cellText(r.exchange, fmtExchange(r.exchange)) },
    { key: 'routing_key', label: 'routing key', cell: (r) => cellText(r.routing_key) },
    { key: 'ordering_key', label: 'ordering key', cell: (r) => cellText(r.ordering_key) },
    { key: 'operations', label: 'operations', cell: (r) => cellText(list(r.operations, '')) },
    { key: 'columns', label: 'columns', cell: (r) => cellText(list(r.columns, ''), list(r.columns, 'all columns')) },
    { key: 'enabled', label: 'enabled', cell: (r) => (r.enabled === false ? 'no' : r.enabled === true ? 'yes' : '–') },
  ];
}

// --------------------------------------------------------------------- audit

async function showAudit(section) {
  const box = ref(section, 'table');
  loading(box);
  try {
    const data = await api(`audit?${query({ limit: LIST_LIMIT })}`);
    box.replaceChildren(tableOrEmpty(auditColumns(), data.entries || [], 'no operator action recorded yet',
      () => ({ 'data-testid': 'audit-row' })));
  } catch (err) {
    showError(err);
    box.replaceChildren(errorText(err));
  }
}

function auditColumns() {
  return [
    { key: 'at', label: 'at', class: 'nowrap', cell: (r) => timeCell(r.at) },
    { key: 'actor', label: 'actor', cell: (r) => clipped(orDash(r.actor), r.db_role ? `database role ${r.db_role}` : '') },
    { key: 'action', label: 'action', cell: (r) => cellText(r.action) },
    { key: 'dry_run', label: 'dry run', cell: (r) => (r.dry_run ? 'yes' : 'no') },
    { key: 'matched', label: 'matched', class: 'num', cell: (r) => fmtNumber(r.matched) },
    { key: 'changed', label: 'changed', class: 'num', cell: (r) => fmtNumber(r.changed) },
    { key: 'via', label: 'via', cell: (r) => cellText(r.via) },
    { key: 'filter', label: 'filter', class: 'mono filter-cell', cell: (r) => cellText(JSON.stringify(r.filter ?? {})) },
    { key: 'error', label: 'error', class: 'error-cell', cell: (r) => cellText(r.error) },
  ];
}

// ---------------------------------------------------------------------- boot

function initBanners() {
  for (const button of document.querySelectorAll('.banner [data-action="dismiss"]')) {
    button.addEventListener('click', () => {
      button.closest('.banner').hidden = true;
    });
  }
}

function boot() {
  initToken();
  initBanners();
  initDead(page('dead'));
  initReconcile(page('reconcile'));
  window.addEventListener('hashchange', route);
  if (!location.hash) history.replaceState(null, '', '#/overview');
  route();
  if (state.route !== 'overview') loadHeader();
}

boot();
