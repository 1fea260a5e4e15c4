// Builds a form from a JSON schema (block schemas, deployment parameter schemas).
import { h } from './dom.js';

let seq = 0;

function resolve(schema, root) {
  let s = schema || {};
  for (let guard = 0; guard < 10; guard++) {
    if (s.$ref && typeof s.$ref === 'string') {
      const name = s.$ref.split('/').pop();
      const defs = root.definitions || root.$defs || {};
      s = { ...(defs[name] || {}), ...Object.fromEntries(Object.entries(s).filter(([k]) => k !== '$ref')) };
      continue;
    }
    if (Array.isArray(s.allOf) && s.allOf.length === 1) { const { allOf, ...rest } = s; s = { ...allOf[0], ...rest }; continue; }
    const alt = s.anyOf || s.oneOf;
    if (Array.isArray(alt)) {
      const nonNull = alt.filter((a) => a && a.type !== 'null');
      if (nonNull.length === 1) { const { anyOf, oneOf, ...rest } = s; s = { ...nonNull[0], ...rest }; continue; }
    }
    break;
  }
  return s;
}

function isSecretField(name, prop, secretFields) {
  if (prop.format === 'password' || prop.writeOnly) return true;
  return (secretFields || []).some((f) => f === name || f === `${name}.*` || f.startsWith(`${name}.`));
}

export const MASK = '********';

// A date and time as ISO 8601 (what the SDKs parse): a date, a time to the minute or finer, an optional offset.
const DATE_TIME_EXAMPLE = '2026-12-31T23:59:00+00:00';
const ISO_DATE_TIME = /^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?$/i;
function isDateTime(text) {
  const m = ISO_DATE_TIME.exec(text);
  if (!m) return false;
  const [y, mo, d, hh, mm, ss] = m.slice(1, 7).map((x) => Number(x || 0));
  const day = new Date(Date.UTC(y, mo - 1, d));
  return day.getUTCMonth() === mo - 1 && day.getUTCDate() === d && hh < 24 && mm < 60 && ss < 60;
}

