// Talks to the Prefect-compatible REST API named by ui-settings.
let settings = null;
let base = '';

export class ApiError extends Error {
  constructor(status, statusText, detail, method, path) {
    super(`${status}${statusText ? ' ' + statusText : ''}${detail ? ': ' + detail : ''}`);
    this.status = status;
    this.statusText = statusText;
    this.detail = detail;
    this.method = method;
    this.path = path;
  }
}

// The page's base URL without any user:password@ (fetch refuses URLs that carry credentials;
// the browser already sends the ones it was given for this origin).
function pageBase() {
  const u = new URL(document.baseURI);
  u.username = '';
  u.password = '';
  return u.href;
}

function resolveApiUrl(s) {
  const apiUrl = s.api_url || '/api';
  if (/^[a-z][a-z0-9+.-]*:/i.test(apiUrl)) return apiUrl.replace(/\/+$/, '');
  // A path on this server. The UI is served at serve_base; whatever stands before serve_base in
  // the page's own path is a prefix added by a reverse proxy, and the API sits under it too.
  const page = new URL(pageBase());
  const dir = page.pathname.replace(/[^/]*$/, '');
  const serveBase = `/${(s.serve_base || '/').replace(/^\/+|\/+$/g, '')}/`.replace(/^\/\/$/, '/');
  const prefix = dir.endsWith(serveBase) ? dir.slice(0, dir.length - serveBase.length) : '';
  return `${page.origin}${prefix}/${apiUrl.replace(/^\/+/, '')}`.replace(/\/+$/, '');
}

export async function loadSettings() {
  const url = new URL('ui-settings', pageBase());
  let resp;
  try {
    resp = await fetch(url, { headers: { Accept: 'application/json' } });
  } catch (e) {
    throw new ApiError(0, '', `could not load ${url.pathname} (${e.message})`, 'GET', 'ui-settings');
  }
  if (!resp.ok) throw new ApiError(resp.status, resp.statusText, 'could not load ui-settings', 'GET', 'ui-settings');
  settings = await resp.json();
  base = resolveApiUrl(settings);
  return settings;
}

export function getSettings() { return settings; }
export function apiBase() { return base; }

function describeDetail(body) {
  if (body === null || body === undefined) return '';
  if (typeof body === 'string') return body.slice(0, 500);
  const parts = [];
  const d = body.detail;
  if (typeof d === 'string') parts.push(d);
  else if (Array.isArray(d)) {
    for (const e of d) {
      if (e && typeof e === 'object') {
        const loc = Array.isArray(e.loc) ? e.loc.filter((x) => x !== 'body').join('.') : '';
        parts.push(`${loc ? loc + ': ' : ''}${e.msg || JSON.stringify(e)}`);
      } else parts.push(String(e));
    }
  } else if (d !== undefined) parts.push(JSON.stringify(d));
  if (body.exception_message) parts.push(body.exception_message);
  if (Array.isArray(body.exception_detail)) {
    for (const e of body.exception_detail) {
      const loc = Array.isArray(e.loc) ? e.loc.filter((x) => x !== 'body').join('.') : '';
      parts.push(`${loc ? loc + ': ' : ''}${e.msg || JSON.stringify(e)}`);
    }
  }
  if (!parts.length) return JSON.stringify(body).slice(0, 500);
  return parts.join(' — ');
}

export async function request(method, path, body) {
  const url = base + path;
  const init = { method, headers: { Accept: 'application/json' } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(url, init);
  } catch (e) {
    throw new ApiError(0, '', `could not reach the API at ${base} (${e.message})`, method, path);
  }
  const text = await resp.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = text; }
  }
  if (!resp.ok) throw new ApiError(resp.status, resp.statusText, describeDetail(data), method, path);
  return data;
}

export const api = {
  get: (p) => request('GET', p),
  post: (p, b = {}) => request('POST', p, b),
  patch: (p, b = {}) => request('PATCH', p, b),
  put: (p, b = {}) => request('PUT', p, b),
  del: (p) => request('DELETE', p),
};

export function errorText(err) {
  if (err instanceof ApiError) {
    const what = `${err.method} ${err.path.split('?')[0]}`;
    if (err.status === 0) return `Network error: ${err.detail}`;
    return `Error ${err.status}${err.statusText ? ' ' + err.statusText : ''}${err.detail ? ': ' + err.detail : ''} (${what})`;
  }
  return `Error: ${err && err.message ? err.message : String(err)}`;
}

// Fetch many objects by id with one filter call; returns a Map id -> object.
export async function byIds(path, key, ids, extra = {}) {
  const uniq = [...new Set(ids.filter(Boolean))];
  const map = new Map();
  if (!uniq.length) return map;
  const rows = await api.post(path, { ...extra, [key]: { id: { any_: uniq } }, limit: uniq.length });
  for (const r of rows) map.set(r.id, r);
  return map;
}
