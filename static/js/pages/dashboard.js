import { h, replace } from '../dom.js';
import { api, byIds } from '../api.js';
import { pageHeader, section, errorBox, emptyState, loading, stateBadge, timeCell } from '../ui.js';
import { runHistoryChart } from '../charts.js';
import { STATE_COLORS, NAME_COLORS, stateName, fmtNumber, fmtRelative } from '../format.js';
import { paths, navigate } from '../router.js';

const WINDOWS = {
  '1h': { label: 'Past hour', seconds: 3600, buckets: 12 },
  '24h': { label: 'Past 24 hours', seconds: 86400, buckets: 24 },
  '7d': { label: 'Past 7 days', seconds: 7 * 86400, buckets: 28 },
};
// A card per state type, and Late on its own: a Late run is overdue, not merely Scheduled (that card counts the
// others). Each card: [key, label, colour, run filter's state, link's state parameter].
const CARDS = [
  ['COMPLETED'], ['FAILED'], ['CRASHED'], ['RUNNING'],
  ['LATE', 'Late', NAME_COLORS.Late, { name: { any_: ['Late'] } }, 'Late'],
  ['SCHEDULED', 'Scheduled', STATE_COLORS.SCHEDULED, { type: { any_: ['SCHEDULED'] }, name: { not_any_: ['Late'] } }, 'SCHEDULED'],
  ['PENDING'], ['CANCELLED'], ['PAUSED'], ['CANCELLING'],
].map(([key, label, color, state, param]) => ({
  key, label: label || stateName(key), color: color || STATE_COLORS[key], state: state || { type: { any_: [key] } }, param: param || key,
}));
const ALWAYS_SHOWN = new Set(['COMPLETED', 'FAILED', 'RUNNING', 'LATE']);

