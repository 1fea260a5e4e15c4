import { h, replace } from '../dom.js';
import { getSettings, apiBase } from '../api.js';
import { pageHeader, keyValues, section } from '../ui.js';

export default async function aboutPage(ctx, root) {
  document.title = 'About · prefectlite';
  const s = getSettings() || {};
  const server = s.server || {};
  const db = server.database || {};
  replace(root, pageHeader('About'),
    section('Server', keyValues([
      ['Server', server.name || '—'],
      ['Version', h('span', { id: 'about-version' }, server.version || '—')],
      ['API version', h('span', { id: 'about-api-version' }, server.api_version || '—')],
      ['Database', h('span', { id: 'about-database' }, `${db.dialect || '—'}${db.version ? ' ' + db.version : ''}`)],
      ['API URL', h('code', null, apiBase())],
      ['CSRF protection', s.csrf_enabled ? 'On' : 'Off'],
    ])),
    section('Browser', keyValues([
      ['Time zone', Intl.DateTimeFormat().resolvedOptions().timeZone || '—'],
      ['Times shown in', 'your browser’s local time'],
    ])));
}
