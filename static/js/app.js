import { h, replace } from './dom.js';
import { loadSettings, errorText } from './api.js';
import { errorBox, toast } from './ui.js';
import dashboard from './pages/dashboard.js';
import { flowRunsPage } from './pages/flowruns.js';
import flowRunDetail from './pages/flowrun.js';
import { flowsPage, flowDetail } from './pages/flows.js';
import { deploymentsPage, deploymentDetail } from './pages/deployments.js';
import { workPoolsPage, workPoolDetail } from './pages/workpools.js';
import { blocksPage, blockDetail, blockCreate } from './pages/blocks.js';
import variablesPage from './pages/variables.js';
import artifactsPage from './pages/artifacts.js';
import concurrencyPage from './pages/concurrency.js';
import notificationsPage from './pages/notifications.js';
import automationsPage from './pages/automations.js';
import aboutPage from './pages/about.js';

const routes = [
  [/^dashboard$/, 'dashboard', dashboard],
  [/^flow-runs$/, 'flow-runs', flowRunsPage],
  [/^flow-runs\/([^/]+)$/, 'flow-runs', flowRunDetail],
  [/^flows$/, 'flows', flowsPage],
  [/^flows\/([^/]+)$/, 'flows', flowDetail],
  [/^deployments$/, 'deployments', deploymentsPage],
  [/^deployments\/([^/]+)$/, 'deployments', deploymentDetail],
  [/^work-pools$/, 'work-pools', workPoolsPage],
  [/^work-pools\/([^/]+)$/, 'work-pools', workPoolDetail],
  [/^blocks$/, 'blocks', blocksPage],
  [/^blocks\/new$/, 'blocks', blockCreate],
  [/^blocks\/([^/]+)$/, 'blocks', blockDetail],
  [/^variables$/, 'variables', variablesPage],
  [/^artifacts$/, 'artifacts', artifactsPage],
  [/^concurrency-limits$/, 'concurrency-limits', concurrencyPage],
  [/^notifications$/, 'notifications', notificationsPage],
  [/^automations$/, 'automations', automationsPage],
  [/^about$/, 'about', aboutPage],
];

let current = null;

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const q = raw.indexOf('?');
  const path = (q >= 0 ? raw.slice(0, q) : raw).replace(/\/+$/, '') || 'dashboard';
  const params = new URLSearchParams(q >= 0 ? raw.slice(q + 1) : '');
  return { path, params };
}

function makeContext(path, params) {
  const timers = new Set();
  const cleanups = [];
  const ctx = {
    path,
    params,
    alive: true,
    // Updates the query part of the hash without re-rendering the page.
    setParams(next) {
      const qs = next.toString();
      const url = `#/${path}${qs ? '?' + qs : ''}`;
      history.replaceState(null, '', url);
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
  const { path, params } = parseHash();
  if (current) current.dispose();
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
      h('p', null, `There is no page at “#/${path}”. `, h('a', { href: '#/dashboard' }, 'Go to the dashboard')));
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
  try {
    await loadSettings();
  } catch (err) {
    replace(document.getElementById('main'), h('div', { class: 'page' }, h('h1', null, 'prefectlite'), errorBox(err, () => location.reload())));
    return;
  }
  window.addEventListener('hashchange', render);
  if (!location.hash || location.hash === '#' || location.hash === '#/') history.replaceState(null, '', '#/dashboard');
  render();
}

start();
