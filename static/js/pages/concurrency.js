import { h, replace } from '../dom.js';
import { api } from '../api.js';
import { pageHeader, section, errorBox, emptyState, loading, table, modal, confirmDialog, runAction, toast, field, formError, NAME_RULE } from '../ui.js';

function slotsBar(used, limit) {
  const pct = limit > 0 ? Math.min(100, Math.round((used / limit) * 100)) : 0;
  return h('span', { class: 'slots' }, h('span', { class: 'slots-bar', 'aria-hidden': 'true' }, h('span', { style: { width: `${pct}%` } })), h('span', { class: 'slots-text' }, `${used} / ${limit}`));
}

// The API's create is an upsert: a tag that has a limit is refused here (its row's Edit changes it) rather than
// overwritten unseen. `limits` are the rows on the page.
function v1Dialog(limits, existing, onDone) {
  const tag = h('input', { id: 'cl-tag', type: 'text', required: true, value: existing ? existing.tag : '', readOnly: !!existing });
  const limit = h('input', { id: 'cl-limit', type: 'number', min: 0, required: true, value: existing ? existing.concurrency_limit : 1 });
  const err = h('div');
  const m = modal(existing ? `Edit limit for tag ${existing.tag}` : 'New tag concurrency limit', h('form', { class: 'form', onsubmit: async (e) => {
    e.preventDefault();
    const taken = !existing && limits.find((l) => l.tag === tag.value.trim());
    if (taken) { formError(err, `Tag “${taken.tag}” already has a limit (${taken.concurrency_limit}): change it with Edit in its row.`); return; }
    try {
      await api.post('/concurrency_limits/', { tag: tag.value.trim(), concurrency_limit: Number(limit.value) });
      m.close(); toast(`Limit for tag “${tag.value.trim()}” saved`, 'success'); onDone();
    } catch (ex) { formError(err, ex); }
  } }, field('Tag', tag, { help: 'Task runs with this tag share the slots.' }), field('Concurrency limit', limit), err,
  h('div', { class: 'form-actions' }, h('button', { type: 'button', class: 'btn', onclick: () => m.close() }, 'Cancel'), h('button', { type: 'submit', class: 'btn btn-primary' }, existing ? 'Save' : 'Create'))));
}

function v2Dialog(existing, onDone) {
  const name = h('input', { id: 'gcl-name', type: 'text', required: true, ...NAME_RULE, value: existing ? existing.name : '' });
  const limit = h('input', { id: 'gcl-limit', type: 'number', min: 0, required: true, value: existing ? existing.limit : 1 });
  const decay = h('input', { id: 'gcl-decay', type: 'number', min: 0, step: 'any', value: existing ? existing.slot_decay_per_second : 0 });
  const active = h('input', { id: 'gcl-active', type: 'checkbox', checked: existing ? existing.active !== false : true });
  const err = h('div');
  const m = modal(existing ? `Edit ${existing.name}` : 'New global concurrency limit', h('form', { class: 'form', onsubmit: async (e) => {
    e.preventDefault();
    const body = { name: name.value.trim(), limit: Number(limit.value), slot_decay_per_second: Number(decay.value || 0), active: active.checked };
    try {
      if (existing) await api.patch(`/v2/concurrency_limits/${existing.id}`, body);
      else await api.post('/v2/concurrency_limits/', body);
      m.close(); toast(`Global limit “${body.name}” saved`, 'success'); onDone();
    } catch (ex) { formError(err, ex); }
  } }, field('Name', name, { help: `${NAME_RULE.title}.` }), field('Limit', limit), field('Slot decay per second', decay, { help: '0 for a plain limit; above 0 turns it into a rate limit.' }),
  h('div', { class: 'field field-check' }, h('label', { for: 'gcl-active' }, active, ' Active')), err,
  h('div', { class: 'form-actions' }, h('button', { type: 'button', class: 'btn', onclick: () => m.close() }, 'Cancel'), h('button', { type: 'submit', class: 'btn btn-primary' }, existing ? 'Save' : 'Create'))));
}

