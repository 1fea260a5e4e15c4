import { h, replace } from '../dom.js';
import { api, byIds } from '../api.js';
import { pageHeader, section, errorBox, emptyState, loading, tagList, timeCell, table, pager, keyValues, jsonBlock, modal, confirmDialog, runAction, toast, field, formError, parseTags } from '../ui.js';
import { runsBrowser } from '../runs.js';
import { scheduleSummary } from './flows.js';
import { schemaForm } from '../schemaform.js';
import { describeSchedule, fmtRelative } from '../format.js';
import { paths, navigate } from '../router.js';

// Paused, or Ready / Not ready as the server derives it from the last poll of a worker or runner serving it.
function statusPill(d) {
  if (d.paused) return h('span', { class: 'pill pill-paused deployment-status' }, 'Paused');
  const ready = d.status === 'READY';
  const why = d.last_polled ? `Last polled ${fmtRelative(d.last_polled)}` : 'Never polled by a worker or runner';
  return h('span', { class: `pill ${ready ? 'pill-ready' : 'pill-not_ready'} deployment-status`, title: why }, ready ? 'Ready' : 'Not ready');
}

async function togglePause(d, btn) {
  const path = d.paused ? 'resume_deployment' : 'pause_deployment';
  await runAction(btn, () => api.post(`/deployments/${d.id}/${path}`, {}), d.paused ? `Deployment “${d.name}” resumed` : `Deployment “${d.name}” paused`);
}

// The "Run" dialog: parameter overrides, then POST /deployments/{id}/create_flow_run.
export function openRunDialog(d) {
  const schema = d.parameter_openapi_schema || {};
  const hasProps = schema.properties && Object.keys(schema.properties).length;
  const form = hasProps ? schemaForm(schema, d.parameters || {}, { idPrefix: 'param' }) : null;
  const raw = h('textarea', { id: 'run-params-json', class: 'mono', rows: 6, spellcheck: 'false' });
  raw.value = JSON.stringify(d.parameters || {}, null, 2);
  const nameIn = h('input', { id: 'run-name', type: 'text', placeholder: 'Generated when empty' });
  const tagsIn = h('input', { id: 'run-tags', type: 'text', placeholder: 'tag-a, tag-b' });
  const err = h('div');
  const submit = h('button', { type: 'submit', class: 'btn btn-primary' }, 'Run');
  const el = h('form', { class: 'form', onsubmit: async (e) => {
    e.preventDefault();
    let parameters;
    if (form) {
      const r = form.values();
      if (r.errors.length) { formError(err, r.errors.join('; ')); return; }
      parameters = r.values;
    } else {
      try { parameters = raw.value.trim() ? JSON.parse(raw.value) : {}; } catch (ex) { formError(err, `Parameters are not valid JSON: ${ex.message}`); return; }
    }
    const body = { parameters };
    if (nameIn.value.trim()) body.name = nameIn.value.trim();
    const tags = parseTags(tagsIn.value);
    if (tags.length) body.tags = tags;
    submit.disabled = true;
    try {
      const run = await api.post(`/deployments/${d.id}/create_flow_run`, body);
      m.close();
      toast(`Flow run “${run.name}” created`, 'success');
      navigate(paths.flowRun(run.id));
    } catch (ex) { formError(err, ex); } finally { submit.disabled = false; }
  } },
  hasProps ? h('fieldset', null, h('legend', null, 'Parameters'), form.el) : field('Parameters (JSON)', raw, { help: 'Overrides merged over the deployment’s defaults.' }),
  field('Run name', nameIn), field('Tags', tagsIn, { help: 'Comma separated.' }),
  err, h('div', { class: 'form-actions' }, h('button', { type: 'button', class: 'btn', onclick: () => m.close() }, 'Cancel'), submit));
  const m = modal(`Run ${d.name}`, el);
  return m;
}

export async function deploymentsPage(ctx, root) {
  document.title = 'Deployments · prefectlite';
  const list = h('div', null, loading());
  const countEl = h('span', { class: 'muted' });
  replace(root, pageHeader('Deployments', { badge: countEl }), list);
  let offset = 0;
  const limit = 50;
  async function load() {
    try {
      const [deps, total] = await Promise.all([
        api.post('/deployments/filter', { sort: 'NAME_ASC', limit, offset }),
        api.post('/deployments/count', {}),
      ]);
      if (!ctx.alive) return;
      countEl.textContent = `${total.toLocaleString()} deployment${total === 1 ? '' : 's'}`;
      if (!deps.length) { replace(list, emptyState('No deployments yet', 'Create one with `prefect deploy` or `flow.serve()`; it will show up here.')); return; }
      const flows = await byIds('/flows/filter', 'flows', deps.map((d) => d.flow_id));
      if (!ctx.alive) return;
      replace(list, h('div', { class: 'card flush' }, table([
        { label: 'Deployment', render: (d) => h('a', { href: paths.deployment(d.id) }, d.name) },
        { label: 'Flow', className: 'hide-sm', render: (d) => (flows.get(d.flow_id) ? h('a', { href: paths.flow(d.flow_id) }, flows.get(d.flow_id).name) : '—') },
        { label: 'Schedule', className: 'hide-sm', render: (d) => scheduleSummary(d) },
        { label: 'Status', render: (d) => statusPill(d) },
        { label: 'Work pool', className: 'hide-md', render: (d) => d.work_pool_name || h('span', { class: 'muted' }, '—') },
        { label: 'Tags', className: 'hide-md', render: (d) => tagList(d.tags) },
        { label: 'Actions', render: (d) => h('div', { class: 'row-actions' },
          h('button', { type: 'button', class: 'btn btn-small', onclick: () => openRunDialog(d) }, 'Run'),
          h('button', { type: 'button', class: 'btn btn-small', onclick: async (e) => { await togglePause(d, e.currentTarget); load(); } }, d.paused ? 'Resume' : 'Pause')) },
      ], deps, { caption: 'Deployments' })), total > limit ? pager({ offset, limit, total, onChange: (o) => { offset = o; load(); } }) : null);
    } catch (err) { replace(list, errorBox(err, load)); }
  }
  await load();
}

