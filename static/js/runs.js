// Flow run tables shared by several pages.
import { h, replace } from './dom.js';
import { api, byIds } from './api.js';
import { stateBadge, tagList, timeCell, table, pager, emptyState, errorBox, loading } from './ui.js';
import { fmtDuration, runDuration } from './format.js';
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
    { label: 'Start', render: (r) => timeCell(r.start_time || r.expected_start_time) },
    { label: 'Duration', className: 'hide-sm', render: (r) => fmtDuration(runDuration(r)) },
    { label: 'Tags', className: 'hide-md', render: (r) => tagList(r.tags) },
  ].filter(Boolean);
  return table(cols, runs, { caption: 'Flow runs', rowClass: () => 'run-row' });
}

// A paged list of flow runs for a fixed filter; used on detail pages.
export function runsBrowser(ctx, filter, { pageSize = 10, emptyText = 'No flow runs yet.', hideFlow, hideDeployment } = {}) {
  const el = h('div', { class: 'runs-browser' }, loading());
  let offset = 0;
  async function load() {
    try {
      const body = { ...filter, sort: 'EXPECTED_START_TIME_DESC', limit: pageSize, offset };
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
