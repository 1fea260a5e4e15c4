import { h, replace, debounce } from '../dom.js';
import { api } from '../api.js';
import { pageHeader, section, errorBox, emptyState, loading, tagList, timeCell, table, pager, keyValues, confirmDialog, runAction, stateBadge } from '../ui.js';
import { runsBrowser } from '../runs.js';
import { describeSchedule, fmtRelative } from '../format.js';
import { paths, navigate } from '../router.js';

export async function flowsPage(ctx, root) {
  document.title = 'Flows · prefectlite';
  const search = h('input', { id: 'flow-search', type: 'search', placeholder: 'Search flows', value: ctx.params.get('q') || '', oninput: debounce(() => { offset = 0; const n = new URLSearchParams(); if (search.value) n.set('q', search.value); ctx.setParams(n); load(); }, 300) });
  const list = h('div', null, loading());
  const countEl = h('span', { class: 'muted' });
  replace(root, pageHeader('Flows', { badge: countEl }),
    h('div', { class: 'toolbar' }, h('label', { for: 'flow-search', class: 'sr-only' }, 'Search flows'), search), list);
  let offset = 0;
  const limit = 25;
  async function load() {
    const filter = search.value.trim() ? { flows: { name: { like_: search.value.trim() } } } : {};
    try {
      const [flows, total] = await Promise.all([
        api.post('/flows/filter', { ...filter, sort: 'NAME_ASC', limit, offset }),
        api.post('/flows/count', filter),
      ]);
      if (!ctx.alive) return;
      countEl.textContent = `${total.toLocaleString()} flow${total === 1 ? '' : 's'}`;
      if (!flows.length) {
        replace(list, filter.flows ? emptyState('No matching flows', `No flow name contains “${search.value}”.`) : emptyState('No flows yet', 'Flows appear here the first time they run against this server.'));
        return;
      }
      // Deployment counts and last runs are secondary: if they cannot be read the list still shows. One small
      // query per flow of the page (bounded by the page size) finds its last run due up to now.
      const now = new Date().toISOString();
      const [deps, lastRuns] = await Promise.all([
        api.post('/deployments/filter', { flows: { id: { any_: flows.map((f) => f.id) } }, limit: 200 }).catch(() => null),
        Promise.all(flows.map((f) => api.post('/flow_runs/filter', {
          flows: { id: { any_: [f.id] } }, flow_runs: { expected_start_time: { before_: now } }, sort: 'EXPECTED_START_TIME_DESC', limit: 1,
        }).then((r) => r[0] || null).catch(() => undefined))),
      ]);
      if (!ctx.alive) return;
      const depCount = new Map();
      for (const d of deps || []) depCount.set(d.flow_id, (depCount.get(d.flow_id) || 0) + 1);
      const lastRun = new Map(flows.map((f, i) => [f.id, lastRuns[i]]));
      const anyTags = flows.some((f) => (f.tags || []).length);
      replace(list, h('div', { class: 'card flush' }, table([
        { label: 'Flow', render: (f) => h('a', { href: paths.flow(f.id) }, f.name) },
        { label: 'Deployments', render: (f) => (deps ? String(depCount.get(f.id) || 0) : '—') },
        { label: 'Last run', render: (f) => {
          const r = lastRun.get(f.id);
          if (r === undefined) return h('span', { class: 'muted' }, '—');
          if (!r) return h('span', { class: 'muted' }, 'Never run');
          return h('span', { class: 'last-run' }, h('a', { href: paths.flowRun(r.id), class: 'run-link' }, r.name), ' ', stateBadge(r.state_type, r.state_name), ' ',
            h('span', { class: 'muted small' }, fmtRelative(r.start_time || r.expected_start_time)));
        } },
        { label: 'Created', className: 'hide-sm', render: (f) => timeCell(f.created) },
        anyTags ? { label: 'Tags', className: 'hide-md', render: (f) => tagList(f.tags) } : null,
      ].filter(Boolean), flows, { caption: 'Flows' })), total > limit ? pager({ offset, limit, total, onChange: (o) => { offset = o; load(); } }) : null);
    } catch (err) { replace(list, errorBox(err, load)); }
  }
  await load();
}

export async function flowDetail(ctx, root, id) {
  const flow = await api.get(`/flows/${encodeURIComponent(id)}`);
  if (!ctx.alive) return;
  document.title = `${flow.name} · Flow · prefectlite`;
  const depsEl = h('div', null, loading());
  const del = h('button', { type: 'button', class: 'btn btn-danger', onclick: async () => {
    if (!await confirmDialog('Delete flow', `Delete the flow “${flow.name}” and its deployments?`, { confirmLabel: 'Delete', danger: true })) return;
    await runAction(del, () => api.del(`/flows/${flow.id}`), 'Flow deleted');
    navigate('flows');
  } }, 'Delete');
  replace(root,
    pageHeader(flow.name, { crumbs: [{ label: 'Flows', href: 'flows' }, { label: flow.name }], actions: [del] }),
    h('div', { class: 'card' }, keyValues([['Flow ID', h('code', null, flow.id)], ['Created', timeCell(flow.created)], ['Tags', tagList(flow.tags)]])),
    section('Runs', runsBrowser(ctx, { flows: { id: { any_: [flow.id] } } }, { pageSize: 15, hideFlow: true, emptyText: 'No run of this flow was due up to now.' }), { id: 'flow-runs' }),
    section('Deployments', depsEl, { id: 'flow-deployments' }));
  try {
    const deps = await api.post('/deployments/filter', { flows: { id: { any_: [flow.id] } }, sort: 'NAME_ASC', limit: 200 });
    if (!ctx.alive) return;
    replace(depsEl, deps.length ? table([
      { label: 'Deployment', render: (d) => h('a', { href: paths.deployment(d.id) }, d.name) },
      { label: 'Schedule', render: (d) => scheduleSummary(d) },
      { label: 'Status', render: (d) => h('span', { class: `pill ${d.paused ? 'pill-paused' : 'pill-ready'}` }, d.paused ? 'Paused' : 'Active') },
      { label: 'Work pool', className: 'hide-sm', render: (d) => d.work_pool_name || '—' },
    ], deps, { caption: 'Deployments' }) : emptyState('No deployments', 'This flow has no deployment.'));
  } catch (err) { replace(depsEl, errorBox(err)); }
}

export function scheduleSummary(d) {
  const scheds = (d.schedules || []).map((s) => describeSchedule(s.schedule) + (s.active === false ? ' (inactive)' : ''));
  if (!scheds.length && d.schedule) scheds.push(describeSchedule(d.schedule));
  return scheds.length ? scheds.join('; ') : h('span', { class: 'muted' }, 'None');
}
