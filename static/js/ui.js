// Shared UI pieces: badges, tables, pagers, dialogs, toasts, error and empty states.
import { h, replace } from './dom.js';
import { errorText } from './api.js';
import { stateColor, stateName, fmtDateTimeParts, fmtRelative, parseTime } from './format.js';

export function stateBadge(type, name) {
  const color = stateColor(type, name);
  return h('span', { class: 'state-badge', style: { '--state': color }, dataset: { state: type || '', name: name || '' }, title: type ? stateName(type) : 'Unknown' },
    h('span', { class: 'dot', 'aria-hidden': 'true' }), name || stateName(type));
}

export function tagList(tags) {
  if (!tags || !tags.length) return h('span', { class: 'muted' }, '—');
  return h('span', { class: 'tags' }, tags.map((t) => h('span', { class: 'tag' }, t)));
}

export function timeCell(iso) {
  if (!iso) return h('span', { class: 'muted' }, '—');
  const parts = fmtDateTimeParts(iso);
  const at = parts ? parts.findIndex((p) => p.type === 'hour') : -1;
  if (at <= 0) return h('time', { datetime: iso, title: fmtRelative(iso) }, parts ? parts.map((p) => p.value).join('') : iso);
  // The date and the time each stay on one line (a narrow column breaks between them), and this year's dates
  // can drop their year where room is short (phones' tables, by CSS).
  const thisYear = parseTime(iso).getFullYear() === new Date().getFullYear();
  const y = parts.findIndex((p) => p.type === 'year');
  const last = parts[at - 1].value;
  const dateNodes = parts.slice(0, at).map((p, i) => {
    const value = i === at - 1 ? last.trimEnd() : p.value;
    return thisYear && (i === y || (i === y - 1 && p.type === 'literal')) ? h('span', { class: 'dt-year' }, value) : value;
  });
  return h('time', { datetime: iso, title: fmtRelative(iso) }, h('span', { class: 'dt-part' }, dateNodes),
    last.slice(last.trimEnd().length) || ' ', h('span', { class: 'dt-part' }, parts.slice(at).map((p) => p.value).join('')));
}

export function pageHeader(title, { subtitle, crumbs, actions, badge } = {}) {
  return h('div', { class: 'page-header' },
    crumbs ? h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' }, crumbs.map((c, i) => [i ? h('span', { class: 'sep', 'aria-hidden': 'true' }, '/') : null,
      c.href ? h('a', { href: c.href }, c.label) : h('span', null, c.label)])) : null,
    h('div', { class: 'page-title-row' },
      h('h1', null, title), badge || null,
      actions ? h('div', { class: 'actions' }, actions) : null),
    subtitle ? h('p', { class: 'subtitle muted' }, subtitle) : null);
}

export function errorBox(err, retry) {
  return h('div', { class: 'error-box', role: 'alert' },
    h('strong', null, 'Something went wrong'),
    h('p', { class: 'error-text' }, errorText(err)),
    retry ? h('button', { type: 'button', class: 'btn', onclick: retry }, 'Try again') : null);
}

export function emptyState(title, text, action) {
  return h('div', { class: 'empty-state' },
    h('p', { class: 'empty-title' }, title),
    text ? h('p', { class: 'muted' }, text) : null,
    action || null);
}

export function loading(text = 'Loading…') {
  return h('p', { class: 'loading muted', 'aria-busy': 'true' }, text);
}

export function section(title, body, { actions, id } = {}) {
  return h('section', { class: 'card', id },
    h('div', { class: 'card-head' }, h('h2', null, title), actions ? h('div', { class: 'actions' }, actions) : null),
    body);
}

// A table. columns: [{label, render(row) -> Node|string, className}]
export function table(columns, rows, { caption, rowClass } = {}) {
  return h('div', { class: 'table-wrap' },
    h('table', { class: 'data' },
      caption ? h('caption', { class: 'sr-only' }, caption) : null,
      h('thead', null, h('tr', null, columns.map((c) => h('th', { scope: 'col', class: c.className }, c.label)))),
      h('tbody', null, rows.map((r) => h('tr', { class: rowClass ? rowClass(r) : null },
        columns.map((c) => h('td', { class: c.className, 'data-label': c.label }, c.render(r))))))));
}

export function keyValues(pairs) {
  return h('dl', { class: 'kv' }, pairs.filter(Boolean).map(([k, v]) => h('div', { class: 'kv-row' }, h('dt', null, k), h('dd', null, v))));
}

export function jsonBlock(value) {
  return h('pre', { class: 'json' }, JSON.stringify(value, null, 2));
}

