// A task run's page (runs/task-run/<id>, as Prefect's UI and the 3.x SDK have it): state, retries, cache,
// inputs and the upstream task runs they came from, its logs, state history and artifacts, with links to its
// flow run and to any subflow it stands for.
import { h, replace } from '../dom.js';
import { api, byIds } from '../api.js';
import { pageHeader, errorBox, emptyState, loading, stateBadge, tagList, timeCell, keyValues, tabs, table, toast } from '../ui.js';
import { stateTimeline, artifactCards } from '../runparts.js';
import { fmtDuration, runDuration, isTerminal, fmtRelative } from '../format.js';
import { logViewer } from '../logs.js';
import { paths } from '../router.js';

const POLL_MS = 2000;

// task_inputs: {parameter: [{input_type: 'task_run', id} | {input_type: 'parameter', name} | {input_type: 'constant', type}]}
function upstreamIds(taskRun) {
  const ids = [];
  for (const refs of Object.values(taskRun.task_inputs || {})) {
    for (const r of refs || []) if (r && r.input_type === 'task_run' && r.id) ids.push(r.id);
  }
  return [...new Set(ids)];
}

function describeInput(ref, upstream) {
  if (!ref) return '—';
  if (ref.input_type === 'task_run') {
    const t = upstream.get(ref.id);
    return h('span', { class: 'input-ref' }, 'result of ', h('a', { href: paths.taskRun(ref.id) }, t ? t.name : ref.id), t ? [' ', stateBadge(t.state_type, t.state_name)] : null);
  }
  if (ref.input_type === 'parameter') return h('span', null, 'flow parameter ', h('code', null, ref.name));
  if (ref.input_type === 'constant') return h('span', null, 'a constant', ref.type ? [' of type ', h('code', null, ref.type)] : null);
  return h('code', null, JSON.stringify(ref));
}

function retryText(policy) {
  const p = policy || {};
  const retries = p.retries ?? p.max_retries ?? 0;
  if (!retries) return 'No retries';
  const delay = p.retry_delay ?? p.retry_delay_seconds;
  const delays = Array.isArray(delay) ? delay.map((d) => fmtDuration(d)).join(', ') : delay ? fmtDuration(Number(delay)) : 'no delay';
  return `Up to ${retries} retr${retries === 1 ? 'y' : 'ies'}, waiting ${delays}`;
}