// options: {secretFields, editing, blockChoices(slug) -> [{id,name}] (already loaded), idPrefix}
export function schemaForm(schema, initial = {}, options = {}) {
  const root = schema || {};
  const props = root.properties || {};
  const required = new Set(root.required || []);
  const secretFields = options.secretFields || root.secret_fields || [];
  const refs = root.block_schema_references || {};
  const getters = [];
  const fields = [];
  const prefix = options.idPrefix || `sf${++seq}`;

  const order = Object.keys(props).sort((a, b) => (props[a].position ?? 1e9) - (props[b].position ?? 1e9));
  for (const name of order) {
    const prop = resolve(props[name], root);
    const id = `${prefix}-${name}`;
    const label = `${prop.title || name}${required.has(name) ? ' *' : ''}`;
    const has = Object.prototype.hasOwnProperty.call(initial || {}, name);
    const init = has ? initial[name] : prop.default;
    let input;
    let get;
    const secret = isSecretField(name, prop, secretFields);
    const refSlug = (refs[name] && refs[name].block_type_slug) || prop.block_type_slug;
    if (refSlug && options.blockChoices) {
      const choices = options.blockChoices(refSlug) || [];
      const cur = init && init.$ref ? init.$ref.block_document_id : null;
      input = h('select', { id, name }, h('option', { value: '' }, '— none —'),
        choices.map((c) => h('option', { value: c.id, selected: c.id === cur }, c.name)));
      get = () => (input.value ? { value: { $ref: { block_document_id: input.value } } } : { skip: !required.has(name), error: required.has(name) ? 'is required' : null });
    } else if (secret && (prop.type === 'string' || !prop.type)) {
      const hasValue = options.editing && has && init !== null && init !== '';
      input = h('input', { id, name, type: 'password', autocomplete: 'new-password', placeholder: hasValue ? 'Unchanged — type to replace' : '' });
      get = () => {
        if (!input.value) {
          if (hasValue) return { skip: true };
          return required.has(name) ? { error: 'is required' } : { skip: true };
        }
        return { value: input.value };
      };
    } else if (Array.isArray(prop.enum)) {
      input = h('select', { id, name }, required.has(name) ? null : h('option', { value: '' }, '—'),
        prop.enum.map((v) => h('option', { value: JSON.stringify(v), selected: JSON.stringify(v) === JSON.stringify(init) }, String(v))));
      get = () => (input.value === '' ? { skip: true } : { value: JSON.parse(input.value) });
    } else if (prop.type === 'boolean') {
      input = h('input', { id, name, type: 'checkbox', checked: !!init });
      get = () => ({ value: input.checked });
    } else if (prop.type === 'integer' || prop.type === 'number') {
      input = h('input', { id, name, type: 'number', step: prop.type === 'integer' ? '1' : 'any', value: init ?? '' });
      get = () => {
        if (input.value === '') return required.has(name) ? { error: 'is required' } : { skip: true };
        const v = Number(input.value);
        if (Number.isNaN(v) || (prop.type === 'integer' && !Number.isInteger(v))) return { error: `must be ${prop.type === 'integer' ? 'a whole number' : 'a number'}` };
        return { value: v };
      };
    } else if (prop.type === 'string') {
      const long = (prop.format === 'text' || /template|body|message|description|query|script/i.test(name)) || (typeof init === 'string' && init.includes('\n'));
      const dateTime = prop.format === 'date-time';
      input = long ? h('textarea', { id, name, rows: 3 }, '') : h('input', { id, name, type: prop.format === 'uri' ? 'url' : 'text', placeholder: dateTime ? DATE_TIME_EXAMPLE : null });
      input.value = init ?? '';
      get = () => {
        if (input.value === '') return required.has(name) ? { error: 'is required' } : { skip: true };
        if (dateTime) {
          const text = input.value.trim();
          return isDateTime(text) ? { value: text } : { error: `must be a date and time in ISO 8601, e.g. ${DATE_TIME_EXAMPLE}` };
        }
        return { value: input.value };
      };
    } else if (prop.type === 'array' && prop.items && resolve(prop.items, root).type === 'string' && !resolve(prop.items, root).enum) {
      input = h('input', { id, name, type: 'text', placeholder: 'Comma separated' });
      input.value = Array.isArray(init) ? init.join(', ') : '';
      get = () => {
        const items = input.value.split(',').map((x) => x.trim()).filter(Boolean);
        if (!items.length) return required.has(name) ? { error: 'is required' } : { skip: true };
        return { value: items };
      };
    } else {
      // objects, arrays and anything else: JSON text
      input = h('textarea', { id, name, rows: 4, class: 'mono', spellcheck: 'false' });
      input.value = init === undefined ? '' : JSON.stringify(init, null, 2);
      get = () => {
        if (input.value.trim() === '') return required.has(name) ? { error: 'is required' } : { skip: true };
        try { return { value: JSON.parse(input.value) }; } catch (e) { return { error: `is not valid JSON (${e.message})` }; }
      };
    }
    // A value refused on submit is named under its own field, besides the form's summary.
    const errEl = h('p', { class: 'field-error', id: `${id}-error`, hidden: true });
    getters.push([name, prop.title || name, get, input, errEl]);
    const isCheck = input.type === 'checkbox';
    fields.push(h('div', { class: isCheck ? 'field field-check' : 'field', dataset: { field: name } },
      isCheck ? h('label', { for: id }, input, ' ', label) : [h('label', { for: id }, label, secret ? h('span', { class: 'secret-tag' }, ' secret') : null), input],
      errEl, prop.description ? h('p', { class: 'help muted' }, prop.description) : null));
  }

  const el = h('div', { class: 'schema-form' }, fields.length ? fields : h('p', { class: 'muted' }, 'This schema has no fields.'));
  function values() {
    const out = {};
    const errors = [];
    for (const [name, title, get, input, errEl] of getters) {
      const r = get();
      errEl.textContent = r.error ? `${title} ${r.error}` : '';
      errEl.hidden = !r.error;
      if (r.error) { input.setAttribute('aria-invalid', 'true'); input.setAttribute('aria-describedby', errEl.id); } else { input.removeAttribute('aria-invalid'); input.removeAttribute('aria-describedby'); }
      if (r.error) errors.push(`${title} ${r.error}`);
      else if (!r.skip) out[name] = r.value;
    }
    return { values: out, errors };
  }
  return { el, values };
}

// Mask the values of secret fields for display.
export function displayValue(name, value, schema) {
  const props = (schema && schema.properties) || {};
  const prop = resolve(props[name] || {}, schema || {});
  if (isSecretField(name, prop, (schema && schema.secret_fields) || [])) return value === null || value === undefined || value === '' ? '' : MASK;
  if (value && typeof value === 'object') return JSON.stringify(value);
  return value === null || value === undefined ? '' : String(value);
}
