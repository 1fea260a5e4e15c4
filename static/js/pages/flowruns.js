import { h, replace, debounce } from '../dom.js';
import { api } from '../api.js';
import { pageHeader, errorBox, emptyState, loading, pager, parseTags } from '../ui.js';
import { runsTable, runMeta } from '../runs.js';
import { STATE_TYPES, STATE_NAMES, stateName, fmtNumber, parseStateToken } from '../format.js';
import { navigate } from '../router.js';

const RANGES = {
  '': 'Up to now', '1h': 'Past hour', '24h': 'Past 24 hours', '7d': 'Past 7 days', '30d': 'Past 30 days', custom: 'Custom range…',
};
const RANGE_SECONDS = { '1h': 3600, '24h': 86400, '7d': 7 * 86400, '30d': 30 * 86400 };
const SORTS = { EXPECTED_START_TIME_DESC: 'Newest first', EXPECTED_START_TIME_ASC: 'Oldest first', NAME_ASC: 'Name A–Z', NAME_DESC: 'Name Z–A' };

function toLocalInput(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  if (isNaN(d)) return '';
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
}

// state=FAILED,Late (any case): types and names, either matching.
export function stateFilter(tokens) {
  const types = [];
  const names = [];
  for (const token of tokens) {
    const parsed = parseStateToken(token);
    if (parsed && parsed.type) types.push(parsed.type);
    else if (parsed && parsed.name) names.push(parsed.name);
  }
  if (types.length && names.length) return { operator: 'or_', type: { any_: types }, name: { any_: names } };
  if (types.length) return { type: { any_: types } };
  if (names.length) return { name: { any_: names } };
  return null;
}

export function stateTokens(params) {
  return (params.get('state') || '').split(',').map(parseStateToken).filter(Boolean).map((p) => p.type || p.name);
}

// The runs a list shows: those due up to now (the future has its own view, Upcoming), narrowed by the filters.
export function buildRunFilter(params, now = new Date()) {
  const fr = {};
  const state = stateFilter(stateTokens(params));
  if (state) fr.state = state;
  const q = params.get('q');
  if (q) fr.name = { like_: q };
  const tags = parseTags(params.get('tags'));
  if (tags.length) fr.tags = { all_: tags };
  const range = params.get('range') || '';
  fr.expected_start_time = { before_: now.toISOString() };
  if (RANGE_SECONDS[range]) fr.expected_start_time.after_ = new Date(now.getTime() - RANGE_SECONDS[range] * 1000).toISOString();
  if (range === 'custom') {
    const t = {};
    if (params.get('from')) t.after_ = new Date(params.get('from')).toISOString();
    if (params.get('to')) t.before_ = new Date(params.get('to')).toISOString();
    fr.expected_start_time = t;
  }
  const body = { flow_runs: fr };
  if (params.get('flow')) body.flows = { id: { any_: [params.get('flow')] } };
  if (params.get('deployment')) fr.deployment_id = { any_: [params.get('deployment')] };
  return body;
}

export function viewSwitch(active) {
  return h('div', { class: 'segmented', role: 'group', 'aria-label': 'Which runs' },
    h('a', { href: 'flow-runs', class: active === 'past' ? 'active' : null, 'aria-current': active === 'past' ? 'page' : null }, 'Past and present'),
    h('a', { href: 'flow-runs/upcoming', class: active === 'upcoming' ? 'active' : null, 'aria-current': active === 'upcoming' ? 'page' : null }, 'Upcoming'));
}

