import { h, replace } from '../dom.js';
import { api, byIds } from '../api.js';
import { pageHeader, errorBox, emptyState, loading, confirmDialog, runAction, toast, field, formError, parseTags, jsonBlock, section } from '../ui.js';
import { fmtDateTime, fmtRelative, plural } from '../format.js';
import { paths, navigate } from '../router.js';
import { eventsTable } from './events.js';

// Automations (Prefect 3's notification policies): a trigger over events, and actions. Listed as sentences
// (automations), each with a page of its own (automations/automation/<id>: when it last fired, what its actions
// did, the events it made), created (automations/create) and edited (automations/automation/<id>/edit) with a
// form for the common case (flow run states, tags, a notification, a deployment to run) or as JSON for
// everything else; paused, resumed, deleted. The paths are those of Prefect's UI.

const STATES = ['Completed', 'Failed', 'Crashed', 'Cancelled', 'Running', 'Late', 'Scheduled', 'Pending', 'Paused'];

function joinOr(items) {
  if (items.length <= 1) return items.join('');
  return `${items.slice(0, -1).join(', ')} or ${items[items.length - 1]}`;
}

function seconds(value) {
  const s = Number(value) || 0;
  if (s && s % 3600 === 0) return plural(s / 3600, 'hour');
  if (s && s % 60 === 0) return plural(s / 60, 'minute');
  return plural(s, 'second');
}

function specs(matchRelated) {
  return Array.isArray(matchRelated) ? matchRelated : [matchRelated || {}];
}

function tagsOf(trigger) {
  const out = [];
  for (const spec of specs(trigger.match_related)) {
    const ids = spec['prefect.resource.id'];
    for (const id of Array.isArray(ids) ? ids : ids ? [ids] : []) if (id.startsWith('prefect.tag.')) out.push(id.slice(12));
  }
  return out;
}

function eventPhrase(trigger) {
  const rank = (s) => (STATES.includes(s) ? STATES.indexOf(s) : STATES.length);
  const states = (trigger.expect || []).filter((e) => e.startsWith('prefect.flow-run.')).map((e) => e.slice(17))
    .sort((a, b) => rank(a) - rank(b));
  const tags = tagsOf(trigger);
  const tagPart = tags.length ? ` with ${joinOr(tags)} tag${tags.length > 1 ? 's' : ''}` : '';
  if (states.length && states.length === (trigger.expect || []).length) {
    const named = states.map((s) => (s === '*' ? 'any state' : s.toLowerCase()));
    return `a run of any flow${tagPart} enters ${named.includes('any state') ? 'any state' : `${/^[aeiou]/.test(named[0]) ? 'an' : 'a'} ${joinOr(named)} state`}`;
  }
  const names = (trigger.expect || []).length ? joinOr(trigger.expect) : 'any event';
  return `${names}${tagPart ? ` (for resources${tagPart})` : ''}`;
}

function triggerPhrase(trigger) {
  if (trigger.type === 'compound') {
    const need = trigger.require === 'all' ? 'all' : trigger.require === 'any' ? 'any' : `${trigger.require}`;
    return `${need} of ${trigger.triggers.length} conditions happen${trigger.within ? ` within ${seconds(trigger.within)}` : ''} (${trigger.triggers.map(triggerPhrase).join('; ')})`;
  }
  if (trigger.type === 'sequence') return `these happen in order: ${trigger.triggers.map(triggerPhrase).join(', then ')}`;
  const count = trigger.threshold > 1 ? `${trigger.threshold} times ` : '';
  if (trigger.posture === 'Proactive') return `${eventPhrase(trigger)} does not happen ${count}within ${seconds(trigger.within)}`;
  return `${eventPhrase(trigger)}${count ? ` ${count.trim()}` : ''}${trigger.within ? ` within ${seconds(trigger.within)}` : ''}`;
}

