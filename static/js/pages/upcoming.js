// Upcoming: the next runs of each deployment that has runs scheduled in the future (the run lists show the past
// and present only). Bounded: a page of deployments, a few runs each.
import { h, replace } from '../dom.js';
import { api, byIds } from '../api.js';
import { pageHeader, errorBox, emptyState, loading, pager, stateBadge, timeCell } from '../ui.js';
import { fmtRelative, fmtNumber } from '../format.js';
import { paths } from '../router.js';
import { viewSwitch } from './flowruns.js';

const DEPLOYMENTS_PER_PAGE = 20;
const RUNS_PER_DEPLOYMENT = 5;

export default async function upcomingPage(ctx, root) {
  document.title = 'Upcoming runs · prefectlite';
  const list = h('div', { class: 'results' }, loading());
  const countEl = h('span', { class: 'muted' });
  replace(root, pageHeader('Upcoming runs', { badge: countEl, actions: [viewSwitch('upcoming')] }), list);
  let offset = 0;

  async function load() {
    const now = new Date().toISOString();
    const future = { expected_start_time: { after_: now }, state: { type: { any_: ['SCHEDULED'] } } };
    list.setAttribute('aria-busy', 'true');
    try {
      const [deps, total] = await Promise.all([
        api.post('/deployments/filter', { flow_runs: future, sort: 'NAME_ASC', limit: DEPLOYMENTS_PER_PAGE, offset }),
        api.post('/deployments/count', { flow_runs: future }),
      ]);
      if (!ctx.alive) return;
      countEl.textContent = `${fmtNumber(total)} deployment${total === 1 ? '' : 's'} with runs ahead`;
      if (!deps.length) { replace(list, emptyState('Nothing upcoming', 'No deployment has a run scheduled in the future.')); return; }
      const [flows, perDep] = await Promise.all([
        byIds('/flows/filter', 'flows', deps.map((d) => d.flow_id)).catch(() => new Map()),
        Promise.all(deps.map((d) => {
          const f = { flow_runs: { ...future, deployment_id: { any_: [d.id] } } };
          return Promise.all([api.post('/flow_runs/filter', { ...f, sort: 'EXPECTED_START_TIME_ASC', limit: RUNS_PER_DEPLOYMENT }), api.post('/flow_runs/count', f)]);
        })),
      ]);
      if (!ctx.alive) return;
      // Soonest first: the deployment whose next run comes first leads.
      const rows = deps.map((d, i) => ({ d, runs: perDep[i][0], count: perDep[i][1] }))
        .sort((a, b) => (a.runs[0] ? a.runs[0].expected_start_time : '').localeCompare(b.runs[0] ? b.runs[0].expected_start_time : ''));
      replace(list, h('div', { class: 'upcoming-list' }, rows.map(({ d, runs, count }) => h('section', { class: 'card upcoming', dataset: { deployment: d.id } },
        h('div', { class: 'card-head' },
          h('h2', null, h('a', { href: paths.deployment(d.id) }, d.name)),
          flows.get(d.flow_id) ? h('span', { class: 'muted' }, h('a', { href: paths.flow(d.flow_id) }, flows.get(d.flow_id).name)) : null,
          h('span', { class: 'muted small upcoming-count' }, `${fmtNumber(count)} upcoming`)),
        h('ol', { class: 'upcoming-runs' }, runs.map((r) => h('li', { class: 'upcoming-run' },
          h('a', { href: paths.flowRun(r.id), class: 'run-link' }, r.name), ' ', stateBadge(r.state_type, r.state_name), ' ',
          timeCell(r.expected_start_time), h('span', { class: 'muted small' }, ` ${fmtRelative(r.expected_start_time)}`))))))),
      total > DEPLOYMENTS_PER_PAGE ? pager({ offset, limit: DEPLOYMENTS_PER_PAGE, total, onChange: (o) => { offset = o; load(); } }) : null);
    } catch (err) {
      if (ctx.alive) replace(list, errorBox(err, load));
    } finally { list.removeAttribute('aria-busy'); }
  }
  await load();
}