export default async function dashboard(ctx, root) {
  document.title = 'Dashboard · prefectlite';
  const win = WINDOWS[ctx.params.get('window')] ? ctx.params.get('window') : '24h';
  const picker = h('div', { class: 'segmented', role: 'group', 'aria-label': 'Time window' },
    Object.entries(WINDOWS).map(([k, w]) => h('button', { type: 'button', class: k === win ? 'active' : null, 'aria-pressed': String(k === win), onclick: () => { navigate(`dashboard?window=${k}`); } }, w.label)));
  const countsEl = h('div', { class: 'stat-grid' }, loading());
  const chartEl = h('div', null, loading());
  const failuresEl = h('div', null, loading());
  const poolsEl = h('div', null, loading());
  replace(root,
    pageHeader('Dashboard', { actions: [picker] }),
    section(`Flow runs · ${WINDOWS[win].label}`, countsEl, { id: 'run-counts' }),
    section('Runs over time', chartEl, { id: 'run-chart' }),
    h('div', { class: 'two-col' },
      section('Recent failures', failuresEl, { id: 'recent-failures' }),
      section('Work pool health', poolsEl, { id: 'pool-health' })));

  const { seconds, buckets } = WINDOWS[win];
  // The window ends at the next whole minute: every viewer in that minute asks the same questions,
  // which the server's read cache answers once (while nothing was written).
  const now = new Date(Math.ceil(Date.now() / 60000) * 60000);
  const since = new Date(now.getTime() - seconds * 1000).toISOString();
  // Runs due in the window up to now: runs scheduled for later are not the present (Upcoming shows them).
  const timeFilter = { expected_start_time: { after_: since, before_: now.toISOString() } };

  const loadCounts = async () => {
    try {
      const upcomingFilter = { expected_start_time: { after_: now.toISOString() }, state: { type: { any_: ['SCHEDULED'] } } };
      const [total, upcoming, ...counts] = await Promise.all([
        api.post('/flow_runs/count', { flow_runs: timeFilter }),
        api.post('/flow_runs/count', { flow_runs: upcomingFilter }),
        ...CARDS.map((c) => api.post('/flow_runs/count', { flow_runs: { ...timeFilter, state: c.state } })),
      ]);
      if (!ctx.alive) return;
      const card = (label, n, color, key, href) => h('a', { class: 'stat', href, style: color ? { '--state': color } : null, dataset: { state: key } },
        h('span', { class: 'stat-value' }, fmtNumber(n)), h('span', { class: 'stat-label' }, label));
      const cards = [card('Total runs', total, null, 'ALL', `flow-runs?range=${win}`)];
      CARDS.forEach((c, i) => { if (counts[i] || ALWAYS_SHOWN.has(c.key)) cards.push(card(c.label, counts[i], c.color, c.key, `flow-runs?range=${win}&state=${c.param}`)); });
      cards.push(card('Upcoming', upcoming, null, 'UPCOMING', 'flow-runs/upcoming'));
      replace(countsEl, cards);
    } catch (err) { replace(countsEl, errorBox(err, loadCounts)); }
  };

  const loadChart = async () => {
    try {
      const hist = await api.post('/flow_runs/history', {
        history_start: since, history_end: now.toISOString(), history_interval_seconds: seconds / buckets,
      });
      if (!ctx.alive) return;
      replace(chartEl, runHistoryChart(hist));
    } catch (err) { replace(chartEl, errorBox(err, loadChart)); }
  };

  const loadFailures = async () => {
    try {
      const runs = await api.post('/flow_runs/filter', {
        flow_runs: { ...timeFilter, state: { type: { any_: ['FAILED', 'CRASHED'] } } },
        sort: 'EXPECTED_START_TIME_DESC', limit: 8,
      });
      if (!ctx.alive) return;
      if (!runs.length) { replace(failuresEl, emptyState('No failures', `No flow run failed or crashed in the ${WINDOWS[win].label.toLowerCase()}.`)); return; }
      const flows = await byIds('/flows/filter', 'flows', runs.map((r) => r.flow_id));
      if (!ctx.alive) return;
      replace(failuresEl, h('ul', { class: 'failure-list' }, runs.map((r) => h('li', { class: 'failure' },
        h('div', { class: 'failure-head' },
          h('a', { href: paths.flowRun(r.id), class: 'run-link' }, r.name),
          flows.get(r.flow_id) ? h('span', { class: 'muted' }, ` · ${flows.get(r.flow_id).name}`) : null,
          stateBadge(r.state_type, r.state_name)),
        h('p', { class: 'state-message' }, (r.state && r.state.message) || 'No state message.'),
        h('p', { class: 'muted small' }, timeCell(r.end_time || r.start_time || r.expected_start_time))))));
    } catch (err) { replace(failuresEl, errorBox(err, loadFailures)); }
  };

  const loadPools = async () => {
    try {
      const pools = await api.post('/work_pools/filter', { limit: 20 });
      if (!ctx.alive) return;
      if (!pools.length) { replace(poolsEl, emptyState('No work pools', 'Work pools appear here once created.', h('a', { href: 'work-pools' }, 'Work pools'))); return; }
      const workers = await Promise.all(pools.map((p) => api.post(`/work_pools/${encodeURIComponent(p.name)}/workers/filter`, { limit: 100 }).catch(() => null)));
      if (!ctx.alive) return;
      replace(poolsEl, h('ul', { class: 'pool-list' }, pools.map((p, i) => {
        const ws = workers[i] || [];
        const online = ws.filter((w) => w.status === 'ONLINE').length;
        const last = ws.map((w) => w.last_heartbeat_time).filter(Boolean).sort().pop();
        const status = p.is_paused ? 'PAUSED' : (p.status || 'NOT_READY');
        return h('li', { class: 'pool' },
          h('a', { href: paths.workPool(p.name) }, p.name),
          h('span', { class: `pill pill-${status.toLowerCase()}` }, status.replace('_', ' ').toLowerCase()),
          h('span', { class: 'muted small' }, workers[i] ? `${online} of ${ws.length} worker${ws.length === 1 ? '' : 's'} online${last ? ' · last heartbeat ' + fmtRelative(last) : ''}` : 'workers unknown'));
      })));
    } catch (err) { replace(poolsEl, errorBox(err, loadPools)); }
  };

  await Promise.all([loadCounts(), loadChart(), loadFailures(), loadPools()]);
}