// concurrency-limits/concurrency-limit/<id> (a link the SDK makes) marks that limit's row.
export default async function concurrencyPage(ctx, root, selectedId) {
  document.title = 'Concurrency limits · prefectlite';
  const v1El = h('div', null, loading());
  const v2El = h('div', null, loading());
  replace(root, pageHeader('Concurrency limits'),
    section('Global concurrency limits', v2El, { id: 'global-limits', actions: [h('button', { type: 'button', class: 'btn btn-primary', onclick: () => v2Dialog(null, loadV2) }, '+ Global limit')] }),
    section('Task run tag limits', v1El, { id: 'tag-limits', actions: [h('button', { type: 'button', class: 'btn btn-primary', onclick: () => v1Dialog(v1Limits, null, loadV1) }, '+ Tag limit')] }));

  let v1Limits = [];
  async function loadV1() {
    try {
      const limits = await api.post('/concurrency_limits/filter', { limit: 200 });
      if (!ctx.alive) return;
      v1Limits = limits;
      limits.sort((a, b) => a.tag.localeCompare(b.tag));
      replace(v1El, limits.length ? table([
        { label: 'Tag', render: (l) => h('span', { class: 'tag' }, l.tag) },
        { label: 'Active slots', render: (l) => slotsBar((l.active_slots || []).length, l.concurrency_limit) },
        { label: 'Limit', render: (l) => String(l.concurrency_limit) },
        { label: 'Actions', render: (l) => h('div', { class: 'row-actions' },
          h('button', { type: 'button', class: 'btn btn-small', 'aria-label': `Edit ${l.tag}`, onclick: () => v1Dialog(limits, l, loadV1) }, 'Edit'),
          h('button', { type: 'button', class: 'btn btn-small', 'aria-label': `Reset ${l.tag}`, onclick: async (e) => { await runAction(e.target, () => api.post(`/concurrency_limits/tag/${encodeURIComponent(l.tag)}/reset`, {}), `Slots of “${l.tag}” released`); loadV1(); } }, 'Reset'),
          h('button', { type: 'button', class: 'btn btn-small btn-danger', 'aria-label': `Delete ${l.tag}`, onclick: async (e) => {
            if (!await confirmDialog('Delete limit', `Delete the concurrency limit for tag “${l.tag}”?`, { confirmLabel: 'Delete', danger: true })) return;
            await runAction(e.target, () => api.del(`/concurrency_limits/tag/${encodeURIComponent(l.tag)}`), `Limit for “${l.tag}” deleted`);
            loadV1();
          } }, 'Delete')) },
      ], limits, { caption: 'Task run tag limits', rowClass: (l) => (l.id === selectedId ? 'tag-limit-row selected' : 'tag-limit-row') }) : emptyState('No tag limits', 'Limit how many task runs with a given tag run at once.'));
    } catch (err) { replace(v1El, errorBox(err, loadV1)); }
  }
  async function loadV2() {
    try {
      const limits = await api.post('/v2/concurrency_limits/filter', { limit: 200 });
      if (!ctx.alive) return;
      limits.sort((a, b) => a.name.localeCompare(b.name));
      replace(v2El, limits.length ? table([
        { label: 'Name', render: (l) => h('span', { class: 'gcl-name' }, l.name) },
        { label: 'Active slots', render: (l) => slotsBar(l.active_slots || 0, l.limit) },
        { label: 'Status', render: (l) => h('span', { class: `pill ${l.active === false ? 'pill-paused' : 'pill-ready'}` }, l.active === false ? 'Inactive' : 'Active') },
        { label: 'Slot decay', className: 'hide-sm', render: (l) => `${l.slot_decay_per_second || 0}/s` },
        { label: 'Actions', render: (l) => h('div', { class: 'row-actions' },
          h('button', { type: 'button', class: 'btn btn-small', 'aria-label': `Edit ${l.name}`, onclick: () => v2Dialog(l, loadV2) }, 'Edit'),
          h('button', { type: 'button', class: 'btn btn-small btn-danger', 'aria-label': `Delete ${l.name}`, onclick: async (e) => {
            if (!await confirmDialog('Delete limit', `Delete the global concurrency limit “${l.name}”?`, { confirmLabel: 'Delete', danger: true })) return;
            await runAction(e.target, () => api.del(`/v2/concurrency_limits/${l.id}`), `Limit “${l.name}” deleted`);
            loadV2();
          } }, 'Delete')) },
      ], limits, { caption: 'Global concurrency limits', rowClass: (l) => (l.id === selectedId ? 'global-limit-row selected' : 'global-limit-row') }) : emptyState('No global limits', 'Global limits cap any work that asks for a named slot.'));
    } catch (err) { replace(v2El, errorBox(err, loadV2)); }
  }
  await Promise.all([loadV1(), loadV2()]);
}
