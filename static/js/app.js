import { h, replace } from './dom.js';
import { loadSettings, errorText } from './api.js';
import { errorBox, toast } from './ui.js';
import dashboard from './pages/dashboard.js';
import { flowRunsPage } from './pages/flowruns.js';
import flowRunDetail from './pages/flowrun.js';
import taskRunDetail from './pages/taskrun.js';
import upcomingPage from './pages/upcoming.js';
import { flowsPage, flowDetail } from './pages/flows.js';
import { deploymentsPage, deploymentDetail } from './pages/deployments.js';
import { workPoolsPage, workPoolDetail, workQueuePage } from './pages/workpools.js';
import { blocksPage, blockDetail, blockCreate } from './pages/blocks.js';
import variablesPage from './pages/variables.js';
import artifactsPage from './pages/artifacts.js';
import concurrencyPage from './pages/concurrency.js';
import notificationsPage from './pages/notifications.js';
import { automationsPage, automationDetail, automationEdit } from './pages/automations.js';
import { eventsPage, eventDetail } from './pages/events.js';
import aboutPage from './pages/about.js';
import { initRoot, onNavigate, currentRoute, legacyRoute, navigate, replaceRoute, interceptLinks } from './router.js';

// Path patterns as Prefect's UI has them (2.x: flow-runs/..., 3.x: runs/...), in one table. navKey marks the menu
// entry that stays highlighted.
const routes = [
  [/^dashboard$/, 'dashboard', dashboard],
  [/^(?:flow-runs|runs)$/, 'flow-runs', flowRunsPage],
  [/^(?:flow-runs|runs)\/upcoming$/, 'flow-runs', upcomingPage],
  [/^(?:flow-runs|runs)\/flow-run\/([^/]+)$/, 'flow-runs', flowRunDetail],
  [/^(?:flow-runs|runs)\/task-run\/([^/]+)$/, 'flow-runs', taskRunDetail],
  [/^flows$/, 'flows', flowsPage],
  [/^flows\/flow\/([^/]+)$/, 'flows', flowDetail],
  [/^deployments$/, 'deployments', deploymentsPage],
  [/^deployments\/deployment\/([^/]+)$/, 'deployments', deploymentDetail],
  [/^work-pools$/, 'work-pools', workPoolsPage],
  [/^work-pools\/work-pool\/([^/]+)(?:\/(?:queue|worker)\/[^/]+)?$/, 'work-pools', workPoolDetail],
  [/^work-queues\/work-queue\/([^/]+)$/, 'work-pools', workQueuePage],
  [/^blocks$/, 'blocks', blocksPage],
  [/^(?:settings\/)?blocks\/catalog$/, 'blocks', (ctx, root) => blocksPage(ctx, root, 'catalog')],
  [/^(?:settings\/)?blocks\/catalog\/([^/]+)(?:\/create)?$/, 'blocks', blockCreate],
  [/^blocks\/block\/([^/]+)$/, 'blocks', blockDetail],
  [/^blocks\/block\/([^/]+)\/edit$/, 'blocks', (ctx, root, id) => blockDetail(ctx, root, id, true)],
  [/^variables$/, 'variables', variablesPage],
  [/^artifacts$/, 'artifacts', artifactsPage],
  [/^artifacts\/(artifact|key)\/([^/]+)$/, 'artifacts', artifactsPage],
  [/^concurrency-limits(?:\/concurrency-limit\/([^/]+))?$/, 'concurrency-limits', concurrencyPage],
  [/^automations$/, 'automations', automationsPage],
  [/^automations\/create$/, 'automations', (ctx, root) => automationEdit(ctx, root, null)],
  [/^automations\/automation\/([^/]+)$/, 'automations', automationDetail],
  [/^automations\/automation\/([^/]+)\/edit$/, 'automations', automationEdit],
  [/^events$/, 'events', eventsPage],
  [/^events\/event\/([^/]+)\/([^/]+)$/, 'events', eventDetail],
  [/^notifications(?:\/create)?$/, 'notifications', notificationsPage],
  [/^(?:about|settings)$/, 'about', aboutPage],
];

let current = null;

