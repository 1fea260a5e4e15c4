import { h, replace } from '../dom.js';
import { api, byIds } from '../api.js';
import { pageHeader, errorBox, emptyState, loading, confirmDialog, runAction, toast, field, formError, parseTags, table, timeCell } from '../ui.js';
import { paths } from '../router.js';
import { blockDocumentForm, latestSchema, createBlockDocument } from './blocks.js';

const STATE_NAMES = ['Scheduled', 'Late', 'Pending', 'Running', 'Retrying', 'Paused', 'Completed', 'Failed', 'Crashed', 'Cancelling', 'Cancelled', 'TimedOut'];

function joinOr(items) {
  if (items.length <= 1) return items.join('');
  return `${items.slice(0, -1).join(', ')} or ${items[items.length - 1]}`;
}

// "If a run of any flow with daily-etl tag enters a failed state, send a notification to my-slack-webhook (Slack Webhook)"
export function policySentence(p, blockName) {
  const tags = p.tags || [];
  const states = (p.state_names || []).map((s) => s.toLowerCase());
  const tagPart = tags.length ? ` with ${joinOr(tags)} tag${tags.length > 1 ? 's' : ''}` : '';
  const statePart = states.length ? `${/^[aeiou]/.test(states[0]) ? 'an' : 'a'} ${joinOr(states)} state` : 'any state';
  return `If a run of any flow${tagPart} enters ${statePart}, send a notification to ${blockName || 'an unknown block'}`;
}

// The policy's delivery attempts (newest first, a page at a time), read when opened.
function deliveryHistory(ctx, policy) {
  const PAGE = 10;
  const body = h('div', { class: 'deliveries-body' });
  let offset = 0;
  async function load() {
    replace(body, loading());
    try {
      const rows = await api.get(`/flow_run_notification_policies/${policy.id}/deliveries?limit=${PAGE + 1}&offset=${offset}`);
      if (!ctx.alive) return;
      const more = rows.length > PAGE;
      const shown = rows.slice(0, PAGE);
      if (!shown.length && !offset) { replace(body, h('p', { class: 'muted' }, 'Nothing sent yet.')); return; }
      replace(body, table([
        { label: 'Time', render: (d) => timeCell(d.created) },
        { label: 'Run', render: (d) => (d.flow_run_id ? h('a', { href: paths.flowRun(d.flow_run_id) }, d.state_name || 'run') : '—') },
        { label: 'Destination', className: 'hide-sm', render: (d) => d.destination },
        { label: 'Attempt', render: (d) => String(d.attempt) },
        { label: 'Result', render: (d) => h('span', null, h('span', { class: `pill ${d.status === 'SENT' ? 'pill-ready' : d.status === 'FAILED' ? 'pill-failed' : 'pill-paused'}` },
          { SENT: 'Sent', RETRYING: 'Failed, retrying', FAILED: 'Failed, given up' }[d.status] || d.status),
          d.error ? h('span', { class: 'muted small delivery-error' }, ` ${d.error}`) : null) },
      ], shown, { caption: 'Delivery history', rowClass: () => 'delivery-row' }),
      h('div', { class: 'pager' },
        h('button', { type: 'button', class: 'btn btn-small', disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - PAGE); load(); } }, '‹ Newer'),
        h('button', { type: 'button', class: 'btn btn-small', disabled: !more, onclick: () => { offset += PAGE; load(); } }, 'Older ›')));
    } catch (err) { replace(body, errorBox(err, load)); }
  }
  return h('details', { class: 'deliveries', ontoggle: (e) => { if (e.target.open) load(); } }, h('summary', null, 'Delivery history'), body);
}

