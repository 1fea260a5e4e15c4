// Path routes under the UI's root: the pages live at the paths Prefect's UI uses (and the SDKs and CLI print),
// e.g. flow-runs/flow-run/<id>. The server writes a relative <base href> into index.html for the depth it
// was asked at; start() pins it to the root's path, so relative links ("flows/flow/<id>") resolve there
// wherever the page is, also behind a proxy that adds a path prefix.
let rootPath = '/';
const listeners = [];

export function initRoot() {
  rootPath = new URL(document.baseURI).pathname.replace(/[^/]*$/, '');
  document.querySelector('base').setAttribute('href', rootPath);
}

export function onNavigate(fn) { listeners.push(fn); }

// The route of the current location: its path below the root (no leading slash) and its query.
export function currentRoute() {
  const path = location.pathname.startsWith(rootPath) ? location.pathname.slice(rootPath.length) : location.pathname.replace(/^\/+/, '');
  return { path: path.replace(/\/+$/, ''), params: new URLSearchParams(location.search) };
}

function urlOf(route) { return rootPath + String(route).replace(/^\/+/, ''); }

// Go to a route of the UI (e.g. 'flows/flow/<id>', 'flow-runs?state=Failed') and render it.
export function navigate(route, { replace = false } = {}) {
  if (replace) history.replaceState(null, '', urlOf(route)); else history.pushState(null, '', urlOf(route));
  for (const fn of listeners) fn();
}

// Change the current URL without rendering again (a page's filters, tabs).
export function replaceRoute(route) { history.replaceState(null, '', urlOf(route)); }

// Route paths of the UI's objects: one place, so that every link has the shape the SDKs print.
export const paths = {
  flowRun: (id) => `flow-runs/flow-run/${encodeURIComponent(id)}`,
  taskRun: (id) => `runs/task-run/${encodeURIComponent(id)}`,
  flow: (id) => `flows/flow/${encodeURIComponent(id)}`,
  deployment: (id) => `deployments/deployment/${encodeURIComponent(id)}`,
  workPool: (name) => `work-pools/work-pool/${encodeURIComponent(name)}`,
  block: (id) => `blocks/block/${encodeURIComponent(id)}`,
  blockEdit: (id) => `blocks/block/${encodeURIComponent(id)}/edit`,
  blockCreate: (slug) => `blocks/catalog/${encodeURIComponent(slug)}/create`,
  automation: (id) => `automations/automation/${encodeURIComponent(id)}`,
  automationEdit: (id) => `automations/automation/${encodeURIComponent(id)}/edit`,
  automationCreate: () => 'automations/create',
  // an event by the day it occurred (UTC) and its id, as Prefect's UI and url_for() have it
  event: (ev) => `events/event/${new Date(ev.occurred).toISOString().slice(0, 10)}/${encodeURIComponent(ev.id)}`,
};

// Links of the hash-routed UI (#/flow-runs/<id>, ...) and their short path forms, in today's shapes.
const LEGACY = [
  [/^flow-runs\/(?!flow-run$|task-run$|upcoming$)([^/]+)$/, (id) => paths.flowRun(id)],
  [/^flows\/(?!flow$)([^/]+)$/, (id) => paths.flow(id)],
  [/^deployments\/(?!deployment$)([^/]+)$/, (id) => paths.deployment(id)],
  [/^work-pools\/(?!work-pool$)([^/]+)$/, (name) => paths.workPool(name)],
  [/^blocks\/(?!block$|catalog$|new$)([^/]+)$/, (id) => paths.block(id)],
  [/^automations\/(?!automation$|create$)([^/]+)$/, (id) => paths.automation(id)],
];

// The current-day route for an old one, or null when it is current already.
export function legacyRoute(path, params) {
  if (path === '') return 'dashboard' + (params.toString() ? `?${params}` : '');
  if (path === 'automations/new') return paths.automationCreate();
  if (path === 'blocks/new') {
    const slug = params.get('type');
    return slug ? paths.blockCreate(slug) : 'blocks/catalog';
  }
  for (const [re, to] of LEGACY) {
    const m = re.exec(path);
    if (!m) continue;
    const target = to(decodeURIComponent(m[1]));
    if (params.get('edit') === '1' && target.startsWith('blocks/block/')) return `${target}/edit`;
    return target + (params.toString() ? `?${params}` : '');
  }
  return null;
}

// Clicks on links to the UI's own pages change the route without loading the page again.
export function interceptLinks() {
  document.addEventListener('click', (ev) => {
    if (ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
    const a = ev.target.closest && ev.target.closest('a[href]');
    if (!a || (a.target && a.target !== '_self') || a.hasAttribute('download')) return;
    const url = new URL(a.href, document.baseURI);
    if (url.origin !== location.origin || !url.pathname.startsWith(rootPath)) return;
    const rest = url.pathname.slice(rootPath.length);
    if (/^(api|docs)(\/|$)/.test(rest) || /\.[a-z0-9]+$/i.test(rest.split('/')[0])) return;
    if (url.pathname === location.pathname && url.search === location.search && url.hash) return;
    ev.preventDefault();
    navigate(rest + url.search);
  });
  window.addEventListener('popstate', () => { for (const fn of listeners) fn(); });
}
