import { h, replace } from '../dom.js';
import { api } from '../api.js';
import { pageHeader, section, errorBox, emptyState, loading, timeCell, table, keyValues, runAction, modal, field, formError, toast, confirmDialog } from '../ui.js';
import { fmtRelative } from '../format.js';
import { paths, navigate } from '../router.js';

function statusPill(status, paused) {
  const s = paused ? 'PAUSED' : (status || 'NOT_READY');
  const label = { READY: 'Ready', NOT_READY: 'Not ready', PAUSED: 'Paused', ONLINE: 'Online', OFFLINE: 'Offline' }[s] || s;
  return h('span', { class: `pill pill-${s.toLowerCase()}` }, label);
}

function createPoolDialog(onDone) {
  const name = h('input', { id: 'pool-name', type: 'text', required: true });
  const type = h('input', { id: 'pool-type', type: 'text', value: 'process' });
  const limit = h('input', { id: 'pool-limit', type: 'number', min: 0 });
  const err = h('div');
  const m = modal('Create work pool', h('form', { class: 'form', onsubmit: async (e) => {
    e.preventDefault();
    const body = { name: name.value.trim(), type: type.value.trim() || 'process' };
    if (limit.value !== '') body.concurrency_limit = Number(limit.value);
    try { await api.post('/work_pools/', body); m.close(); toast(`Work pool “${body.name}” created`, 'success'); onDone(); } catch (ex) { formError(err, ex); }
  } }, field('Name', name), field('Type', type), field('Concurrency limit', limit, { help: 'Empty for no limit.' }), err,
  h('div', { class: 'form-actions' }, h('button', { type: 'button', class: 'btn', onclick: () => m.close() }, 'Cancel'), h('button', { type: 'submit', class: 'btn btn-primary' }, 'Create'))));
}

export async function workPoolsPage(ctx, root) {
  document.title = 'Work pools · prefectlite';
  const list = h('div', null, loading());
  replace(root, pageHeader('Work pools', { actions: [h('button', { type: 'button', class: 'btn btn-primary', onclick: () => createPoolDialog(() => ctx.rerender()) }, '+ Work pool')] }), list);
  try {
    const pools = await api.post('/work_pools/filter', { limit: 200 });
    if (!ctx.alive) return;
    if (!pools.length) { replace(list, emptyState('No work pools', 'A work pool is where deployments send runs for workers to pick up.')); return; }
    const workers = await Promise.all(pools.map((p) => api.post(`/work_pools/${encodeURIComponent(p.name)}/workers/filter`, { limit: 200 }).catch(() => null)));
    if (!ctx.alive) return;
    replace(list, h('div', { class: 'card flush' }, table([
      { label: 'Work pool', render: (p) => h('a', { href: paths.workPool(p.name) }, p.name) },
      { label: 'Type', render: (p) => p.type },
      { label: 'Status', render: (p) => statusPill(p.status, p.is_paused) },
      { label: 'Workers', render: (p) => { const ws = workers[pools.indexOf(p)]; return ws ? `${ws.filter((w) => w.status === 'ONLINE').length} online / ${ws.length}` : '—'; } },
      { label: 'Concurrency', className: 'hide-sm', render: (p) => (p.concurrency_limit === null || p.concurrency_limit === undefined ? 'Unlimited' : String(p.concurrency_limit)) },
    ], pools, { caption: 'Work pools' })));
  } catch (err) { replace(list, errorBox(err, () => ctx.rerender())); }
}

