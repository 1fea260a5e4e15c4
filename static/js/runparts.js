// What a flow run's page and a task run's page show alike: the state history as a timeline and the run's
// artifacts as cards.
import { h } from './dom.js';
import { emptyState, stateBadge, timeCell } from './ui.js';
import { renderArtifact } from './artifact.js';
import { fmtDuration, fmtRelative } from './format.js';

// states: as /flow_run_states/ or /task_run_states/ answer them, in any order. Each shows how long it lasted
// (until the next one).
export function stateTimeline(states, what) {
  const sorted = [...states].sort((a, b) => new Date(a.timestamp) - new Date(b.timestamp));
  if (!sorted.length) return emptyState('No state history', `No state was recorded for this ${what}.`);
  return h('ol', { class: 'timeline' }, sorted.map((s, i) => {
    const next = sorted[i + 1];
    const dur = next ? (new Date(next.timestamp) - new Date(s.timestamp)) / 1000 : null;
    return h('li', { class: 'timeline-item', style: { '--state': `var(--st-${(s.type || '').toLowerCase()})` } },
      h('div', { class: 'timeline-head' }, stateBadge(s.type, s.name), timeCell(s.timestamp),
        dur !== null ? h('span', { class: 'muted small' }, ` for ${fmtDuration(dur)}`) : null),
      s.message ? h('p', { class: 'state-message' }, s.message) : null);
  }));
}

// taskNames (task run id -> name), when given, says which task made an artifact.
export function artifactCards(arts, what, taskNames = new Map()) {
  if (!arts.length) return emptyState('No artifacts', `This ${what} has not created any artifact.`);
  return arts.map((a) => h('article', { class: 'artifact', dataset: { type: a.type || '' } },
    h('header', { class: 'artifact-head' },
      h('h3', null, a.key || 'Unnamed artifact'),
      h('span', { class: 'pill' }, a.type || 'unknown'),
      a.task_run_id && taskNames.get(a.task_run_id) ? h('span', { class: 'muted small' }, `from ${taskNames.get(a.task_run_id)}`) : null,
      h('span', { class: 'muted small' }, fmtRelative(a.created))),
    a.description ? h('p', { class: 'muted' }, a.description) : null,
    h('div', { class: 'artifact-body' }, renderArtifact(a))));
}
