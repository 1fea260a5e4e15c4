import { h, replace } from '../dom.js';
import { api, ApiError } from '../api.js';
import { pageHeader, section, errorBox, emptyState, loading, timeCell, table, keyValues, tabs, confirmDialog, runAction, toast, field, formError } from '../ui.js';
import { schemaForm, displayValue } from '../schemaform.js';
import { paths, navigate, replaceRoute } from '../router.js';

export async function latestSchema(blockTypeId) {
  const schemas = await api.post('/block_schemas/filter', { block_schemas: { block_type_id: { any_: [blockTypeId] } }, limit: 1 });
  return schemas[0] || null;
}

// Loads existing documents for nested block references of a schema.
async function refChoices(schema) {
  const refs = (schema && schema.fields && schema.fields.block_schema_references) || {};
  const slugs = [...new Set(Object.values(refs).map((r) => r && r.block_type_slug).filter(Boolean))];
  const bySlug = new Map();
  if (!slugs.length) return bySlug;
  const docs = await api.post('/block_documents/filter', { block_types: { slug: { any_: slugs } }, limit: 200 });
  for (const d of docs) {
    const slug = d.block_type && d.block_type.slug;
    if (!bySlug.has(slug)) bySlug.set(slug, []);
    bySlug.get(slug).push(d);
  }
  return bySlug;
}

// A block document form: name + fields from the schema. Used here and by notifications.
export async function blockDocumentForm(blockType, schema, { doc = null, idPrefix = 'block' } = {}) {
  const choices = await refChoices(schema);
  const nameIn = h('input', { id: `${idPrefix}-name`, type: 'text', required: true, value: doc ? doc.name : '', readOnly: !!doc, pattern: '[a-z0-9\\-]+', title: 'Lowercase letters, numbers and dashes' });
  const sf = schemaForm(schema.fields || {}, doc ? doc.data || {} : {}, { editing: !!doc, idPrefix, blockChoices: (slug) => choices.get(slug) || [] });
  const el = h('div', { class: 'block-form' },
    field('Block name', nameIn, { help: doc ? 'The name of a block cannot be changed.' : 'Lowercase letters, numbers and dashes.' }), sf.el);
  function values() {
    const r = sf.values();
    const errors = [...r.errors];
    const name = nameIn.value.trim();
    if (!name) errors.push('Block name is required');
    else if (!doc && !/^[a-z0-9-]+$/.test(name)) errors.push('Block name must use only lowercase letters, numbers and dashes');
    return { name, data: r.values, errors };
  }
  return { el, values, blockType, schema };
}

export async function createBlockDocument(form) {
  const { name, data, errors } = form.values();
  if (errors.length) throw new Error(errors.join('; '));
  try {
    return await api.post('/block_documents/', { name, block_type_id: form.blockType.id, block_schema_id: form.schema.id, data });
  } catch (ex) {
    // the API says only "Block already exists": name the field and the name taken
    if (ex instanceof ApiError && ex.status === 409) throw new Error(`Block name: a ${form.blockType.name} block named “${name}” already exists; pick another name.`);
    throw ex;
  }
}