function actionPhrase(action, names) {
  const name = (id) => names.get(id) || 'an unknown block';
  switch (action.type) {
    case 'send-notification': return `send a notification to ${name(action.block_document_id)}`;
    case 'call-webhook': return `call the webhook ${name(action.block_document_id)}`;
    case 'run-deployment': return action.source === 'inferred' ? 'run the deployment of the event' : `run the deployment ${names.get(action.deployment_id) || action.deployment_id}`;
    case 'do-nothing': return 'do nothing';
    case 'change-flow-run-state': return `set the flow run's state to ${String(action.state).toLowerCase()}`;
    default: return action.type.replace(/-/g, ' ') + (action.source === 'inferred' ? ' (of the event)' : '');
  }
}

export function automationSentence(a, names = new Map()) {
  const actions = (a.actions || []).map((x) => actionPhrase(x, names));
  const resolve = (a.actions_on_resolve || []).map((x) => actionPhrase(x, names));
  return `When ${triggerPhrase(a.trigger)}, ${joinOr(actions) || 'do nothing'}${resolve.length ? `; when it resolves, ${joinOr(resolve)}` : ''}`;
}

async function objectNames(automations) {
  const blockIds = new Set();
  const deploymentIds = new Set();
  for (const a of automations) {
    for (const x of [...a.actions, ...(a.actions_on_trigger || []), ...(a.actions_on_resolve || [])]) {
      if (x.block_document_id) blockIds.add(x.block_document_id);
      if (x.deployment_id) deploymentIds.add(x.deployment_id);
    }
  }
  const names = new Map();
  if (blockIds.size) for (const [id, d] of await byIds('/block_documents/filter', 'block_documents', [...blockIds])) names.set(id, d.name);
  if (deploymentIds.size) for (const [id, d] of await byIds('/deployments/filter', 'deployments', [...deploymentIds])) names.set(id, d.name);
  return names;
}

function historyList(history) {
  if (!history.length) return h('p', { class: 'muted' }, 'No action has run yet.');
  return h('ul', { class: 'automation-history' }, history.slice(0, 10).map((x) => h('li', null,
    h('span', { class: `pill ${x.status === 'COMPLETED' ? 'pill-ready' : x.status === 'FAILED' ? 'pill-paused' : ''}` }, x.status.toLowerCase()),
    ` ${x.action.type} · ${fmtDateTime(x.created)}`, x.error ? h('span', { class: 'muted' }, ` — ${x.error}`) : null)));
}

function lastFired(history) {
  const last = history.length ? history[0].created : null;
  return h('p', { class: 'muted automation-last' }, last ? `Last fired ${fmtRelative(last)} (${fmtDateTime(last)})` : 'Never fired');
}

function statusPill(a) {
  return h('span', { class: `pill ${a.enabled ? 'pill-ready' : 'pill-paused'}` }, a.enabled ? 'Active' : 'Paused');
}

async function toggle(button, a) {
  await runAction(button, () => api.patch(`/automations/${a.id}`, { enabled: !a.enabled }), a.enabled ? 'Automation paused' : 'Automation resumed');
}

async function remove(button, a) {
  if (!await confirmDialog('Delete automation', `Delete the automation “${a.name}”?`, { confirmLabel: 'Delete', danger: true })) return false;
  await runAction(button, () => api.del(`/automations/${a.id}`), 'Automation deleted');
  return true;
}

export async function automationsPage(ctx, root) {
  document.title = 'Automations · prefectlite';
  const list = h('div', null, loading());
  const addLink = h('a', { class: 'btn btn-primary', href: paths.automationCreate() }, 'Create automation');
  replace(root, pageHeader('Automations', { actions: [addLink], subtitle: 'When something happens (or does not), act: notify, run a deployment, pause, cancel.' }), list);

  async function load() {
    try {
      const automations = await api.post('/automations/filter', { sort: 'NAME_ASC', limit: 200 });
      if (!ctx.alive) return;
      if (!automations.length) {
        replace(list, emptyState('No automations yet', 'Create one to be told when runs fail, or to run a deployment when another finishes.', h('a', { class: 'btn', href: paths.automationCreate() }, 'Create automation')));
        return;
      }
      const names = await objectNames(automations);
      const histories = await Promise.all(automations.map((a) => api.get(`/automations/${a.id}/history`).catch(() => [])));
      if (!ctx.alive) return;
      replace(list, h('ul', { class: 'policy-list automation-list' }, automations.map((a, i) => h('li', { class: `card policy automation ${a.enabled ? '' : 'policy-paused'}`, dataset: { id: a.id } },
        h('h3', { class: 'automation-name' }, h('a', { href: paths.automation(a.id) }, a.name)),
        h('p', { class: 'policy-sentence automation-sentence' }, automationSentence(a, names)),
        lastFired(histories[i]),
        h('details', null, h('summary', null, 'Action history'), historyList(histories[i])),
        h('div', { class: 'policy-foot' }, statusPill(a),
          h('div', { class: 'row-actions' },
            h('button', { type: 'button', class: 'btn btn-small', onclick: async (e) => { await toggle(e.target, a); load(); } }, a.enabled ? 'Pause' : 'Resume'),
            h('a', { class: 'btn btn-small', href: paths.automationEdit(a.id) }, 'Edit'),
            h('button', { type: 'button', class: 'btn btn-small btn-danger', onclick: async (e) => { if (await remove(e.target, a)) load(); } }, 'Delete')))))));
    } catch (err) { replace(list, errorBox(err, load)); }
  }
  await load();
}

