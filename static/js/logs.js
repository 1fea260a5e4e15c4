// The log viewer of flow run and task run pages: pages of 200 lines in time order, a level filter, a search
// over the loaded lines, a download of every line (in bounded pages), and a live tail while the run is live.
import { h, replace, debounce } from './dom.js';
import { api, byIds } from './api.js';
import { paths } from './router.js';
import { emptyState, errorBox, loading, toast } from './ui.js';
import { fmtDateTime } from './format.js';

const LEVELS = [[0, 'All levels'], [10, 'Debug and above'], [20, 'Info and above'], [30, 'Warning and above'], [40, 'Error and above'], [50, 'Critical only']];
const LEVEL_NAMES = { 10: 'DEBUG', 20: 'INFO', 30: 'WARNING', 40: 'ERROR', 50: 'CRITICAL' };
const PAGE = 200;
const DOWNLOAD_PAGE = 200; // the API's largest page
const DOWNLOAD_MAX = 100000; // lines: a download stays a bounded number of requests

export function levelName(n) {
  return LEVEL_NAMES[n] || (n >= 50 ? 'CRITICAL' : n >= 40 ? 'ERROR' : n >= 30 ? 'WARNING' : n >= 20 ? 'INFO' : 'DEBUG');
}

const pad = (n, w = 2) => String(n).padStart(w, '0');
// Local date and time to the millisecond: log lines a few ms apart must read apart.
export function logTime(iso) {
  const d = new Date(iso);
  if (isNaN(d)) return '—';
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

// filter: the `logs` filter of the run (flow_run_id or task_run_id); taskNames: id -> task run name, shared with
// the page and completed here for the task runs the lines name.
export function logViewer(ctx, { filter, label, fileName, taskNames = new Map() }) {
  const level = ctx.params.get('level') || '0';
  const levelSel = h('select', { id: 'log-level', onchange: () => reload() }, LEVELS.map(([v, l]) => h('option', { value: v, selected: String(v) === level }, l)));
  const searchIn = h('input', { id: 'log-search', type: 'search', placeholder: 'Search loaded logs', oninput: debounce(() => applySearch(), 200), onchange: () => applySearch() });
  const liveEl = h('span', { class: 'live', hidden: true }, h('span', { class: 'pulse', 'aria-hidden': 'true' }), 'Live: following new logs');
  const downloadBtn = h('button', { type: 'button', class: 'btn btn-small', onclick: () => download() }, 'Download');
  const logsEl = h('div', { class: 'logs', role: 'log', 'aria-label': label, tabindex: '0' });
  const moreBtn = h('button', { type: 'button', class: 'btn', hidden: true, onclick: () => loadMore() }, 'Load more logs');
  const el = h('div', null,
    h('div', { class: 'toolbar' }, h('label', { for: 'log-level' }, 'Level'), levelSel,
      h('label', { for: 'log-search', class: 'sr-only' }, 'Search logs'), searchIn, downloadBtn, liveEl),
    logsEl, moreBtn);

  let logs = [];
  const seen = new Set();
  let offset = 0;

  function line(l) {
    const lvl = levelName(l.level);
    const task = l.task_run_id ? taskNames.get(l.task_run_id) : null;
    return h('div', { class: `log-line level-${lvl.toLowerCase()}`, dataset: { level: lvl } },
      h('time', { class: 'log-time', datetime: l.timestamp, title: fmtDateTime(l.timestamp) }, logTime(l.timestamp)),
      h('span', { class: 'log-level' }, lvl),
      h('span', { class: 'log-source muted', title: l.name || '' }, task ? [h('a', { href: paths.taskRun(l.task_run_id) }, task), ' '] : null, l.name || ''),
      h('span', { class: 'log-msg' }, l.message));
  }
  function query(extra = {}) {
    const f = { ...filter, ...extra };
    if (Number(levelSel.value) > 0) f.level = { ge_: Number(levelSel.value) };
    return f;
  }
  function applySearch() {
    const needle = searchIn.value.trim().toLowerCase();
    for (const row of logsEl.querySelectorAll('.log-line')) row.hidden = !!needle && !row.textContent.toLowerCase().includes(needle);
  }
  async function nameTasks(batch) {
    const missing = batch.map((l) => l.task_run_id).filter((id) => id && !taskNames.has(id));
    if (!missing.length) return;
    const found = await byIds('/task_runs/filter', 'task_runs', missing).catch(() => new Map());
    for (const [id, t] of found) taskNames.set(id, t.name);
  }
  async function append(batch) {
    await nameTasks(batch);
    if (!ctx.alive) return;
    const atBottom = logsEl.scrollTop + logsEl.clientHeight >= logsEl.scrollHeight - 30;
    const empty = logsEl.querySelector('.empty-state');
    let added = 0;
    for (const l of batch) {
      const key = l.id || `${l.timestamp}|${l.message}`;
      if (seen.has(key)) continue;
      seen.add(key);
      if (empty && empty.isConnected) empty.remove();
      logs.push(l);
      logsEl.appendChild(line(l));
      added++;
    }
    if (added) applySearch();
    if (added && atBottom) logsEl.scrollTop = logsEl.scrollHeight;
    if (!logs.length && !logsEl.querySelector('.empty-state')) {
      logsEl.appendChild(emptyState('No logs', Number(levelSel.value) > 0 ? 'No log at this level or above.' : 'This run has not written any log yet.'));
    }
  }
  async function reload() {
    const n = new URLSearchParams(ctx.params);
    if (levelSel.value === '0') n.delete('level'); else n.set('level', levelSel.value);
    ctx.setParams(n);
    logs = []; seen.clear(); offset = 0;
    replace(logsEl, loading('Loading logs…'));
    try {
      const batch = await api.post('/logs/filter', { logs: query(), sort: 'TIMESTAMP_ASC', limit: PAGE, offset: 0 });
      if (!ctx.alive) return;
      replace(logsEl);
      offset = batch.length;
      moreBtn.hidden = batch.length < PAGE;
      await append(batch);
    } catch (err) { replace(logsEl, errorBox(err, reload)); }
  }
  async function loadMore() {
    try {
      const batch = await api.post('/logs/filter', { logs: query(), sort: 'TIMESTAMP_ASC', limit: PAGE, offset });
      offset += batch.length;
      moreBtn.hidden = batch.length < PAGE;
      await append(batch);
    } catch (err) { toast(err.message, 'error'); }
  }
  async function tail() {
    if (!moreBtn.hidden) return; // still paging through older logs
    const last = logs.length ? logs[logs.length - 1].timestamp : null;
    const batch = await api.post('/logs/filter', { logs: query(last ? { timestamp: { after_: last } } : {}), sort: 'TIMESTAMP_ASC', limit: PAGE });
    if (!ctx.alive) return;
    await append(batch);
  }
  async function download() {
    downloadBtn.disabled = true;
    try {
      const out = [];
      for (let at = 0; at < DOWNLOAD_MAX; at += DOWNLOAD_PAGE) {
        const batch = await api.post('/logs/filter', { logs: query(), sort: 'TIMESTAMP_ASC', limit: DOWNLOAD_PAGE, offset: at });
        for (const l of batch) out.push(`${l.timestamp} ${levelName(l.level).padEnd(8)} ${l.name || ''} ${l.message}`);
        if (batch.length < DOWNLOAD_PAGE) break;
      }
      const a = h('a', { href: URL.createObjectURL(new Blob([out.join('\n') + '\n'], { type: 'text/plain' })), download: fileName });
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    } catch (err) { toast(err.message, 'error'); } finally { downloadBtn.disabled = false; }
  }
  return { el, reload, tail, setLive: (live) => { liveEl.hidden = !live; } };
}
