import { h, replace } from '../dom.js';
import { api, byIds } from '../api.js';
import { pageHeader, errorBox, emptyState, loading, timeCell, pager } from '../ui.js';
import { renderArtifact } from '../artifact.js';

export default async function artifactsPage(ctx, root) {
  document.title = 'Artifacts · prefectlite';
  const all = ctx.params.get('all') === '1';
  const list = h('div', null, loading());
  const countEl = h('span', { class: 'muted' });
  const toggle = h('div', { class: 'segmented', role: 'group', 'aria-label': 'Which artifacts' },
    h('button', { type: 'button', class: all ? null : 'active', 'aria-pressed': String(!all), onclick: () => { location.hash = '#/artifacts'; } }, 'Latest per key'),
    h('button', { type: 'button', class: all ? 'active' : null, 'aria-pressed': String(all), onclick: () => { location.hash = '#/artifacts?all=1'; } }, 'All artifacts'));
  replace(root, pageHeader('Artifacts', { badge: countEl, actions: [toggle] }), list);
  let offset = 0;
  const limit = 25;
  async function load() {
    try {
      const [arts, total] = all
        ? await Promise.all([api.post('/artifacts/filter', { sort: 'CREATED_DESC', limit, offset }), api.post('/artifacts/count', {})])
        : await Promise.all([api.post('/artifacts/latest/filter', { sort: 'UPDATED_DESC', limit, offset }), api.post('/artifacts/latest/count', {})]);
      if (!ctx.alive) return;
      countEl.textContent = `${total.toLocaleString()} ${all ? 'artifact' : 'key'}${total === 1 ? '' : 's'}`;
      if (!arts.length) { replace(list, emptyState('No artifacts yet', all ? 'Artifacts created by flow and task runs appear here.' : 'Artifacts created with a key appear here, newest version per key.')); return; }
      const runs = await byIds('/flow_runs/filter', 'flow_runs', arts.map((a) => a.flow_run_id));
      if (!ctx.alive) return;
      replace(list, h('div', { class: 'artifact-list' }, arts.map((a) => {
        const run = runs.get(a.flow_run_id);
        return h('details', { class: 'card artifact-item', dataset: { key: a.key || '' } },
          h('summary', null,
            h('span', { class: 'artifact-key' }, a.key || 'Unnamed artifact'),
            h('span', { class: 'pill' }, a.type || 'unknown'),
            run ? h('span', { class: 'muted small' }, 'from ', h('a', { href: `#/flow-runs/${run.id}` }, run.name)) : null,
            h('span', { class: 'muted small' }, timeCell(a.updated || a.created))),
          a.description ? h('p', { class: 'muted' }, a.description) : null,
          h('div', { class: 'artifact-body' }, renderArtifact(a)));
      })), total > limit ? pager({ offset, limit, total, onChange: (o) => { offset = o; load(); } }) : null);
    } catch (err) { replace(list, errorBox(err, load)); }
  }
  await load();
}