export async function blocksPage(ctx, root, tab) {
  document.title = 'Blocks · prefectlite';
  const docsEl = h('div', null, loading());
  const catEl = h('div', null, loading());
  const t = tabs([
    { id: 'documents', label: 'Your blocks', content: docsEl },
    { id: 'catalog', label: 'Catalogue', content: catEl },
  ], tab || (ctx.params.get('tab') === 'catalog' ? 'catalog' : 'documents'), (id) => replaceRoute(id === 'catalog' ? 'blocks/catalog' : 'blocks'));
  replace(root, pageHeader('Blocks', { actions: [h('button', { type: 'button', class: 'btn btn-primary', onclick: () => t.select('catalog') }, '+ Add block')] }), h('div', { class: 'card' }, t.el));
  await Promise.all([
    api.post('/block_documents/filter', { sort: 'NAME_ASC', limit: 200 }).then((docs) => {
      if (!ctx.alive) return;
      replace(docsEl, docs.length ? table([
        { label: 'Name', render: (d) => h('a', { href: paths.block(d.id) }, d.name) },
        { label: 'Type', render: (d) => (d.block_type ? d.block_type.name : d.block_type_name || '—') },
        { label: 'Created', className: 'hide-sm', render: (d) => timeCell(d.created) },
      ], docs, { caption: 'Block documents' }) : emptyState('No blocks yet', 'Pick a block type in the catalogue to create one.', h('button', { type: 'button', class: 'btn', onclick: () => t.select('catalog') }, 'Open the catalogue')));
    }).catch((err) => replace(docsEl, errorBox(err))),
    api.post('/block_types/filter', { limit: 200 }).then((types) => {
      if (!ctx.alive) return;
      types.sort((a, b) => a.name.localeCompare(b.name));
      const search = h('input', { id: 'catalog-search', type: 'search', placeholder: 'Filter block types', oninput: () => {
        const q = search.value.toLowerCase();
        for (const c of grid.children) c.hidden = !c.dataset.name.includes(q);
      } });
      const grid = h('div', { class: 'catalog' }, types.map((bt) => h('div', { class: 'catalog-item', dataset: { name: bt.name.toLowerCase(), slug: bt.slug } },
        h('div', { class: 'avatar', 'aria-hidden': 'true' }, bt.name.slice(0, 2)),
        h('div', { class: 'catalog-text' }, h('h3', null, bt.name), h('p', { class: 'muted small', title: bt.description || null }, bt.description ? bt.description.split('\n')[0].slice(0, 140) : bt.slug)),
        h('a', { class: 'btn btn-small', href: paths.blockCreate(bt.slug), 'aria-label': `Create ${bt.name} block` }, 'Create'))));
      replace(catEl, types.length ? [h('div', { class: 'toolbar' }, h('label', { for: 'catalog-search', class: 'sr-only' }, 'Filter block types'), search), grid]
        : emptyState('No block types', 'The server has no block type registered.'));
    }).catch((err) => replace(catEl, errorBox(err))),
  ]);
}

export async function blockCreate(ctx, root, slug) {
  if (!slug) { navigate('blocks/catalog'); return; }
  const bt = await api.get(`/block_types/slug/${encodeURIComponent(slug)}`);
  const schema = await latestSchema(bt.id);
  if (!ctx.alive) return;
  document.title = `New ${bt.name} block · prefectlite`;
  if (!schema) { replace(root, pageHeader(`New ${bt.name} block`), errorBox(new Error(`The block type “${bt.name}” has no schema.`))); return; }
  const form = await blockDocumentForm(bt, schema, { idPrefix: 'block' });
  const err = h('div');
  const submit = h('button', { type: 'submit', class: 'btn btn-primary' }, 'Create block');
  replace(root,
    pageHeader(`New ${bt.name} block`, { subtitle: bt.description ? bt.description.split('\n\n')[0] : null, crumbs: [{ label: 'Blocks', href: 'blocks' }, { label: 'Catalogue', href: 'blocks/catalog' }, { label: bt.name }] }),
    h('form', { class: 'card form', onsubmit: async (e) => {
      e.preventDefault();
      submit.disabled = true;
      try {
        const doc = await createBlockDocument(form);
        toast(`Block “${doc.name}” created`, 'success');
        navigate(paths.block(doc.id));
      } catch (ex) { formError(err, ex); } finally { submit.disabled = false; }
    } }, form.el, err, h('div', { class: 'form-actions' }, h('a', { class: 'btn', href: 'blocks/catalog' }, 'Cancel'), submit)));
}

