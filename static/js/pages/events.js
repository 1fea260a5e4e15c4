// Events (what Prefect 3 clients and the server itself report): the newest first at events, searchable and paged,
// and each one at events/event/<YYYY-MM-DD>/<id> (Prefect's UI paths: the day it occurred, in UTC, narrows the
// look-up), with its resource, related resources and payload, and links to the objects they name.
import { h, replace, debounce } from '../dom.js';
import { api } from '../api.js';
import { pageHeader, errorBox, emptyState, loading, timeCell, table, keyValues, jsonBlock, section } from '../ui.js';
import { paths } from '../router.js';

const PAGE = 50; // the server's largest page of events

// The UI page of the object a resource id names (prefect.flow-run.<id>, ...), or null.
function resourcePath(resource) {
  const rid = resource['prefect.resource.id'] || '';
  const m = /^prefect\.([a-z-]+)\.(.+)$/.exec(rid);
  if (!m) return null;
  const [, kind, key] = m;
  switch (kind) {
    case 'flow-run': return paths.flowRun(key);
    case 'task-run': return paths.taskRun(key);
    case 'flow': return paths.flow(key);
    case 'deployment': return paths.deployment(key);
    case 'block-document': return paths.block(key);
    case 'automation': return paths.automation(key);
    case 'work-queue': return `work-queues/work-queue/${encodeURIComponent(key)}`;
    case 'concurrency-limit': return `concurrency-limits/concurrency-limit/${encodeURIComponent(key)}`;
    // a work pool's page is by name, which its resource carries as a label
    case 'work-pool': return resource['prefect.resource.name'] ? paths.workPool(resource['prefect.resource.name']) : null;
    default: return null;
  }
}

function resourceLabel(resource) {
  return resource['prefect.resource.name'] || resource['prefect.resource.id'] || '—';
}

export function resourceLink(resource) {
  const to = resourcePath(resource);
  const label = resourceLabel(resource);
  return to ? h('a', { href: to, class: 'resource-link', title: resource['prefect.resource.id'] }, label)
    : h('span', { class: 'resource-id', title: resource['prefect.resource.id'] }, label);
}

export function eventsTable(events, emptyText) {
  if (!events.length) return emptyState('No events', emptyText);
  return table([
    { label: 'Occurred', render: (e) => timeCell(e.occurred) },
    { label: 'Event', render: (e) => h('a', { class: 'event-link', href: paths.event(e) }, e.event) },
    { label: 'Resource', render: (e) => resourceLink(e.resource || {}) },
    { label: 'Related', className: 'hide-sm', render: (e) => h('span', { class: 'related-list' },
      (e.related || []).filter((r) => r['prefect.resource.role'] !== 'tag').slice(0, 4).map((r) => resourceLink(r))) },
  ], events, { caption: 'Events', rowClass: () => 'event-row' });
}

// The query of a next_page URL the server gave, as a path under the API.
function nextPagePath(url) {
  return `/events/filter/next${new URL(url, location.href).search}`;
}

export async function eventsPage(ctx, root) {
  document.title = 'Events · prefectlite';
  const search = h('input', { id: 'event-search', type: 'search', placeholder: 'Search events', value: ctx.params.get('q') || '',
    oninput: debounce(() => { const n = new URLSearchParams(ctx.params); if (search.value.trim()) n.set('q', search.value.trim()); else n.delete('q'); ctx.setParams(n); load(); }, 300) });
  const countEl = h('span', { class: 'muted' });
  const list = h('div', null, loading());
  replace(root, pageHeader('Events', { badge: countEl, subtitle: 'What flows, tasks, workers, automations and the server reported, newest first.' }),
    h('div', { class: 'toolbar' }, h('label', { for: 'event-search', class: 'sr-only' }, 'Search events'), search), list);
  const shown = []; // the pages shown so far, newest first: null is the first page, then next_page paths

  function show(page) {
    countEl.textContent = `${page.total.toLocaleString()} event${page.total === 1 ? '' : 's'}`;
    const older = page.next_page ? nextPagePath(page.next_page) : null;
    replace(list, h('div', { class: 'card flush' }, eventsTable(page.events, search.value.trim() ? 'No event matches this search.' : 'Nothing has reported an event yet.')),
      page.total > PAGE ? h('div', { class: 'pager' },
        h('button', { type: 'button', class: 'btn', disabled: shown.length <= 1, onclick: () => { shown.pop(); loadPage(shown[shown.length - 1], false); } }, '‹ Newer'),
        h('button', { type: 'button', class: 'btn', disabled: !older, onclick: () => loadPage(older, true) }, 'Older ›')) : null);
  }
  async function loadPage(path, push) {
    try {
      const q = search.value.trim();
      const page = path ? await api.get(path) : await api.post('/events/filter', { filter: q ? { text: { query: q } } : {}, limit: PAGE });
      if (!ctx.alive) return;
      if (push) shown.push(path);
      show(page);
    } catch (err) { replace(list, errorBox(err, () => loadPage(path, push))); }
  }
  async function load() { shown.length = 0; await loadPage(null, true); }
  await load();
}

function dayWindow(date) {
  const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(date);
  if (!m) return null;
  const start = Date.UTC(Number(m[1]), Number(m[2]) - 1, Number(m[3]));
  if (Number.isNaN(start)) return null;
  // a day either side: a link made with a local date still finds its event
  const day = 86400000;
  return { since: new Date(start - day).toISOString(), until: new Date(start + 2 * day).toISOString() };
}

function notFound(root, why) {
  document.title = 'Event not found · prefectlite';
  replace(root, pageHeader('Event not found', { crumbs: [{ label: 'Events', href: 'events' }] }),
    emptyState('No such event', why, h('a', { class: 'btn', href: 'events' }, 'All events')));
}

export async function eventDetail(ctx, root, date, id) {
  const occurred = dayWindow(date);
  if (!occurred) { notFound(root, `“${date}” is not a date (YYYY-MM-DD): an event's link names the day it occurred.`); return; }
  replace(root, loading());
  const page = await api.post('/events/filter', { filter: { occurred, id: { id: [id] } }, limit: 1 });
  if (!ctx.alive) return;
  const [ev] = page.events;
  if (!ev) { notFound(root, `No event ${id} occurred around ${date}.`); return; }
  document.title = `${ev.event} · Event · prefectlite`;
  const related = ev.related || [];
  replace(root,
    pageHeader(ev.event, { crumbs: [{ label: 'Events', href: 'events' }, { label: date }] }),
    h('div', { class: 'card' }, keyValues([
      ['Occurred', timeCell(ev.occurred)],
      ['Resource', h('span', { class: 'event-resource' }, resourceLink(ev.resource || {}))],
      ['Resource ID', h('code', null, (ev.resource || {})['prefect.resource.id'] || '—')],
      ev.follows ? ['Follows', h('code', null, ev.follows)] : null,
      ['Event ID', h('code', null, ev.id)],
    ])),
    section('Related resources', related.length ? table([
      { label: 'Role', render: (r) => r['prefect.resource.role'] || '—' },
      { label: 'Resource', render: (r) => resourceLink(r) },
      { label: 'ID', className: 'hide-sm', render: (r) => h('code', null, r['prefect.resource.id'] || '—') },
    ], related, { caption: 'Related resources', rowClass: () => 'related-row' }) : h('p', { class: 'muted' }, 'None.')),
    section('Payload', Object.keys(ev.payload || {}).length ? jsonBlock(ev.payload) : h('p', { class: 'muted' }, 'Empty.')),
    h('details', { class: 'card' }, h('summary', null, 'Raw event'), jsonBlock(ev)));
}