export default async function notificationsPage(ctx, root) {
  document.title = 'Notifications · prefectlite';
  const formHolder = h('div');
  const list = h('div', null, loading());
  const addBtn = h('button', { type: 'button', class: 'btn btn-primary btn-plus', onclick: () => openForm(null) }, 'Create notification');
  replace(root, pageHeader('Notifications', { actions: [addBtn], subtitle: 'Get told when flow runs enter a state you care about.' }), formHolder, list);

  let notifyDocs = [];
  async function loadNotifyDocs() {
    notifyDocs = await api.post('/block_documents/filter', { block_schemas: { block_capabilities: { all_: ['notify'] } }, sort: 'NAME_ASC', limit: 200 });
    return notifyDocs;
  }

  async function load() {
    try {
      const policies = await api.post('/flow_run_notification_policies/filter', { limit: 200 });
      if (!ctx.alive) return;
      if (!policies.length) {
        replace(list, emptyState('No notifications yet', 'Create one to be told when runs fail, crash or finish.', h('button', { type: 'button', class: 'btn', onclick: () => openForm(null) }, 'Create notification')));
        return;
      }
      const blocks = await byIds('/block_documents/filter', 'block_documents', policies.map((p) => p.block_document_id));
      if (!ctx.alive) return;
      replace(list, h('ul', { class: 'policy-list' }, policies.map((p) => {
        const block = blocks.get(p.block_document_id);
        const blockName = block && `${block.name}${block.block_type ? ` (${block.block_type.name})` : ''}`;
        const active = p.is_active !== false;
        return h('li', { class: `card policy ${active ? '' : 'policy-paused'}`, dataset: { id: p.id } },
          h('p', { class: 'policy-sentence' }, policySentence(p, blockName)),
          h('div', { class: 'policy-foot' },
            h('span', { class: `pill ${active ? 'pill-ready' : 'pill-paused'}` }, active ? 'Active' : 'Paused'),
            h('div', { class: 'row-actions' },
              h('button', { type: 'button', class: 'btn btn-small', onclick: async (e) => {
                await runAction(e.target, () => api.patch(`/flow_run_notification_policies/${p.id}`, { is_active: !active }), active ? 'Notification paused' : 'Notification resumed');
                load();
              } }, active ? 'Pause' : 'Resume'),
              h('button', { type: 'button', class: 'btn btn-small', onclick: () => openForm(p) }, 'Edit'),
              h('button', { type: 'button', class: 'btn btn-small', onclick: (e) => runAction(e.target, () => api.post(`/flow_run_notification_policies/${p.id}/test`, {}), `Test notification sent to ${block ? block.name : 'the block'}`).catch(() => {}) }, 'Send test'),
              h('button', { type: 'button', class: 'btn btn-small btn-danger', onclick: async (e) => {
                if (!await confirmDialog('Delete notification', `Delete this notification? “${policySentence(p, block && block.name)}”`, { confirmLabel: 'Delete', danger: true })) return;
                await runAction(e.target, () => api.del(`/flow_run_notification_policies/${p.id}`), 'Notification deleted');
                load();
              } }, 'Delete'))),
          deliveryHistory(ctx, p));
      })));
    } catch (err) { replace(list, errorBox(err, load)); }
  }

  async function openForm(policy) {
    replace(formHolder, h('div', { class: 'card' }, loading()));
    try {
      await loadNotifyDocs();
    } catch (err) { replace(formHolder, errorBox(err)); return; }
    if (!ctx.alive) return;
    const picked = new Set(policy ? policy.state_names : ['Failed', 'Crashed']);
    const stateBoxes = STATE_NAMES.map((s) => h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'state', value: s, checked: picked.has(s) }), ' ', s));
    const tagsIn = h('input', { id: 'notif-tags', type: 'text', value: policy ? (policy.tags || []).join(', ') : '', placeholder: 'Any tag' });
    const blockSel = h('select', { id: 'notif-block', required: true },
      notifyDocs.map((d) => h('option', { value: d.id, selected: policy && policy.block_document_id === d.id }, `${d.name}${d.block_type ? ' (' + d.block_type.name + ')' : ''}`)),
      h('option', { value: '__new__', selected: !notifyDocs.length }, 'Create a new block…'));
    const newBlockEl = h('div', { class: 'new-block', hidden: true });
    const template = h('textarea', { id: 'notif-template', rows: 3, placeholder: 'Default message' });
    template.value = policy && policy.message_template ? policy.message_template : '';
    const err = h('div');
    const submit = h('button', { type: 'submit', class: 'btn btn-primary' }, policy ? 'Save notification' : 'Create notification');
    let newBlockForm = null;

    async function showNewBlock() {
      newBlockEl.hidden = blockSel.value !== '__new__';
      if (newBlockEl.hidden || newBlockEl.dataset.ready) return;
      newBlockEl.dataset.ready = '1';
      replace(newBlockEl, loading());
      try {
        const types = await api.post('/block_types/filter', { block_schemas: { block_capabilities: { all_: ['notify'] } }, limit: 200 });
        types.sort((a, b) => a.name.localeCompare(b.name));
        if (!types.length) { replace(newBlockEl, emptyState('No notification block types', 'The server has no block type that can send notifications.')); return; }
        const typeSel = h('select', { id: 'notif-block-type' }, types.map((t) => h('option', { value: t.id }, t.name)));
        const formEl = h('div');
        let renderSeq = 0;
        const renderType = async () => {
          const my = ++renderSeq;
          const bt = types.find((t) => t.id === typeSel.value);
          newBlockForm = null;
          replace(formEl, loading());
          try {
            const schema = await latestSchema(bt.id);
            const f = await blockDocumentForm(bt, schema, { idPrefix: 'newblock' });
            if (my !== renderSeq) return; // another type was picked meanwhile
            newBlockForm = f;
            replace(formEl, f.el);
          } catch (ex) { if (my === renderSeq) replace(formEl, errorBox(ex)); }
        };
        typeSel.addEventListener('change', renderType);
        replace(newBlockEl, h('fieldset', null, h('legend', null, 'New notification block'), field('Block type', typeSel), formEl));
        await renderType();
      } catch (ex) { replace(newBlockEl, errorBox(ex)); }
    }
    blockSel.addEventListener('change', showNewBlock);

    const form = h('form', { class: 'card form notification-form', 'aria-label': policy ? 'Edit Notification' : 'Create Notification', onsubmit: async (e) => {
      e.preventDefault();
      const states = stateBoxes.map((l) => l.querySelector('input')).filter((i) => i.checked).map((i) => i.value);
      if (!states.length) { formError(err, 'Pick at least one state.'); return; }
      submit.disabled = true;
      try {
        let blockId = blockSel.value;
        let created = null;
        if (blockId === '__new__') {
          if (!newBlockForm) throw new Error('Choose a block type for the new block.');
          const doc = await createBlockDocument(newBlockForm);
          blockId = doc.id;
          created = doc.name;
        }
        const body = { state_names: states, tags: parseTags(tagsIn.value), block_document_id: blockId, message_template: template.value.trim() || null };
        if (policy) await api.patch(`/flow_run_notification_policies/${policy.id}`, body);
        else await api.post('/flow_run_notification_policies/', { ...body, is_active: true });
        // one toast per action
        toast(`${policy ? 'Notification saved' : 'Notification created'}${created ? ` with the new block “${created}”` : ''}`, 'success');
        replace(formHolder);
        load();
      } catch (ex) { formError(err, ex); } finally { submit.disabled = false; }
    } },
    h('h2', null, policy ? 'Edit Notification' : 'Create Notification'),
    h('fieldset', { class: 'states' }, h('legend', null, 'Run states'), h('div', { class: 'check-grid' }, stateBoxes)),
    field('Tags', tagsIn, { help: 'Only runs with one of these tags (comma separated). Leave empty for every run.' }),
    field('Send to', blockSel),
    newBlockEl,
    field('Message template', template, { help: 'Optional. Placeholders: {flow_run_name}, {flow_name}, {flow_run_state_name}, {flow_run_state_message}, {flow_run_url}.' }),
    err,
    h('div', { class: 'form-actions' }, h('button', { type: 'button', class: 'btn', onclick: () => replace(formHolder) }, 'Cancel'), submit));
    replace(formHolder, form);
    showNewBlock();
    form.scrollIntoView({ block: 'nearest' });
  }

  await load();
}