export function pager({ offset, limit, total, onChange }) {
  const from = total === 0 ? 0 : offset + 1;
  const to = Math.min(offset + limit, total);
  return h('div', { class: 'pager' },
    h('span', { class: 'muted pager-info' }, `${from.toLocaleString()}–${to.toLocaleString()} of ${total.toLocaleString()}`),
    h('button', { type: 'button', class: 'btn', disabled: offset <= 0, onclick: () => onChange(Math.max(0, offset - limit)) }, '‹ Previous'),
    h('button', { type: 'button', class: 'btn', disabled: offset + limit >= total, onclick: () => onChange(offset + limit) }, 'Next ›'));
}

export function toast(message, kind = 'info') {
  const box = document.getElementById('toasts');
  const el = h('div', { class: `toast toast-${kind}` }, message);
  box.appendChild(el);
  setTimeout(() => el.remove(), kind === 'error' ? 8000 : 4000);
}

// Modal dialog built on <dialog>. content: Node; returns {dialog, close}.
export function modal(title, content, { onClose } = {}) {
  const dlg = h('dialog', { class: 'modal', 'aria-label': title },
    h('div', { class: 'modal-head' }, h('h2', null, title),
      h('button', { type: 'button', class: 'btn btn-ghost', 'aria-label': 'Close', onclick: () => close() }, '✕')),
    h('div', { class: 'modal-body' }, content));
  const close = () => { if (dlg.open) dlg.close(); };
  dlg.addEventListener('close', () => { dlg.remove(); if (onClose) onClose(); });
  document.body.appendChild(dlg);
  dlg.showModal();
  return { dialog: dlg, close };
}

export function confirmDialog(title, message, { confirmLabel = 'Confirm', danger = false } = {}) {
  return new Promise((resolve) => {
    let answered = false;
    const yes = h('button', { type: 'button', class: danger ? 'btn btn-danger' : 'btn btn-primary', onclick: () => { answered = true; m.close(); resolve(true); } }, confirmLabel);
    const no = h('button', { type: 'button', class: 'btn', onclick: () => { m.close(); } }, 'Cancel');
    const m = modal(title, h('div', null, h('p', null, message), h('div', { class: 'form-actions' }, no, yes)),
      { onClose: () => { if (!answered) resolve(false); } });
    yes.focus();
  });
}

// Run an async action from a button: disables it, shows errors as a toast.
export async function runAction(button, fn, okMessage) {
  if (button) button.disabled = true;
  try {
    const r = await fn();
    if (okMessage) toast(okMessage, 'success');
    return r;
  } catch (e) {
    toast(errorText(e), 'error');
    throw e;
  } finally {
    if (button) button.disabled = false;
  }
}

export function formError(container, err) {
  replace(container, err ? h('div', { class: 'error-box form-error', role: 'alert' }, h('p', { class: 'error-text' }, typeof err === 'string' ? err : errorText(err))) : '');
}

// Tabs: [{id, label, render: () => Node}] ; returns {el, select(id)}
export function tabs(items, active, onSelect) {
  const buttons = new Map();
  const panels = new Map();
  const bar = h('div', { class: 'tabs', role: 'tablist' });
  const holder = h('div', { class: 'tab-panels' });
  const select = (id) => {
    for (const [k, b] of buttons) {
      b.setAttribute('aria-selected', String(k === id));
      b.classList.toggle('active', k === id);
      panels.get(k).hidden = k !== id;
    }
    if (onSelect) onSelect(id);
  };
  for (const it of items) {
    const b = h('button', { type: 'button', role: 'tab', id: `tab-${it.id}`, 'aria-controls': `panel-${it.id}`, onclick: () => select(it.id) }, it.label);
    const p = h('div', { role: 'tabpanel', id: `panel-${it.id}`, 'aria-labelledby': `tab-${it.id}`, class: 'tab-panel' }, it.content);
    buttons.set(it.id, b); panels.set(it.id, p);
    bar.appendChild(b); holder.appendChild(p);
  }
  select(items.some((i) => i.id === active) ? active : items[0].id);
  return { el: h('div', null, bar, holder), select, button: (id) => buttons.get(id), panel: (id) => panels.get(id) };
}

export function field(label, input, { help, id } = {}) {
  const fid = id || input.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  input.id = fid;
  return h('div', { class: 'field' }, h('label', { for: fid }, label), input, help ? h('p', { class: 'help muted' }, help) : null);
}

// The names the API takes for work pools, work queues and global limits (Prefect's rule): no / % & > <.
// The pattern is one the browser compiles with its `v` flag, where a bare / in a class is refused.
export const NAME_RULE = { pattern: '[^\\/%&><]+', title: 'Any characters except / % & > <' };

export function parseTags(text) {
  return String(text || '').split(',').map((t) => t.trim()).filter(Boolean);
}
