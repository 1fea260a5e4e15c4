// A small, safe Markdown renderer. It builds DOM nodes directly; text is only ever
// inserted as text nodes, so HTML in the source is shown literally and never parsed.
import { h } from './dom.js';

const SAFE_SCHEMES = new Set(['http:', 'https:', 'mailto:']);

export function safeUrl(url) {
  const u = String(url || '').trim();
  if (!u) return null;
  if (/^[\w+.-]+:/.test(u) || u.startsWith('//')) {
    try {
      const parsed = new URL(u, document.baseURI);
      return SAFE_SCHEMES.has(parsed.protocol) ? parsed.href : null;
    } catch { return null; }
  }
  if (/[\u0000-\u001f]/.test(u)) return null;
  return u; // relative link or #anchor
}

function link(url, children, title) {
  const href = safeUrl(url);
  if (!href) return h('span', { class: 'md-unsafe-link' }, children);
  const external = /^(https?:)?\/\//i.test(href);
  return h('a', { href, title: title || null, target: external ? '_blank' : null, rel: external ? 'noopener noreferrer' : null }, children);
}

const ESCAPABLE = /[\\`*_{}[\]()#+\-.!|~<>]/;

export function inline(src) {
  const out = [];
  let buf = '';
  const flush = () => { if (buf) { out.push(document.createTextNode(buf)); buf = ''; } };
  let i = 0;
  while (i < src.length) {
    const ch = src[i];
    const rest = src.slice(i);
    let m;
    if (ch === '\\' && i + 1 < src.length && ESCAPABLE.test(src[i + 1])) { buf += src[i + 1]; i += 2; continue; }
    if (ch === '\\' && src[i + 1] === '\n') { flush(); out.push(h('br')); i += 2; continue; }
    if (ch === '`' && (m = /^(`+)([\s\S]*?[^`])\1(?!`)/.exec(rest))) {
      flush(); out.push(h('code', null, m[2].replace(/^ (.*) $/, '$1'))); i += m[0].length; continue;
    }
    if (ch === '!' && (m = /^!\[([^\]]*)\]\(\s*<?((?:[^()\s<>]|\([^()\s]*\))*)>?(?:\s+"([^"]*)")?\s*\)/.exec(rest))) {
      // Images are shown as links: the UI never loads content from other hosts.
      flush(); out.push(link(m[2], [`Image: ${m[1] || m[2]}`], m[3])); i += m[0].length; continue;
    }
    if (ch === '[' && (m = /^\[((?:\\.|[^\]\\])*)\]\(\s*<?((?:[^()\s<>]|\([^()\s]*\))*)>?(?:\s+"([^"]*)")?\s*\)/.exec(rest))) {
      flush(); out.push(link(m[2], inline(m[1]), m[3])); i += m[0].length; continue;
    }
    if (ch === '<' && (m = /^<((?:https?|mailto):[^>\s]+)>/i.exec(rest))) {
      flush(); out.push(link(m[1], [m[1]])); i += m[0].length; continue;
    }
    if ((ch === 'h' || ch === 'H') && (i === 0 || /[\s(]/.test(src[i - 1])) && (m = /^https?:\/\/[^\s<]*[^\s<.,:;"')\]]/i.exec(rest))) {
      flush(); out.push(link(m[0], [m[0]])); i += m[0].length; continue;
    }
    if ((ch === '*' || ch === '_') && (ch === '*' || i === 0 || !/\w/.test(src[i - 1]))) {
      if ((m = (ch === '*' ? /^\*\*(?=\S)([\s\S]*?\S)\*\*/ : /^__(?=\S)([\s\S]*?\S)__(?!\w)/).exec(rest))) {
        flush(); out.push(h('strong', null, inline(m[1]))); i += m[0].length; continue;
      }
      if ((m = (ch === '*' ? /^\*(?=[^\s*])([\s\S]*?[^\s*])\*(?!\*)/ : /^_(?=[^\s_])([\s\S]*?[^\s_])_(?![_\w])/).exec(rest))) {
        flush(); out.push(h('em', null, inline(m[1]))); i += m[0].length; continue;
      }
    }
    if (ch === '~' && (m = /^~~(?=\S)([\s\S]*?\S)~~/.exec(rest))) {
      flush(); out.push(h('del', null, inline(m[1]))); i += m[0].length; continue;
    }
    if (ch === '\n') {
      if (/ {2,}$/.test(buf)) { buf = buf.replace(/ +$/, ''); flush(); out.push(h('br')); }
      else buf += '\n';
      i += 1; continue;
    }
    buf += ch; i += 1;
  }
  flush();
  return out;
}

const RE = {
  fence: /^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)/,
  heading: /^ {0,3}(#{1,6})(?:\s+(.*?))?\s*#*\s*$/,
  hr: /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/,
  quote: /^ {0,3}> ?/,
  item: /^( {0,3})([-*+]|\d{1,9}[.)])(\s+|$)/,
  tableSep: /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/,
  blank: /^\s*$/,
};