export async function workPoolDetail(ctx, root, name) {
  const pool = await api.get(`/work_pools/${encodeURIComponent(name)}`);
  if (!ctx.alive) return;
  document.title = `${pool.name} · Work pool · prefectlite`;
  const queuesEl = h('div', null, loading());
  const workersEl = h('div', null, loading());
  const pauseBtn = h('button', { type: 'button', class: 'btn', onclick: async () => {
    await runAction(pauseBtn, () => api.patch(`/work_pools/${encodeURIComponent(pool.name)}`, { is_paused: !pool.is_paused }), pool.is_paused ? 'Work pool resumed' : 'Work pool paused');
    ctx.rerender();
  } }, pool.is_paused ? 'Resume' : 'Pause');
  const delBtn = h('button', { type: 'button', class: 'btn btn-danger', onclick: async () => {
    if (!await confirmDialog('Delete work pool', `Delete the work pool “${pool.name}”?`, { confirmLabel: 'Delete', danger: true })) return;
    await runAction(delBtn, () => api.del(`/work_pools/${encodeURIComponent(pool.name)}`), 'Work pool deleted');
    navigate('work-pools');
  } }, 'Delete');
  replace(root,
    pageHeader(pool.name, { crumbs: [{ label: 'Work pools', href: 'work-pools' }, { label: pool.name }], badge: statusPill(pool.status, pool.is_paused), actions: [pauseBtn, delBtn], subtitle: pool.description || null }),
    h('div', { class: 'card' }, keyValues([
      ['Type', pool.type], ['Status', statusPill(pool.status, pool.is_paused)],
      ['Concurrency limit', pool.concurrency_limit === null || pool.concurrency_limit === undefined ? 'Unlimited' : String(pool.concurrency_limit)],
      ['Created', timeCell(pool.created)], ['Work pool ID', h('code', null, pool.id)],
    ])),
    section('Work queues', queuesEl, { id: 'queues' }),
    section('Workers', workersEl, { id: 'workers' }));
  const enc = encodeURIComponent(pool.name);
  await Promise.all([
    api.post(`/work_pools/${enc}/queues/filter`, { limit: 200 }).then((qs) => {
      if (!ctx.alive) return;
      qs.sort((a, b) => (a.priority ?? 0) - (b.priority ?? 0));
      replace(queuesEl, qs.length ? table([
        { label: 'Queue', render: (q) => q.name },
        { label: 'Priority', render: (q) => String(q.priority ?? '—') },
        { label: 'Status', render: (q) => statusPill(q.status, q.is_paused) },
        { label: 'Concurrency', className: 'hide-sm', render: (q) => (q.concurrency_limit === null || q.concurrency_limit === undefined ? 'Unlimited' : String(q.concurrency_limit)) },
        { label: 'Last polled', render: (q) => (q.last_polled ? h('span', { title: new Date(q.last_polled).toLocaleString() }, fmtRelative(q.last_polled)) : h('span', { class: 'muted' }, 'Never')) },
      ], qs, { caption: 'Work queues' }) : emptyState('No work queues', 'This pool has no queue.'));
    }).catch((err) => replace(queuesEl, errorBox(err))),
    api.post(`/work_pools/${enc}/workers/filter`, { limit: 200 }).then((ws) => {
      if (!ctx.alive) return;
      replace(workersEl, ws.length ? table([
        { label: 'Worker', render: (w) => w.name },
        { label: 'Status', render: (w) => statusPill(w.status) },
        { label: 'Last heartbeat', render: (w) => (w.last_heartbeat_time ? h('span', { class: 'heartbeat' }, fmtRelative(w.last_heartbeat_time), h('span', { class: 'muted small' }, ` (${new Date(w.last_heartbeat_time).toLocaleString()})`)) : h('span', { class: 'muted' }, 'Never')) },
        { label: 'Heartbeat interval', className: 'hide-sm', render: (w) => (w.heartbeat_interval_seconds ? `${w.heartbeat_interval_seconds}s` : '—') },
      ], ws, { caption: 'Workers' }) : emptyState('No workers', 'No worker has polled this pool yet.'));
    }).catch((err) => replace(workersEl, errorBox(err))),
  ]);
}

// work-queues/work-queue/<id> (a link Prefect's SDK makes): the queue's pool, with its queues.
export async function workQueuePage(ctx, root, id) {
  const q = await api.get(`/work_queues/${encodeURIComponent(id)}`);
  if (!ctx.alive) return;
  if (q.work_pool_name) { navigate(paths.workPool(q.work_pool_name), { replace: true }); return; }
  document.title = `${q.name} · Work queue · prefectlite`;
  replace(root, pageHeader(q.name, { crumbs: [{ label: 'Work pools', href: 'work-pools' }, { label: 'Work queue' }] }),
    section('Work queue', keyValues([['Priority', String(q.priority ?? '—')], ['Paused', q.is_paused ? 'Yes' : 'No'], ['Work queue ID', h('code', null, q.id)]])));
}