export async function flowRunsPage(ctx, root) {
  document.title = 'Flow runs · prefectlite';
  const p = ctx.params;
  const selected = new Set(stateTokens(p));
  const box = (value, label) => h('label', { class: 'check' }, h('input', { type: 'checkbox', value, checked: selected.has(value), onchange: () => update() }), ' ', label);
  const stateBoxes = [...STATE_TYPES.map((t) => box(t, stateName(t))), ...Object.keys(STATE_NAMES).map((n) => box(n, n))];
  const stateSummary = h('span', null);
  const stateMenu = h('details', { class: 'dropdown' }, h('summary', { class: 'btn', 'aria-label': 'Filter by state' }, stateSummary),
    h('div', { class: 'dropdown-body' }, h('p', { class: 'dropdown-title muted small' }, 'Types'), stateBoxes.slice(0, STATE_TYPES.length),
      h('p', { class: 'dropdown-title muted small' }, 'Names'), stateBoxes.slice(STATE_TYPES.length)));
  // Opened near the screen's right edge (the right column of a phone's filters), the menu moves left to stay on it.
  stateMenu.addEventListener('toggle', () => {
    const body = stateMenu.querySelector('.dropdown-body');
    body.style.left = '';
    if (!stateMenu.open) return;
    const over = body.getBoundingClientRect().right - (document.documentElement.clientWidth - 8);
    if (over > 0) body.style.left = `${-over}px`;
  });
  const flowSel = h('select', { id: 'filter-flow', onchange: () => update() }, h('option', { value: '' }, 'All flows'));
  const depSel = h('select', { id: 'filter-deployment', onchange: () => update() }, h('option', { value: '' }, 'All deployments'));
  const tagsIn = h('input', { id: 'filter-tags', type: 'text', placeholder: 'tag-a, tag-b', value: p.get('tags') || '', oninput: debounce(() => update(), 350) });
  const searchIn = h('input', { id: 'filter-search', type: 'search', placeholder: 'Search by run name', value: p.get('q') || '', oninput: debounce(() => update(), 350) });
  const rangeSel = h('select', { id: 'filter-range', onchange: () => update() }, Object.entries(RANGES).map(([k, v]) => h('option', { value: k, selected: (p.get('range') || '') === k }, v)));
  const fromIn = h('input', { id: 'filter-from', type: 'datetime-local', value: toLocalInput(p.get('from')), onchange: () => update() });
  const toIn = h('input', { id: 'filter-to', type: 'datetime-local', value: toLocalInput(p.get('to')), onchange: () => update() });
  const customRange = h('div', { class: 'custom-range' }, h('label', { for: 'filter-from' }, 'From'), fromIn, h('label', { for: 'filter-to' }, 'To'), toIn);
  const sortSel = h('select', { id: 'filter-sort', onchange: () => update() }, Object.entries(SORTS).map(([k, v]) => h('option', { value: k, selected: (p.get('sort') || 'EXPECTED_START_TIME_DESC') === k }, v)));
  const sizeSel = h('select', { id: 'filter-size', onchange: () => update() }, [25, 50, 100].map((n) => h('option', { value: n, selected: String(n) === (p.get('size') || '25') }, `${n} per page`)));
  const clearAll = () => navigate(ctx.path);
  const clearBtn = h('button', { type: 'button', class: 'btn btn-ghost', onclick: clearAll }, 'Clear filters');
  const countEl = h('span', { class: 'muted' });
  const results = h('div', { class: 'results' }, loading());
  const lbl = (text, input) => h('div', { class: 'filter' }, h('label', { for: input.id }, text), input);

  replace(root,
    pageHeader('Flow runs', { badge: countEl, actions: [viewSwitch('past')] }),
    h('form', { class: 'filters card', role: 'search', 'aria-label': 'Flow run filters', onsubmit: (e) => { e.preventDefault(); update(); } },
      lbl('Name', searchIn),
      h('div', { class: 'filter' }, h('span', { class: 'filter-label' }, 'State'), stateMenu),
      lbl('Flow', flowSel), lbl('Deployment', depSel), lbl('Tags', tagsIn), lbl('Time', rangeSel), customRange,
      lbl('Sort', sortSel), lbl('Page size', sizeSel), h('div', { class: 'filter filter-end' }, clearBtn)),
    results);

  let offset = (Math.max(1, parseInt(p.get('page') || '1', 10)) - 1) * parseInt(p.get('size') || '25', 10);
  let seq = 0;

  function readParams(keepPage) {
    const n = new URLSearchParams();
    const states = stateBoxes.map((l) => l.querySelector('input')).filter((i) => i.checked).map((i) => i.value);
    if (states.length) n.set('state', states.join(','));
    if (searchIn.value.trim()) n.set('q', searchIn.value.trim());
    if (flowSel.value) n.set('flow', flowSel.value);
    if (depSel.value) n.set('deployment', depSel.value);
    if (tagsIn.value.trim()) n.set('tags', tagsIn.value.trim());
    if (rangeSel.value) n.set('range', rangeSel.value);
    if (rangeSel.value === 'custom') {
      if (fromIn.value) n.set('from', new Date(fromIn.value).toISOString());
      if (toIn.value) n.set('to', new Date(toIn.value).toISOString());
    }
    if (sortSel.value !== 'EXPECTED_START_TIME_DESC') n.set('sort', sortSel.value);
    if (sizeSel.value !== '25') n.set('size', sizeSel.value);
    if (keepPage && offset) n.set('page', String(offset / Number(sizeSel.value) + 1));
    return n;
  }

  function update(keepPage = false) {
    if (!keepPage) offset = 0;
    ctx.setParams(readParams(keepPage));
    load();
  }

  async function load() {
    const my = ++seq;
    const params = ctx.params;
    const states = stateTokens(params);
    stateSummary.textContent = states.length ? states.map((t) => (STATE_TYPES.includes(t) ? stateName(t) : t)).join(', ') : 'All';
    customRange.hidden = rangeSel.value !== 'custom';
    const limit = Number(sizeSel.value);
    const filter = buildRunFilter(params);
    results.setAttribute('aria-busy', 'true');
    try {
      // The rows show as soon as they come; the count (a longer query over many runs) fills the pager after.
      const counting = api.post('/flow_runs/count', filter);
      counting.catch(() => {});
      const runs = await api.post('/flow_runs/filter', { ...filter, sort: sortSel.value, limit, offset });
      if (my !== seq || !ctx.alive) return;
      const meta = await runMeta(runs);
      if (my !== seq || !ctx.alive) return;
      const filtered = [...params.keys()].some((k) => !['page', 'size', 'sort'].includes(k));
      if (!runs.length && offset === 0) {
        countEl.textContent = '0 runs';
        replace(results, filtered ? emptyState('No matching flow runs', 'No flow run matches these filters.', clearBtn.cloneNode(true)) : emptyState('No flow runs yet', 'Flow runs appear here once a flow runs against this server.'));
        if (filtered) results.querySelector('button').addEventListener('click', clearAll);
        return;
      }
      const pagerEl = h('div', { class: 'pager' }, h('span', { class: 'muted pager-info' }, `${fmtNumber(offset + 1)}–${fmtNumber(offset + runs.length)} of …`));
      replace(results, h('div', { class: 'card flush' }, runsTable(runs, meta)), pagerEl);
      results.removeAttribute('aria-busy');
      const total = await counting;
      if (my !== seq || !ctx.alive) return;
      countEl.textContent = `${fmtNumber(total)} run${total === 1 ? '' : 's'}`;
      pagerEl.replaceWith(pager({ offset, limit, total, onChange: (o) => { offset = o; update(true); root.scrollIntoView?.(); } }));
    } catch (err) {
      if (my === seq && ctx.alive) replace(results, errorBox(err, load));
    } finally {
      results.removeAttribute('aria-busy');
    }
  }

  // Options for the flow and deployment pickers (capped; the list never loads all runs).
  Promise.all([
    api.post('/flows/filter', { sort: 'NAME_ASC', limit: 200 }),
    api.post('/deployments/filter', { sort: 'NAME_ASC', limit: 200 }),
  ]).then(([flows, deps]) => {
    if (!ctx.alive) return;
    for (const o of root.querySelectorAll('option[data-placeholder]')) {
      if (flows.some((f) => f.id === o.value) || deps.some((d) => d.id === o.value)) o.remove();
    }
    for (const f of flows) flowSel.appendChild(h('option', { value: f.id, selected: f.id === p.get('flow') }, f.name));
    for (const d of deps) depSel.appendChild(h('option', { value: d.id, selected: d.id === p.get('deployment') }, d.name));
  }).catch(() => {});
  if (p.get('flow')) flowSel.appendChild(h('option', { value: p.get('flow'), selected: true, dataset: { placeholder: '1' } }, 'Selected flow'));
  if (p.get('deployment')) depSel.appendChild(h('option', { value: p.get('deployment'), selected: true, dataset: { placeholder: '1' } }, 'Selected deployment'));
  await load();
}