function makeContext(path, params) {
  const timers = new Set();
  const cleanups = [];
  const ctx = {
    path,
    params,
    alive: true,
    // Updates the query part of the URL without re-rendering the page.
    setParams(next) {
      const qs = next.toString();
      replaceRoute(`${path}${qs ? '?' + qs : ''}`);
      ctx.params = new URLSearchParams(qs);
    },
    every(ms, fn) {
      const id = setInterval(() => { if (ctx.alive) fn(); }, ms);
      timers.add(id);
      return () => { clearInterval(id); timers.delete(id); };
    },
    later(ms, fn) {
      const id = setTimeout(() => { timers.delete(id); if (ctx.alive) fn(); }, ms);
      timers.add(id);
    },
    onCleanup(fn) { cleanups.push(fn); },
    rerender() { render(); },
    dispose() {
      ctx.alive = false;
      for (const id of timers) { clearInterval(id); clearTimeout(id); }
      timers.clear();
      for (const fn of cleanups) { try { fn(); } catch { /* ignore */ } }
    },
  };
  return ctx;
}

async function render() {
  const { path, params } = currentRoute();
  const moved = legacyRoute(path, params);
  if (moved) { navigate(moved, { replace: true }); return; }
  if (current) current.dispose();
  // A dialog belongs to the page that opened it.
  for (const d of document.querySelectorAll('dialog[open]')) d.close();
  const main = document.getElementById('main');
  const root = h('div', { class: 'page' });
  replace(main, root);
  const ctx = makeContext(path, params);
  current = ctx;
  let match = null;
  let page = null;
  let nav = null;
  for (const [re, navKey, fn] of routes) {
    match = re.exec(path);
    if (match) { page = fn; nav = navKey; break; }
  }
  for (const a of document.querySelectorAll('#nav a')) {
    const on = a.dataset.nav === nav;
    a.classList.toggle('active', on);
    if (on) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  document.getElementById('nav').classList.remove('open');
  document.querySelector('.nav-toggle').setAttribute('aria-expanded', 'false');
  if (!page) {
    document.title = 'Not found · prefectlite';
    replace(root, h('div', { class: 'page-header' }, h('h1', null, 'Page not found')),
      h('p', null, `There is no page at “/${path}”. `, h('a', { href: 'dashboard' }, 'Go to the dashboard')));
    return;
  }
  try {
    await page(ctx, root, ...match.slice(1).map(decodeURIComponent));
  } catch (err) {
    if (ctx.alive) {
      console.error(err);
      replace(root, h('div', { class: 'page-header' }, h('h1', null, 'This page could not be loaded')), errorBox(err, () => render()));
    }
  }
}

async function start() {
  initRoot();
  const toggle = document.querySelector('.nav-toggle');
  toggle.addEventListener('click', () => {
    const nav = document.getElementById('nav');
    const open = nav.classList.toggle('open');
    toggle.setAttribute('aria-expanded', String(open));
  });
  document.getElementById('nav').addEventListener('click', (ev) => {
    if (ev.target.closest('a')) {
      document.getElementById('nav').classList.remove('open');
      toggle.setAttribute('aria-expanded', 'false');
    }
  });
  window.addEventListener('unhandledrejection', (ev) => toast(errorText(ev.reason), 'error'));
  // A form the browser refuses to send (a field it finds invalid, told in its own bubble) no longer shows the
  // error of an earlier attempt, which would read as the answer to this one.
  document.addEventListener('invalid', (ev) => {
    const form = ev.target && ev.target.form;
    if (form) for (const box of form.querySelectorAll('.form-error')) box.remove();
  }, true);
  try {
    await loadSettings();
  } catch (err) {
    replace(document.getElementById('main'), h('div', { class: 'page' }, h('h1', null, 'prefectlite'), errorBox(err, () => location.reload())));
    return;
  }
  onNavigate(render);
  interceptLinks();
  // Links of the hash-routed UI (#/flow-runs/<id>) still lead to their page.
  window.addEventListener('hashchange', () => { if (location.hash.startsWith('#/')) navigate(location.hash.slice(2), { replace: true }); });
  if (location.hash.startsWith('#/')) navigate(location.hash.slice(2), { replace: true }); else render();
}

start();