export default async function taskRunDetail(ctx, root, id) {
  replace(root, loading());
  let tr = await api.get(`/task_runs/${encodeURIComponent(id)}`);
  if (!ctx.alive) return;
  const [flowRun, subflows] = await Promise.all([
    tr.flow_run_id ? api.get(`/flow_runs/${tr.flow_run_id}`).catch(() => null) : null,
    api.post('/flow_runs/filter', { flow_runs: { parent_task_run_id: { any_: [tr.id] } }, limit: 1 }).catch(() => []),
  ]);
  if (!ctx.alive) return;
  document.title = `${tr.name} · Task run · prefectlite`;

  const headerEl = h('div');
  const summaryEl = h('div');
  // The flow run narrows the search to its logs first (logs are indexed by flow run and time).
  const logFilter = tr.flow_run_id ? { flow_run_id: { any_: [tr.flow_run_id] }, task_run_id: { any_: [tr.id] } } : { task_run_id: { any_: [tr.id] } };
  const logView = logViewer(ctx, { filter: logFilter, label: 'Task run logs', fileName: `${tr.name}.log` });
  const inputsEl = h('div', null, loading());
  const historyEl = h('div', null, loading());
  const artifactsEl = h('div', null, loading());
  const tabList = tabs([
    { id: 'logs', label: 'Logs', content: logView.el },
    { id: 'inputs', label: 'Inputs', content: inputsEl },
    { id: 'state-history', label: 'State history', content: historyEl },
    { id: 'artifacts', label: 'Artifacts', content: artifactsEl },
  ], ctx.params.get('tab') || 'logs', (tab) => {
    const n = new URLSearchParams(ctx.params);
    if (tab === 'logs') n.delete('tab'); else n.set('tab', tab);
    ctx.setParams(n);
  });
  replace(root, headerEl, summaryEl, h('div', { class: 'card' }, tabList.el));

  function render() {
    const crumbs = [{ label: 'Flow runs', href: 'flow-runs' }];
    if (flowRun) crumbs.push({ label: flowRun.name, href: paths.flowRun(flowRun.id) });
    crumbs.push({ label: 'Task runs' });
    replace(headerEl, pageHeader(tr.name, { crumbs, badge: h('span', { class: 'run-state' }, stateBadge(tr.state_type, tr.state_name)) }));
    const sub = subflows[0];
    const expires = tr.cache_expiration;
    replace(summaryEl, h('div', { class: 'card' }, keyValues([
      ['State', h('span', null, stateBadge(tr.state_type, tr.state_name), tr.state && tr.state.message ? h('span', { class: 'state-message inline' }, ` ${tr.state.message}`) : null)],
      ['Flow run', flowRun ? h('a', { href: paths.flowRun(flowRun.id), class: 'flow-run-link' }, flowRun.name) : h('span', { class: 'muted' }, tr.flow_run_id ? 'unavailable' : 'None (a background task)')],
      sub ? ['Subflow run', h('a', { href: paths.flowRun(sub.id) }, sub.name)] : null,
      ['Task key', h('code', null, tr.task_key || '—')],
      ['Dynamic key', h('code', null, String(tr.dynamic_key ?? '—'))],
      ['Expected start', timeCell(tr.expected_start_time)],
      ['Started', timeCell(tr.start_time)],
      ['Ended', timeCell(tr.end_time)],
      ['Duration', h('span', { class: 'task-duration' }, fmtDuration(runDuration(tr)))],
      ['Run count', h('span', { class: 'task-run-count' }, String(tr.run_count ?? 0))],
      ['Retries', h('span', { class: 'task-retries' }, retryText(tr.empirical_policy))],
      ['Cache key', tr.cache_key ? h('code', { class: 'cache-key' }, tr.cache_key) : h('span', { class: 'muted' }, 'Not cached')],
      tr.cache_key ? ['Cache expires', expires ? h('span', { class: 'cache-expiration' }, timeCell(expires), ` (${fmtRelative(expires)})`) : h('span', { class: 'cache-expiration' }, 'Never')] : null,
      ['Tags', tagList(tr.tags)],
      ['Task run ID', h('code', null, tr.id)],
    ])));
  }

  async function loadInputs() {
    try {
      const upstream = await byIds('/task_runs/filter', 'task_runs', upstreamIds(tr));
      if (!ctx.alive) return;
      const rows = Object.entries(tr.task_inputs || {}).flatMap(([param, refs]) => (refs && refs.length ? refs : [null]).map((ref) => ({ param, ref })));
      const ups = [...upstream.values()];
      replace(inputsEl,
        h('h3', { class: 'sub' }, 'Inputs'),
        rows.length ? table([
          { label: 'Parameter', render: (r) => h('code', null, r.param) },
          { label: 'Comes from', render: (r) => (r.ref ? describeInput(r.ref, upstream) : h('span', { class: 'muted' }, 'a value (not tracked)')) },
        ], rows, { caption: 'Task inputs', rowClass: () => 'input-row' }) : emptyState('No inputs', 'This task run was called without arguments.'),
        h('h3', { class: 'sub' }, 'Upstream task runs'),
        ups.length ? h('ul', { class: 'upstream-list' }, ups.map((t) => h('li', null, h('a', { href: paths.taskRun(t.id) }, t.name), ' ', stateBadge(t.state_type, t.state_name))))
          : h('p', { class: 'muted' }, 'None: no input came from another task run.'));
    } catch (err) { replace(inputsEl, errorBox(err, loadInputs)); }
  }

  async function loadHistory() {
    try {
      const states = await api.get(`/task_run_states/?task_run_id=${encodeURIComponent(tr.id)}`);
      if (!ctx.alive) return;
      replace(historyEl, stateTimeline(states, 'task run'));
    } catch (err) { replace(historyEl, errorBox(err, loadHistory)); }
  }

  async function loadArtifacts() {
    try {
      const arts = await api.post('/artifacts/filter', { artifacts: { task_run_id: { any_: [tr.id] } }, sort: 'CREATED_DESC', limit: 50 });
      if (!ctx.alive) return;
      tabList.button('artifacts').textContent = `Artifacts (${arts.length})`;
      replace(artifactsEl, artifactCards(arts, 'task run'));
    } catch (err) { replace(artifactsEl, errorBox(err, loadArtifacts)); }
  }

  let stopPoll = null;
  let polling = false;
  function follow() {
    const live = !isTerminal(tr.state_type);
    logView.setLive(live);
    if (live && !stopPoll) {
      stopPoll = ctx.every(POLL_MS, async () => {
        if (polling) return;
        polling = true;
        try {
          tr = await api.get(`/task_runs/${tr.id}`);
          if (!ctx.alive) return;
          render();
          await Promise.all([logView.tail(), loadHistory()]);
          follow();
        } catch (err) { toast(`Live update failed: ${err.message}`, 'error'); } finally { polling = false; }
      });
    } else if (!live && stopPoll) { stopPoll(); stopPoll = null; }
  }

  render();
  await Promise.all([logView.reload(), loadInputs(), loadHistory(), loadArtifacts()]);
  follow();
}
