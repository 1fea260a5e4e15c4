// Flow run tables shared by several pages.
import { h, replace } from './dom.js';
import { api, byIds } from './api.js';
import { stateBadge, tagList, timeCell, table, pager, emptyState, errorBox, loading } from './ui.js';
import { fmtDuration, runDuration, fmtRelative } from './format.js';
import { paths } from './router.js';

export async function runMeta(runs) {
  // Names are a nicety: a failed lookup leaves the ids unnamed rather than hiding the runs.
  const [flows, deployments] = await Promise.all([
    byIds('/flows/filter', 'flows', runs.map((r) => r.flow_id)).catch(() => new Map()),
    byIds('/deployments/filter', 'deployments', runs.map((r) => r.deployment_id)).catch(() => new Map()),
  ]);
  return { flows, deployments };
}

export function runsTable(runs, { flows = new Map(), deployments = new Map(), hideFlow = false, hideDeployment = false } = {}) {
  const cols = [
    { label: 'Run', render: (r) => h('a', { href: paths.flowRun(r.id), class: 'run-link' }, r.name || r.id) },
    hideFlow ? null : { label: 'Flow', className: 'hide-sm', render: (r) => { const f = flows.get(r.flow_id); return f ? h('a', { href: paths.flow(f.id) }, f.name) : h('span', { class: 'muted' }, '—'); } },
    hideDeployment ? null : { label: 'Deployment', className: 'hide-sm', render: (r) => { const d = deployments.get(r.deployment_id); return d ? h('a', { href: paths.deployment(d.id) }, d.name) : h('span', { class: 'muted' }, '—'); } },
    { label: 'State', render: (r) => stateBadge(r.state_type, r.state_name) },
    { label: 'Start', render: (r) => h('span', null, timeCell(r.start_time || r.expected_start_time), !r.start_time && r.expected_start_time ? h('span', { class: 'muted small' }, ` (${fmtRelative(r.expected_start_time)})`) : null) },
    // a run that never started has no duration (not "0ms"): a scheduled one's is in the future
    { label: 'Duration', className: 'hide-sm', render: (r) => (r.start_time || r.total_run_time ? fmtDuration(runDuration(r)) : h('span', { class: 'muted' }, '—')) },
    { label: 'Tags', className: 'hide-md', render: (r) => tagList(r.tags) },
  ].filter(Boolean);
  return table(cols, runs, { caption: 'Flow runs', rowClass: () => 'run-row' });
}

// A paged list of flow runs for a fixed filter; used on detail pages. `upcoming`: the runs scheduled after now,
// soonest first; otherwise the runs due up to now, newest first (the future does not bury the present).
export function runsBrowser(ctx, fixed, { pageSize = 10, emptyText = 'No flow runs yet.', hideFlow, hideDeployment, upcoming = false } = {}) {
  const el = h('div', { class: 'runs-browser' }, loading());
  let offset = 0;
  async function load() {
    const now = new Date().toISOString();
    const when = upcoming ? { expected_start_time: { after_: now }, state: { type: { any_: ['SCHEDULED'] } } } : { expected_start_time: { before_: now } };
    const filter = { ...fixed, flow_runs: { ...(fixed.flow_runs || {}), ...when } };
    try {
      const body = { ...filter, sort: upcoming ? 'EXPECTED_START_TIME_ASC' : 'EXPECTED_START_TIME_DESC', limit: pageSize, offset };
      const [runs, total] = await Promise.all([
        api.post('/flow_runs/filter', body),
        api.post('/flow_runs/count', filter),
      ]);
      if (!ctx.alive) return;
      if (!runs.length && offset === 0) { replace(el, emptyState('No flow runs', emptyText)); return; }
      const meta = await runMeta(runs);
      if (!ctx.alive) return;
      replace(el, runsTable(runs, { ...meta, hideFlow, hideDeployment }),
        total > pageSize ? pager({ offset, limit: pageSize, total, onChange: (o) => { offset = o; load(); } }) : null);
    } catch (err) {
      replace(el, errorBox(err, load));
    }
  }
  load();
  return el;
}
