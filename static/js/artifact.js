// Renders artifact data: markdown (safely), tables, links, progress, anything else as JSON.
import { h } from './dom.js';
import { renderMarkdown, safeUrl } from './markdown.js';

function parseMaybeJson(data) {
  if (typeof data !== 'string') return data;
  try { return JSON.parse(data); } catch { return data; }
}

function cellText(v) {
  if (v === null || v === undefined) return '';
  if (typeof v === 'object') return JSON.stringify(v);
  return String(v);
}

export function renderTable(data) {
  const t = parseMaybeJson(data);
  let headers = [];
  let rows = [];
  if (Array.isArray(t) && t.length && t.every((r) => r && typeof r === 'object' && !Array.isArray(r))) {
    headers = [...new Set(t.flatMap((r) => Object.keys(r)))];
    rows = t.map((r) => headers.map((k) => r[k]));
  } else if (Array.isArray(t) && t.every((r) => Array.isArray(r))) {
    rows = t;
    headers = rows.length ? rows[0].map((_, i) => `Column ${i + 1}`) : [];
  } else if (t && typeof t === 'object' && !Array.isArray(t)) {
    headers = Object.keys(t);
    const n = Math.max(0, ...headers.map((k) => (Array.isArray(t[k]) ? t[k].length : 1)));
    for (let i = 0; i < n; i++) rows.push(headers.map((k) => (Array.isArray(t[k]) ? t[k][i] : i === 0 ? t[k] : '')));
  } else {
    return h('pre', { class: 'json' }, typeof t === 'string' ? t : JSON.stringify(t, null, 2));
  }
  if (!rows.length) return h('p', { class: 'muted' }, 'Empty table.');
  return h('div', { class: 'table-wrap' }, h('table', { class: 'data artifact-table' },
    h('thead', null, h('tr', null, headers.map((k) => h('th', { scope: 'col' }, k)))),
    h('tbody', null, rows.map((r) => h('tr', null, r.map((c) => h('td', null, cellText(c))))))));
}

export function renderArtifact(a) {
  const type = (a.type || '').toLowerCase();
  if (type === 'markdown') return renderMarkdown(typeof a.data === 'string' ? a.data : JSON.stringify(a.data));
  if (type === 'table') return renderTable(a.data);
  if (type === 'link') {
    const d = typeof a.data === 'string' ? a.data : '';
    if (/^\[.*\]\(.*\)$/.test(d.trim())) return renderMarkdown(d);
    const href = safeUrl(d);
    return href ? h('p', null, h('a', { href, target: '_blank', rel: 'noopener noreferrer' }, d)) : h('p', null, d);
  }
  if (type === 'progress') {
    const v = Math.max(0, Math.min(100, Number(a.data) || 0));
    return h('div', { class: 'progress-wrap' }, h('progress', { max: 100, value: v }), ` ${v}%`);
  }
  if (type === 'image') {
    const href = safeUrl(a.data);
    return href ? h('p', null, 'Image: ', h('a', { href, target: '_blank', rel: 'noopener noreferrer' }, String(a.data))) : h('p', null, String(a.data));
  }
  return h('pre', { class: 'json' }, typeof a.data === 'string' ? a.data : JSON.stringify(a.data, null, 2));
}