export async function deploymentDetail(ctx, root, id) {
  const d = await api.get(`/deployments/${encodeURIComponent(id)}`);
  if (!ctx.alive) return;
  document.title = `${d.name} · Deployment · prefectlite`;
  const flow = await api.get(`/flows/${d.flow_id}`).catch(() => null);
  if (!ctx.alive) return;
  const runBtn = h('button', { type: 'button', class: 'btn btn-primary', onclick: () => openRunDialog(d) }, 'Run');
  const pauseBtn = h('button', { type: 'button', class: 'btn', onclick: async () => { await togglePause(d, pauseBtn); ctx.rerender(); } }, d.paused ? 'Resume' : 'Pause');
  const delBtn = h('button', { type: 'button', class: 'btn btn-danger', onclick: async () => {
    if (!await confirmDialog('Delete deployment', `Delete the deployment “${d.name}”? Its runs are kept.`, { confirmLabel: 'Delete', danger: true })) return;
    await runAction(delBtn, () => api.del(`/deployments/${d.id}`), 'Deployment deleted');
    navigate('deployments');
  } }, 'Delete');
  const schedules = (d.schedules || []);
  const schedulesEl = h('div', null, loading());
  const nextTimes = new Map();
  const renderSchedules = () => replace(schedulesEl, table([
    { label: 'Schedule', render: (s) => h('span', { class: 'schedule-sentence' }, describeSchedule(s.schedule)) },
    { label: 'Active', render: (s) => (s.active === false ? 'No' : 'Yes') },
    { label: 'Next five times', render: (s) => (nextTimes.has(s.id)
      ? h('ol', { class: 'next-times' }, nextTimes.get(s.id).map((t) => h('li', null, timeCell(t))))
      : h('span', { class: 'muted' }, '—')) },
  ], schedules, { caption: 'Schedules', rowClass: () => 'schedule-row' }));
  if (schedules.length) {
    api.get(`/deployments/${d.id}/next_schedule_times?count=5`).then((all) => {
      for (const a of all) nextTimes.set(a.schedule_id, a.times);
    }).catch(() => {}).finally(() => { if (ctx.alive) renderSchedules(); });
  }
  replace(root,
    pageHeader(d.name, {
      crumbs: [{ label: 'Deployments', href: 'deployments' }, flow ? { label: flow.name, href: paths.flow(flow.id) } : { label: 'flow' }],
      badge: statusPill(d), actions: [runBtn, pauseBtn, delBtn],
      subtitle: d.description || null,
    }),
    h('div', { class: 'card' }, keyValues([
      ['Flow', flow ? h('a', { href: paths.flow(flow.id) }, flow.name) : d.flow_id],
      ['Status', statusPill(d)],
      ['Schedule', scheduleSummary(d)],
      ['Work pool', d.work_pool_name ? h('a', { href: paths.workPool(d.work_pool_name) }, `${d.work_pool_name}${d.work_queue_name ? ' / ' + d.work_queue_name : ''}`) : h('span', { class: 'muted' }, 'None')],
      ['Version', d.version || '—'],
      ['Entrypoint', d.entrypoint ? h('code', null, d.entrypoint) : '—'],
      ['Last polled', timeCell(d.last_polled)],
      ['Tags', tagList(d.tags)],
      ['Created', timeCell(d.created)],
      ['Deployment ID', h('code', null, d.id)],
    ])),
    schedules.length ? section('Schedules', schedulesEl, { id: 'deployment-schedules' }) : null,
    section('Default parameters', Object.keys(d.parameters || {}).length ? jsonBlock(d.parameters) : emptyState('No default parameters', 'Runs use the flow’s own defaults.')),
    section('Upcoming runs', runsBrowser(ctx, { flow_runs: { deployment_id: { any_: [d.id] } } }, { pageSize: 5, hideDeployment: true, upcoming: true, emptyText: 'No run of this deployment is scheduled.' }), { id: 'deployment-upcoming' }),
    section('Runs', runsBrowser(ctx, { flow_runs: { deployment_id: { any_: [d.id] } } }, { pageSize: 15, hideDeployment: true, emptyText: 'No run of this deployment was due up to now (its scheduled runs are under Upcoming runs).' }), { id: 'deployment-runs' }));
}
