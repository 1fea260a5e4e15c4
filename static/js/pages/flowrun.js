import { h, replace } from '../dom.js';
import { api } from '../api.js';
import { pageHeader, errorBox, emptyState, loading, stateBadge, tagList, timeCell, table, keyValues, jsonBlock, tabs, confirmDialog, runAction, toast, pager } from '../ui.js';
import { stateTimeline, artifactCards } from '../runparts.js';
import { runsTable, runMeta } from '../runs.js';
import { fmtDuration, runDuration, isTerminal } from '../format.js';
import { logViewer } from '../logs.js';
import { runGraph } from '../graph.js';
import { paths, navigate } from '../router.js';

const POLL_MS = 2000;

export default async function flowRunDetail(ctx, root, id) {
  replace(root, loading());
  let run = await api.get(`/flow_runs/${encodeURIComponent(id)}`);
  if (!ctx.alive) return;
  const [flow, deployment] = await Promise.all([
    api.get(`/flows/${run.flow_id}`).catch(() => null),
    run.deployment_id ? api.get(`/deployments/${run.deployment_id}`).catch(() => null) : null,
  ]);
  if (!ctx.alive) return;
  document.title = `${run.name} · Flow run · prefectlite`;

  const headerEl = h('div');
  const summaryEl = h('div');
  const taskNames = new Map();
  const logView = logViewer(ctx, { filter: { flow_run_id: { any_: [run.id] } }, label: 'Flow run logs', fileName: `${run.name}.log`, taskNames });
  const taskEl = h('div', null, loading());
  const subflowEl = h('div', null, loading());
  const artifactsEl = h('div', null, loading());
  const paramsEl = h('div');
  const historyEl = h('div', null, loading());

  const tabList = tabs([
    { id: 'logs', label: 'Logs', content: logView.el },
    { id: 'task-runs', label: 'Task runs', content: taskEl },
    { id: 'subflow-runs', label: 'Subflow runs', content: subflowEl },
    { id: 'artifacts', label: 'Artifacts', content: artifactsEl },
    { id: 'parameters', label: 'Parameters', content: paramsEl },
    { id: 'state-history', label: 'State history', content: historyEl },
  ], ctx.params.get('tab') || 'logs', (tab) => {
    const n = new URLSearchParams(ctx.params);
    if (tab === 'logs') n.delete('tab'); else n.set('tab', tab);
    ctx.setParams(n);
  });

  replace(root, headerEl, summaryEl, h('div', { class: 'card' }, tabList.el));

  // ---- header, summary, actions
  function renderHeader() {
    const terminal = isTerminal(run.state_type);
    const actions = [];
    if (!terminal) actions.push(h('button', { type: 'button', class: 'btn', onclick: (e) => cancelRun(e.currentTarget) }, 'Cancel'));
    if (terminal) actions.push(h('button', { type: 'button', class: 'btn', onclick: (e) => retryRun(e.currentTarget) }, 'Retry'));
    actions.push(h('button', { type: 'button', class: 'btn btn-danger', onclick: (e) => deleteRun(e.currentTarget) }, 'Delete'));
    replace(headerEl, pageHeader(run.name, {
      crumbs: [{ label: 'Flow runs', href: 'flow-runs' }, flow ? { label: flow.name, href: paths.flow(flow.id) } : { label: 'Unknown flow' }],
      badge: h('span', { class: 'run-state' }, stateBadge(run.state_type, run.state_name)),
      actions,
    }));
    replace(summaryEl, h('div', { class: 'card' }, keyValues([
      ['State', h('span', null, stateBadge(run.state_type, run.state_name), run.state && run.state.message ? h('span', { class: 'state-message inline' }, ` ${run.state.message}`) : null)],
      ['Flow', flow ? h('a', { href: paths.flow(flow.id) }, flow.name) : run.flow_id],
      ['Deployment', deployment ? h('a', { href: paths.deployment(deployment.id) }, deployment.name) : h('span', { class: 'muted' }, 'None (ad hoc run)')],
      ['Expected start', timeCell(run.expected_start_time)],
      ['Started', timeCell(run.start_time)],
      ['Ended', timeCell(run.end_time)],
      ['Duration', fmtDuration(runDuration(run))],
      ['Run count', String(run.run_count ?? 0)],
      run.work_pool_name ? ['Work pool', h('a', { href: paths.workPool(run.work_pool_name) }, `${run.work_pool_name}${run.work_queue_name ? ' / ' + run.work_queue_name : ''}`)] : null,
      ['Tags', tagList(run.tags)],
      run.parent_task_run_id ? ['Parent run', parentEl] : null,
      ['Run ID', h('code', null, run.id)],
    ])));
  }
  const parentEl = h('span', { class: 'muted' }, '…');
  if (run.parent_task_run_id) {
    api.get(`/task_runs/${run.parent_task_run_id}`).then(async (tr) => {
      const parent = await api.get(`/flow_runs/${tr.flow_run_id}`);
      replace(parentEl, h('a', { href: paths.flowRun(parent.id) }, parent.name), h('span', { class: 'muted' }, ` (task ${tr.name})`));
      parentEl.classList.remove('muted');
    }).catch((err) => replace(parentEl, `unavailable (${err.message})`));
  }

  async function setState(state, force = false) {
    const r = await api.post(`/flow_runs/${run.id}/set_state`, { state, force });
    if (r && r.status && r.status !== 'ACCEPT') {
      const reason = (r.details && r.details.reason) || r.status;
      throw new Error(`The server answered ${r.status}: ${reason}`);
    }
    return r;
  }
  async function cancelRun(btn) {
    const running = run.state_type === 'RUNNING';
    if (!await confirmDialog('Cancel flow run', `Cancel “${run.name}”? ${running ? 'The run will be asked to stop (Cancelling).' : 'It will be marked Cancelled.'}`, { confirmLabel: 'Cancel run', danger: true })) return;
    await runAction(btn, () => setState(running
      ? { type: 'CANCELLING', name: 'Cancelling', message: 'Cancelled from the UI' }
      : { type: 'CANCELLED', name: 'Cancelled', message: 'Cancelled from the UI' }), running ? 'Cancellation requested' : 'Flow run cancelled');
    refresh();
  }
  async function retryRun(btn) {
    if (!await confirmDialog('Retry flow run', `Schedule “${run.name}” to run again?`, { confirmLabel: 'Retry' })) return;
    await runAction(btn, () => setState({ type: 'SCHEDULED', name: 'AwaitingRetry', message: 'Retry requested from the UI' }, true), 'Flow run scheduled for retry');
    refresh();
  }
  async function deleteRun(btn) {
    if (!await confirmDialog('Delete flow run', `Delete “${run.name}” with its task runs and logs? This cannot be undone.`, { confirmLabel: 'Delete', danger: true })) return;
    await runAction(btn, () => api.del(`/flow_runs/${run.id}`), 'Flow run deleted');
    navigate('flow-runs');
  }

  // ---- task runs, subflows. A subflow's run has a task run of its own in the parent (its "parent task run");
  // that one is the subflow, not a task, and is counted under subflows only.
  let taskRuns = [];
  const TASK_PAGE = 50;
  let taskOffset = 0;
  const graph = runGraph(ctx, run);
  const ownTasks = { task_runs: { flow_run_id: { any_: [run.id] }, subflow_runs: { exists_: false } } };
  async function loadTaskRuns() {
    try {
      const [page, total] = await Promise.all([
        api.post('/task_runs/filter', { ...ownTasks, sort: 'EXPECTED_START_TIME_ASC', limit: TASK_PAGE, offset: taskOffset }),
        api.post('/task_runs/count', ownTasks),
      ]);
      if (!ctx.alive) return;
      taskRuns = page;
      for (const t of page) taskNames.set(t.id, t.name);
      tabList.button('task-runs').textContent = `Task runs (${total})`;
      if (!total) { replace(taskEl, emptyState('No task runs', 'This flow run has not created any task run.')); return; }
      replace(taskEl,
        h('h3', { class: 'sub' }, 'Run graph'),
        graph.el,
        h('h3', { class: 'sub' }, 'Task runs'),
        table([
          { label: 'Task run', render: (t) => h('a', { class: 'task-name', href: paths.taskRun(t.id) }, t.name) },
          { label: 'State', render: (t) => stateBadge(t.state_type, t.state_name) },
          { label: 'Start', render: (t) => timeCell(t.start_time) },
          { label: 'Duration', render: (t) => fmtDuration(runDuration(t)) },
          { label: 'Runs', className: 'hide-sm', render: (t) => String(t.run_count ?? 0) },
          { label: 'Tags', className: 'hide-md', render: (t) => tagList(t.tags) },
        ], taskRuns, { caption: 'Task runs', rowClass: () => 'task-row' }),
        total > TASK_PAGE ? pager({ offset: taskOffset, limit: TASK_PAGE, total, onChange: (o) => { taskOffset = o; loadTaskRuns(); } }) : null);
    } catch (err) { replace(taskEl, errorBox(err, loadTaskRuns)); }
  }
  async function loadSubflows() {
    try {
      const subs = await api.post('/flow_runs/filter', { flow_runs: { parent_flow_run_id: { any_: [run.id] } }, sort: 'EXPECTED_START_TIME_ASC', limit: 200 });
      if (!ctx.alive) return;
      tabList.button('subflow-runs').textContent = `Subflow runs (${subs.length}${subs.length === 200 ? '+' : ''})`;
      if (!subs.length) { replace(subflowEl, emptyState('No subflow runs', 'This flow run did not start other flows.')); return; }
      const meta = await runMeta(subs);
      if (!ctx.alive) return;
      replace(subflowEl, runsTable(subs, meta));
    } catch (err) { replace(subflowEl, errorBox(err, loadSubflows)); }
  }

  // ---- artifacts
  async function loadArtifacts() {
    try {
      const arts = await api.post('/artifacts/filter', { artifacts: { flow_run_id: { any_: [run.id] } }, sort: 'CREATED_DESC', limit: 100 });
      if (!ctx.alive) return;
      tabList.button('artifacts').textContent = `Artifacts (${arts.length})`;
      replace(artifactsEl, artifactCards(arts, 'flow run', taskNames));
    } catch (err) { replace(artifactsEl, errorBox(err, loadArtifacts)); }
  }

  function renderParams() {
    const params = run.parameters || {};
    replace(paramsEl, Object.keys(params).length ? jsonBlock(params) : emptyState('No parameters', 'This flow run was called without parameters.'));
  }

  async function loadHistory() {
    try {
      const states = await api.get(`/flow_run_states/?flow_run_id=${encodeURIComponent(run.id)}`);
      if (!ctx.alive) return;
      replace(historyEl, stateTimeline(states, 'run'));
    } catch (err) { replace(historyEl, errorBox(err, loadHistory)); }
  }

  // ---- live refresh while the run is not terminal
  let polling = false;
  async function refresh() {
    try {
      run = await api.get(`/flow_runs/${run.id}`);
    } catch (err) {
      if (err.status === 404) { replace(root, errorBox(err)); ctx.dispose(); return; }
      throw err;
    }
    if (!ctx.alive) return;
    renderHeader();
    renderParams();
    await Promise.all([loadTaskRuns(), loadSubflows(), loadHistory(), loadArtifacts(), logView.tail()]);
    // The graph reads every task run: redrawn every few polls while the run is live, and once at its end.
    refreshes++;
    if (refreshes % 5 === 0 || isTerminal(run.state_type)) graph.reload();
    startPolling();
  }
  let refreshes = 0;
  let stopPoll = null;
  function startPolling() {
    const live = !isTerminal(run.state_type);
    logView.setLive(live);
    if (live && !stopPoll) {
      stopPoll = ctx.every(POLL_MS, async () => {
        if (polling) return;
        polling = true;
        try { await refresh(); } catch (err) { toast(`Live update failed: ${err.message}`, 'error'); } finally { polling = false; }
      });
    } else if (!live && stopPoll) { stopPoll(); stopPoll = null; }
  }

  renderHeader();
  renderParams();
  await loadTaskRuns();
  await Promise.all([logView.reload(), loadSubflows(), loadArtifacts(), loadHistory()]);
  startPolling();
}
