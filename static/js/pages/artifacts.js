import { h, replace } from '../dom.js';
import { api, byIds } from '../api.js';
import { pageHeader, errorBox, emptyState, loading, timeCell, pager } from '../ui.js';
import { renderArtifact } from '../artifact.js';
import { paths, navigate } from '../router.js';

// An artifact as a card, open, with where it came from (flow, flow run, task run).
function artifactCard(a, { runs, flows }) {
  const run = runs.get(a.flow_run_id);
  const flow = run && flows.get(run.flow_id);
  return h('article', { class: 'card artifact-item', dataset: { key: a.key || '', id: a.id } },
    h('header', { class: 'artifact-head' },
      a.key ? h('a', { class: 'artifact-key', href: `artifacts/key/${encodeURIComponent(a.key)}` }, a.key)
        : h('a', { class: 'artifact-key', href: `artifacts/artifact/${encodeURIComponent(a.id)}` }, 'Unnamed artifact'),
      h('span', { class: 'pill' }, a.type || 'unknown'),
      flow ? h('span', { class: 'muted small artifact-flow' }, h('a', { href: paths.flow(flow.id) }, flow.name)) : null,
      run ? h('span', { class: 'muted small' }, 'run ', h('a', { href: paths.flowRun(run.id) }, run.name)) : null,
      a.task_run_id ? h('span', { class: 'muted small' }, h('a', { href: paths.taskRun(a.task_run_id) }, 'task run')) : null,
      h('span', { class: 'muted small' }, timeCell(a.updated || a.created))),
    a.description ? h('p', { class: 'muted' }, a.description) : null,
    h('div', { class: 'artifact-body' }, renderArtifact(a)));
}

async function sources(arts) {
  const runs = await byIds('/flow_runs/filter', 'flow_runs', arts.map((a) => a.flow_run_id)).catch(() => new Map());
  const flows = await byIds('/flows/filter', 'flows', [...runs.values()].map((r) => r.flow_id)).catch(() => new Map());
  return { runs, flows };
}

// /artifacts (latest per key, or all), /artifacts/key/<key> (its versions), /artifacts/artifact/<id> (one).
export default async function artifactsPage(ctx, root, kind, value) {
  document.title = 'Artifacts · prefectlite';
  if (kind === 'artifact') {
    const a = await api.get(`/artifacts/${encodeURIComponent(value)}`);
    if (!ctx.alive) return;
    const src = await sources([a]);
    if (!ctx.alive) return;
    document.title = `${a.key || 'Artifact'} · Artifacts · prefectlite`;
    replace(root, pageHeader(a.key || 'Unnamed artifact', { crumbs: [{ label: 'Artifacts', href: 'artifacts' }, { label: a.key || a.id }] }),
      h('div', { class: 'artifact-list' }, artifactCard(a, src)));
    return;
  }
  const all = ctx.params.get('all') === '1';
  const list = h('div', null, loading());
  const countEl = h('span', { class: 'muted' });
  const toggle = kind === 'key' ? null : h('div', { class: 'segmented', role: 'group', 'aria-label': 'Which artifacts' },
    h('button', { type: 'button', class: all ? null : 'active', 'aria-pressed': String(!all), onclick: () => navigate('artifacts') }, 'Latest per key'),
    h('button', { type: 'button', class: all ? 'active' : null, 'aria-pressed': String(all), onclick: () => navigate('artifacts?all=1') }, 'All artifacts'));
  replace(root, pageHeader(kind === 'key' ? value : 'Artifacts', {
    badge: countEl, actions: toggle ? [toggle] : null,
    crumbs: kind === 'key' ? [{ label: 'Artifacts', href: 'artifacts' }, { label: value }] : null }), list);
  let offset = 0;
  const limit = 25;
  async function load() {
    try {
      const byKey = { artifacts: { key: { any_: [value] } } };
      const [arts, total] = kind === 'key'
        ? await Promise.all([api.post('/artifacts/filter', { ...byKey, sort: 'CREATED_DESC', limit, offset }), api.post('/artifacts/count', byKey)])
        : all
          ? await Promise.all([api.post('/artifacts/filter', { sort: 'CREATED_DESC', limit, offset }), api.post('/artifacts/count', {})])
          : await Promise.all([api.post('/artifacts/latest/filter', { sort: 'UPDATED_DESC', limit, offset }), api.post('/artifacts/latest/count', {})]);
      if (!ctx.alive) return;
      const noun = kind === 'key' ? 'version' : all ? 'artifact' : 'key';
      countEl.textContent = `${total.toLocaleString()} ${noun}${total === 1 ? '' : 's'}`;
      if (!arts.length) { replace(list, emptyState('No artifacts yet', all ? 'Artifacts created by flow and task runs appear here.' : 'Artifacts created with a key appear here, newest version per key.')); return; }
      // The latest-per-key rows carry the latest artifact's id as latest_id.
      const shown = arts.map((a) => (a.latest_id ? { ...a, id: a.latest_id } : a));
      const src = await sources(shown);
      if (!ctx.alive) return;
      replace(list, h('div', { class: 'artifact-list' }, shown.map((a) => artifactCard(a, src))),
        total > limit ? pager({ offset, limit, total, onChange: (o) => { offset = o; load(); } }) : null);
    } catch (err) { replace(list, errorBox(err, load)); }
  }
  await load();
}