// An automation's page: its sentence, state, what its actions did, the events it made, the trigger and actions
// as stored.
export async function automationDetail(ctx, root, id) {
  replace(root, loading());
  const a = await api.get(`/automations/${encodeURIComponent(id)}`);
  if (!ctx.alive) return;
  document.title = `${a.name} · Automation · prefectlite`;
  const [names, history, events] = await Promise.all([
    objectNames([a]),
    api.get(`/automations/${a.id}/history`).catch(() => []),
    api.post('/events/filter', { filter: { any_resource: { id: [`prefect.automation.${a.id}`] } }, limit: 10 }).catch(() => null),
  ]);
  if (!ctx.alive) return;
  const actions = [
    h('button', { type: 'button', class: 'btn', onclick: async (e) => { await toggle(e.currentTarget, a); ctx.rerender(); } }, a.enabled ? 'Pause' : 'Resume'),
    h('a', { class: 'btn', href: paths.automationEdit(a.id) }, 'Edit'),
    h('button', { type: 'button', class: 'btn btn-danger', onclick: async (e) => { if (await remove(e.currentTarget, a)) navigate('automations'); } }, 'Delete'),
  ];
  replace(root,
    pageHeader(a.name, { crumbs: [{ label: 'Automations', href: 'automations' }], badge: statusPill(a), actions }),
    h('div', { class: 'card automation-summary', dataset: { id: a.id } },
      a.description ? h('p', null, a.description) : null,
      h('p', { class: 'policy-sentence automation-sentence' }, automationSentence(a, names)),
      lastFired(history)),
    section('Action history', historyList(history)),
    section('Events', events ? eventsTable(events.events, 'This automation has not been triggered yet.') : h('p', { class: 'muted' }, 'Events could not be read.'),
      { actions: [h('a', { href: 'events' }, 'All events')] }),
    section('Trigger and actions', jsonBlock({ trigger: a.trigger, actions: a.actions, actions_on_trigger: a.actions_on_trigger, actions_on_resolve: a.actions_on_resolve })));
}