function splitRow(line) {
  let s = line.trim();
  if (s.startsWith('|')) s = s.slice(1);
  if (s.endsWith('|') && !s.endsWith('\\|')) s = s.slice(0, -1);
  const cells = [];
  let cur = '';
  for (let i = 0; i < s.length; i++) {
    if (s[i] === '\\' && s[i + 1] === '|') { cur += '|'; i++; continue; }
    if (s[i] === '|') { cells.push(cur.trim()); cur = ''; continue; }
    cur += s[i];
  }
  cells.push(cur.trim());
  return cells;
}

function startsBlock(line, next) {
  return RE.fence.test(line) || RE.heading.test(line) || RE.hr.test(line) || RE.quote.test(line) || RE.item.test(line)
    || (line.includes('|') && next !== undefined && RE.tableSep.test(next) && next.includes('-'));
}

function blocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (RE.blank.test(line)) { i++; continue; }
    if ((m = RE.fence.exec(line))) {
      const fence = m[1];
      const code = [];
      i++;
      while (i < lines.length && !(lines[i].trim().startsWith(fence[0].repeat(fence.length)) && lines[i].trim().replace(new RegExp(`^\\${fence[0]}+`), '').trim() === '')) {
        code.push(lines[i]); i++;
      }
      i++;
      out.push(h('pre', { class: 'md-code' }, h('code', { class: m[2] ? `language-${m[2]}` : null }, code.join('\n'))));
      continue;
    }
    if ((m = RE.heading.exec(line))) {
      out.push(h(`h${m[1].length}`, null, inline(m[2] || '')));
      i++; continue;
    }
    if (RE.hr.test(line)) { out.push(h('hr')); i++; continue; }
    if (RE.quote.test(line)) {
      const inner = [];
      while (i < lines.length && !RE.blank.test(lines[i]) && (RE.quote.test(lines[i]) || inner.length)) {
        inner.push(lines[i].replace(RE.quote, '')); i++;
      }
      out.push(h('blockquote', null, blocks(inner)));
      continue;
    }
    if ((m = RE.item.exec(line))) {
      const ordered = /\d/.test(m[2]);
      const start = ordered ? parseInt(m[2], 10) : null;
      const items = [];
      let loose = false;
      while (i < lines.length) {
        const im = RE.item.exec(lines[i]);
        if (!im || /\d/.test(im[2]) !== ordered) break;
        const indent = im[0].length;
        const body = [lines[i].slice(indent)];
        i++;
        while (i < lines.length) {
          const l = lines[i];
          if (RE.blank.test(l)) {
            const nxt = lines[i + 1];
            if (nxt !== undefined && /^\s{2,}\S/.test(nxt)) { body.push(''); loose = true; i++; continue; }
            break;
          }
          if (/^\s{2,}/.test(l)) { body.push(l.replace(/^\s{1,4}/, '')); i++; continue; }
          if (RE.item.test(l) || startsBlock(l, lines[i + 1])) break;
          body.push(l); i++; // lazy continuation
        }
        items.push(body);
        if (i < lines.length && RE.blank.test(lines[i]) && lines[i + 1] !== undefined && RE.item.test(lines[i + 1])) { loose = true; i++; }
      }
      const lis = items.map((body) => {
        const inner = blocks(body);
        if (!loose && inner.length && inner[0].tagName === 'P') {
          const first = inner.shift();
          return h('li', null, [...first.childNodes], inner);
        }
        return h('li', null, inner);
      });
      out.push(ordered ? h('ol', { start: start !== 1 ? start : null }, lis) : h('ul', null, lis));
      continue;
    }
    if (line.includes('|') && lines[i + 1] !== undefined && RE.tableSep.test(lines[i + 1]) && lines[i + 1].includes('-')) {
      const head = splitRow(line);
      const aligns = splitRow(lines[i + 1]).map((c) => (c.startsWith(':') && c.endsWith(':') ? 'center' : c.endsWith(':') ? 'right' : c.startsWith(':') ? 'left' : null));
      i += 2;
      const rows = [];
      while (i < lines.length && !RE.blank.test(lines[i]) && lines[i].includes('|')) { rows.push(splitRow(lines[i])); i++; }
      const cell = (tag, text, k) => h(tag, { style: aligns[k] ? { textAlign: aligns[k] } : null }, inline(text || ''));
      out.push(h('div', { class: 'table-wrap' }, h('table', { class: 'data md-table' },
        h('thead', null, h('tr', null, head.map((c, k) => cell('th', c, k)))),
        h('tbody', null, rows.map((r) => h('tr', null, head.map((_, k) => cell('td', r[k], k))))))));
      continue;
    }
    const para = [];
    while (i < lines.length && !RE.blank.test(lines[i]) && !(para.length && startsBlock(lines[i], lines[i + 1]))) {
      para.push(lines[i]); i++;
    }
    out.push(h('p', null, inline(para.join('\n').trim())));
  }
  return out;
}

export function renderMarkdown(text) {
  const src = String(text ?? '').replace(/\r\n?/g, '\n').replace(/\t/g, '    ');
  return h('div', { class: 'markdown' }, blocks(src.split('\n')));
}
