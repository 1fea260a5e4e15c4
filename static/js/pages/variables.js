import { h, replace, debounce } from '../dom.js';
import { api } from '../api.js';
import { pageHeader, errorBox, emptyState, loading, tagList, timeCell, table, pager, modal, confirmDialog, runAction, toast, field, formError, parseTags } from '../ui.js';

function variableDialog(existing, onDone) {
  const name = h('input', { id: 'var-name', type: 'text', required: true, value: existing ? existing.name : '', pattern: '[a-z0-9_]+', title: 'Lowercase letters, numbers and underscores' });
  const value = h('textarea', { id: 'var-value', rows: 4, class: 'mono' });
  // A value that is not a string (an SDK saved JSON) stays JSON: it is parsed back on save, not stored as its text.
  const asJson = !!existing && typeof existing.value !== 'string';
  value.value = existing ? (asJson ? JSON.stringify(existing.value) : existing.value) : '';
  const tags = h('input', { id: 'var-tags', type: 'text', value: existing ? (existing.tags || []).join(', ') : '', placeholder: 'tag-a, tag-b' });
  const err = h('div');
  const submit = h('button', { type: 'submit', class: 'btn btn-primary' }, existing ? 'Save' : 'Create');
  const m = modal(existing ? `Edit variable ${existing.name}` : 'New variable', h('form', { class: 'form', onsubmit: async (e) => {
    e.preventDefault();
    const body = { name: name.value.trim(), value: value.value, tags: parseTags(tags.value) };
    if (!body.name) { formError(err, 'Name is required'); return; }
    if (asJson) {
      try { body.value = JSON.parse(value.value); } catch (ex) { formError(err, `Value is not valid JSON (${ex.message})`); return; }
    }
    submit.disabled = true;
    try {
      if (existing) await api.patch(`/variables/${existing.id}`, body);
      else await api.post('/variables/', body);
      m.close();
      toast(`Variable “${body.name}” ${existing ? 'saved' : 'created'}`, 'success');
      onDone();
    } catch (ex) { formError(err, ex); } finally { submit.disabled = false; }
  } }, field('Name', name, { help: 'Lowercase letters, numbers and underscores.' }), field('Value', value, asJson ? { help: 'A JSON value: it is kept as JSON.' } : {}), field('Tags', tags, { help: 'Comma separated.' }), err,
  h('div', { class: 'form-actions' }, h('button', { type: 'button', class: 'btn', onclick: () => m.close() }, 'Cancel'), submit)));
  name.focus();
}

export default async function variablesPage(ctx, root) {
  document.title = 'Variables · prefectlite';
  const search = h('input', { id: 'var-search', type: 'search', placeholder: 'Search variables', oninput: debounce(() => { offset = 0; load(); }, 300) });
  const list = h('div', null, loading());
  const countEl = h('span', { class: 'muted' });
  replace(root, pageHeader('Variables', { badge: countEl, actions: [h('button', { type: 'button', class: 'btn btn-primary', onclick: () => variableDialog(null, load) }, '+ Variable')] }),
    h('div', { class: 'toolbar' }, h('label', { for: 'var-search', class: 'sr-only' }, 'Search variables'), search), list);
  let offset = 0;
  const limit = 50;
  async function load() {
    const filter = search.value.trim() ? { variables: { name: { like_: search.value.trim() } } } : {};
    try {
      const [vars, total] = await Promise.all([
        api.post('/variables/filter', { ...filter, sort: 'NAME_ASC', limit, offset }),
        api.post('/variables/count', filter),
      ]);
      if (!ctx.alive) return;
      countEl.textContent = `${total.toLocaleString()} variable${total === 1 ? '' : 's'}`;
      if (!vars.length) {
        replace(list, filter.variables ? emptyState('No matching variables', `No variable name contains “${search.value}”.`)
          : emptyState('No variables yet', 'Variables hold small values your flows can read by name.', h('button', { type: 'button', class: 'btn', onclick: () => variableDialog(null, load) }, 'Create a variable')));
        return;
      }
      replace(list, h('div', { class: 'card flush' }, table([
        { label: 'Name', render: (v) => h('span', { class: 'var-name' }, v.name) },
        { label: 'Value', render: (v) => h('code', { class: 'var-value', title: typeof v.value === 'string' ? v.value : JSON.stringify(v.value) }, typeof v.value === 'string' ? v.value : JSON.stringify(v.value)) },
        { label: 'Tags', className: 'hide-sm', render: (v) => tagList(v.tags) },
        { label: 'Updated', className: 'hide-md', render: (v) => timeCell(v.updated) },
        { label: 'Actions', render: (v) => h('div', { class: 'row-actions' },
          h('button', { type: 'button', class: 'btn btn-small', 'aria-label': `Edit ${v.name}`, onclick: () => variableDialog(v, load) }, 'Edit'),
          h('button', { type: 'button', class: 'btn btn-small btn-danger', 'aria-label': `Delete ${v.name}`, onclick: async (e) => {
            if (!await confirmDialog('Delete variable', `Delete the variable “${v.name}”?`, { confirmLabel: 'Delete', danger: true })) return;
            await runAction(e.target, () => api.del(`/variables/${v.id}`), `Variable “${v.name}” deleted`);
            load();
          } }, 'Delete')) },
      ], vars, { caption: 'Variables', rowClass: () => 'var-row' })), total > limit ? pager({ offset, limit, total, onChange: (o) => { offset = o; load(); } }) : null);
    } catch (err) { replace(list, errorBox(err, load)); }
  }
  await load();
}