// The form of automations/create (no id) and automations/automation/<id>/edit.
export async function automationEdit(ctx, root, id) {
  replace(root, loading());
  const automation = id ? await api.get(`/automations/${encodeURIComponent(id)}`) : null;
  const [blocks, deployments] = await Promise.all([
    api.post('/block_documents/filter', { block_schemas: { block_capabilities: { all_: ['notify'] } }, sort: 'NAME_ASC', limit: 200 }),
    api.post('/deployments/filter', { limit: 200 })]);
  if (!ctx.alive) return;
  document.title = `${automation ? `Edit ${automation.name}` : 'Create automation'} · prefectlite`;
  const crumbs = [{ label: 'Automations', href: 'automations' }];
  if (automation) crumbs.push({ label: automation.name, href: paths.automation(automation.id) });
  const t = automation ? automation.trigger : { type: 'event', posture: 'Reactive', expect: ['prefect.flow-run.Failed'], threshold: 1, within: 0, match_related: {} };
  const first = automation ? automation.actions[0] || { type: 'do-nothing' } : { type: 'send-notification' };
  const simple = !automation || (t.type === 'event' && (t.expect || []).every((e) => e.startsWith('prefect.flow-run.'))
    && automation.actions.length === 1 && ['send-notification', 'run-deployment', 'do-nothing'].includes(first.type));

  const nameIn = h('input', { id: 'auto-name', type: 'text', required: true, value: automation ? automation.name : '' });
  const picked = new Set((t.expect || []).map((e) => e.replace('prefect.flow-run.', '')));
  const stateBoxes = STATES.map((s) => h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'state', value: s, checked: picked.has(s) }), ' ', s));
  const tagsIn = h('input', { id: 'auto-tags', type: 'text', value: tagsOf(t).join(', '), placeholder: 'Any tag' });
  const postureSel = h('select', { id: 'auto-posture' },
    h('option', { value: 'Reactive', selected: t.posture !== 'Proactive' }, 'when it happens'),
    h('option', { value: 'Proactive', selected: t.posture === 'Proactive' }, 'when it does not happen'));
  const thresholdIn = h('input', { id: 'auto-threshold', type: 'number', min: 1, value: t.threshold || 1 });
  const withinIn = h('input', { id: 'auto-within', type: 'number', min: 0, value: t.within || 0 });
  const actionSel = h('select', { id: 'auto-action' },
    h('option', { value: 'send-notification', selected: first.type === 'send-notification' }, 'Send a notification'),
    h('option', { value: 'run-deployment', selected: first.type === 'run-deployment' }, 'Run a deployment'),
    h('option', { value: 'do-nothing', selected: first.type === 'do-nothing' }, 'Do nothing (record only)'));
  // An action whose block or deployment is gone offers none chosen (not silently the first one of the list).
  const gone = (key, list) => first.type === (key === 'block_document_id' ? 'send-notification' : 'run-deployment') && first[key] && !list.some((x) => x.id === first[key]);
  const goneOption = (what) => h('option', { value: '', selected: true }, `— its ${what} was deleted: pick one —`);
  const blockSel = h('select', { id: 'auto-block' }, gone('block_document_id', blocks) ? goneOption('block') : null,
    blocks.map((d) => h('option', { value: d.id, selected: first.block_document_id === d.id }, d.name)));
  const bodyIn = h('textarea', { id: 'auto-body', rows: 3 });
  bodyIn.value = first.body || 'Flow run {{ flow_run.name }} of {{ flow.name }} entered {{ flow_run.state.name }}: {{ flow_run.state.message }}';
  const depSel = h('select', { id: 'auto-deployment' }, gone('deployment_id', deployments) ? goneOption('deployment') : null, deployments.map((d) => h('option', { value: d.id, selected: first.deployment_id === d.id }, d.name)));
  const paramsIn = h('textarea', { id: 'auto-parameters', rows: 2 });
  paramsIn.value = JSON.stringify(first.parameters || {});
  const notifyFields = h('div', null, field('Send to', blockSel), field('Message', bodyIn, { help: 'A template: {{ flow_run.name }}, {{ flow.name }}, {{ event.resource.id }}, {{ value | default("none") }}…' }));
  const runFields = h('div', null, field('Deployment', depSel), field('Parameters (JSON)', paramsIn, { help: 'Values may be templates, e.g. {"upstream": "{{ flow_run.name }}"}.' }));
  const showAction = () => { notifyFields.hidden = actionSel.value !== 'send-notification'; runFields.hidden = actionSel.value !== 'run-deployment'; };
  actionSel.addEventListener('change', showAction);
  showAction();
  const jsonIn = h('textarea', { id: 'auto-json', rows: 14, class: 'mono' });
  jsonIn.value = JSON.stringify(automation ? { trigger: automation.trigger, actions: automation.actions, actions_on_trigger: automation.actions_on_trigger, actions_on_resolve: automation.actions_on_resolve } : {}, null, 2);
  const modeSel = h('select', { id: 'auto-mode' }, h('option', { value: 'form', selected: simple }, 'Form'), h('option', { value: 'json', selected: !simple }, 'JSON (any trigger and actions)'));
  const formPart = h('div', null,
    h('fieldset', { class: 'states' }, h('legend', null, 'Flow run states'), h('div', { class: 'check-grid' }, stateBoxes)),
    field('Tags', tagsIn, { help: 'Only runs with one of these tags (comma separated). Leave empty for every run.' }),
    field('Fire', postureSel), field('Times', thresholdIn), field('Within (seconds)', withinIn, { help: '0: no window (each time). At least 10 when it does not happen.' }),
    field('Then', actionSel), notifyFields, runFields);
  const jsonPart = h('div', null, field('Trigger and actions', jsonIn));
  // The hidden part's fields are disabled too: the browser would otherwise refuse the form for a bad value it hides.
  const showMode = () => {
    formPart.hidden = modeSel.value !== 'form'; jsonPart.hidden = modeSel.value !== 'json';
    for (const part of [formPart, jsonPart]) for (const c of part.querySelectorAll('input, select, textarea')) c.disabled = part.hidden;
  };
  modeSel.addEventListener('change', showMode);
  showMode();
  const err = h('div');
  const submit = h('button', { type: 'submit', class: 'btn btn-primary' }, automation ? 'Save automation' : 'Create automation');

  function fromForm() {
    const states = stateBoxes.map((l) => l.querySelector('input')).filter((i) => i.checked).map((i) => i.value);
    if (!states.length) throw new Error('Pick at least one state.');
    const tags = parseTags(tagsIn.value);
    const trigger = { type: 'event', posture: postureSel.value, expect: states.map((s) => `prefect.flow-run.${s}`),
      match: { 'prefect.resource.id': 'prefect.flow-run.*' },
      match_related: tags.length ? { 'prefect.resource.role': 'tag', 'prefect.resource.id': tags.map((x) => `prefect.tag.${x}`) } : {},
      threshold: Number(thresholdIn.value) || 1, within: Number(withinIn.value) || 0 };
    let action = { type: 'do-nothing' };
    if (actionSel.value === 'send-notification') {
      if (!blockSel.value) throw new Error(blocks.length ? 'Send to: pick a block.' : 'Create a notification block first (Blocks page).');
      action = { type: 'send-notification', block_document_id: blockSel.value, subject: 'Prefect automation: {{ flow.name }}/{{ flow_run.name }}', body: bodyIn.value };
    } else if (actionSel.value === 'run-deployment') {
      if (!depSel.value) throw new Error(deployments.length ? 'Deployment: pick one.' : 'There is no deployment to run yet: deploy a flow first (see the Deployments page).');
      let parameters;
      try { parameters = JSON.parse(paramsIn.value || '{}'); } catch (ex) { throw new Error(`Parameters: ${ex.message}`); }
      action = { type: 'run-deployment', source: 'selected', deployment_id: depSel.value, parameters };
    }
    return { trigger, actions: [action], actions_on_trigger: [], actions_on_resolve: [] };
  }

  const form = h('form', { class: 'card form automation-form', 'aria-label': automation ? 'Edit Automation' : 'Create Automation', onsubmit: async (e) => {
    e.preventDefault();
    submit.disabled = true;
    try {
      let parts;
      if (modeSel.value === 'form') parts = fromForm();
      else {
        try { parts = JSON.parse(jsonIn.value); } catch (ex) { throw new Error(`JSON: ${ex.message}`); }
      }
      const body = { name: nameIn.value.trim(), description: automation ? automation.description : '', enabled: automation ? automation.enabled : true,
        tags: automation ? automation.tags : [], actions_on_trigger: [], actions_on_resolve: [], ...parts };
      if (automation) await api.put(`/automations/${automation.id}`, body);
      else await api.post('/automations/', body);
      toast(automation ? 'Automation saved' : 'Automation created', 'success');
      navigate(automation ? paths.automation(automation.id) : 'automations');
    } catch (ex) { formError(err, ex); } finally { submit.disabled = false; }
  } },
  field('Name', nameIn), field('Edit as', modeSel), formPart, jsonPart,
  automation ? h('details', null, h('summary', null, 'As stored'), jsonBlock(automation)) : null,
  err,
  h('div', { class: 'form-actions' }, h('a', { class: 'btn', href: automation ? paths.automation(automation.id) : 'automations' }, 'Cancel'), submit));
  replace(root, pageHeader(automation ? 'Edit automation' : 'Create automation', { crumbs }), form);
}