// What deleting a block takes with it: the notifications that send to it go too (the server deletes them with
// it); automations that send to it stay and fail. Said in the confirmation; nothing when unknown.
async function usesOfBlock(id) {
  const [policies, automations] = await Promise.all([
    api.post('/flow_run_notification_policies/filter', { limit: 200 }).catch(() => []),
    api.post('/automations/filter', { limit: 200 }).catch(() => []),
  ]);
  const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;
  const nPolicies = policies.filter((p) => p.block_document_id === id).length;
  const nAutomations = automations.filter((a) => [...(a.actions || []), ...(a.actions_on_trigger || []), ...(a.actions_on_resolve || [])]
    .some((x) => x && x.block_document_id === id)).length;
  return (nPolicies ? ` ${plural(nPolicies, 'notification')} ${nPolicies === 1 ? 'sends' : 'send'} to it and will be deleted with it.` : '')
    + (nAutomations ? ` ${plural(nAutomations, 'automation')} ${nAutomations === 1 ? 'sends' : 'send'} to it and will fail to.` : '');
}

export async function blockDetail(ctx, root, id, editing = false) {
  const doc = await api.get(`/block_documents/${encodeURIComponent(id)}`);
  if (!ctx.alive) return;
  const bt = doc.block_type || await api.get(`/block_types/${doc.block_type_id}`);
  const schema = doc.block_schema || await api.get(`/block_schemas/${doc.block_schema_id}`);
  if (!ctx.alive) return;
  document.title = `${doc.name} · Block · prefectlite`;
  const crumbs = [{ label: 'Blocks', href: 'blocks' }, { label: bt.name }];
  const fields = (schema && schema.fields) || {};
  if (editing) {
    const form = await blockDocumentForm(bt, schema, { doc, idPrefix: 'block' });
    const err = h('div');
    const submit = h('button', { type: 'submit', class: 'btn btn-primary' }, 'Save');
    replace(root, pageHeader(`Edit ${doc.name}`, { crumbs }),
      h('form', { class: 'card form', onsubmit: async (e) => {
        e.preventDefault();
        const { data, errors } = form.values();
        if (errors.length) { formError(err, errors.join('; ')); return; }
        submit.disabled = true;
        try {
          await api.patch(`/block_documents/${doc.id}`, { data, merge_existing_data: true });
          toast(`Block “${doc.name}” saved`, 'success');
          navigate(paths.block(doc.id));
        } catch (ex) { formError(err, ex); } finally { submit.disabled = false; }
      } }, form.el, err, h('div', { class: 'form-actions' }, h('a', { class: 'btn', href: paths.block(doc.id) }, 'Cancel'), submit)));
    return;
  }
  const delBtn = h('button', { type: 'button', class: 'btn btn-danger', onclick: async () => {
    if (!await confirmDialog('Delete block', `Delete the block “${doc.name}”?${await usesOfBlock(doc.id)}`, { confirmLabel: 'Delete', danger: true })) return;
    await runAction(delBtn, () => api.del(`/block_documents/${doc.id}`), 'Block deleted');
    navigate('blocks');
  } }, 'Delete');
  const data = doc.data || {};
  const keys = [...new Set([...Object.keys(fields.properties || {}), ...Object.keys(data)])];
  replace(root,
    pageHeader(doc.name, { crumbs, badge: h('span', { class: 'pill' }, bt.name),
      actions: [h('a', { class: 'btn', href: paths.blockEdit(doc.id) }, 'Edit'), delBtn] }),
    section('Values', keys.length ? keyValues(keys.map((k) => {
      const title = (fields.properties && fields.properties[k] && fields.properties[k].title) || k;
      const v = displayValue(k, data[k], fields);
      return [title, v === '' ? h('span', { class: 'muted' }, '—') : h('span', { class: 'block-value', dataset: { field: k } }, v)];
    })) : emptyState('No values', 'This block has no stored values.')),
    section('Details', keyValues([['Type', bt.name], ['Slug', h('code', null, bt.slug)], ['Capabilities', (schema.capabilities || []).join(', ') || '—'], ['Created', timeCell(doc.created)], ['Updated', timeCell(doc.updated)], ['Block ID', h('code', null, doc.id)]])));
}
