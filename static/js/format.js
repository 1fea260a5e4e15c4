export const STATE_TYPES = ['SCHEDULED', 'PENDING', 'RUNNING', 'PAUSED', 'CANCELLING', 'COMPLETED', 'FAILED', 'CRASHED', 'CANCELLED'];
export const TERMINAL = new Set(['COMPLETED', 'FAILED', 'CRASHED', 'CANCELLED']);
export const STATE_COLORS = {
  SCHEDULED: '#d39b0b', PENDING: '#8c96a8', RUNNING: '#2f74e0', PAUSED: '#a57f00',
  CANCELLING: '#7d8796', COMPLETED: '#23945a', FAILED: '#d23b3b', CRASHED: '#e06a2c', CANCELLED: '#596273',
};

// State names that are not a type's own name (Prefect's Late, AwaitingRetry, ...), with their type.
export const STATE_NAMES = {
  Late: 'SCHEDULED', AwaitingRetry: 'SCHEDULED', AwaitingConcurrencySlot: 'SCHEDULED', Retrying: 'RUNNING',
  TimedOut: 'FAILED', Cached: 'COMPLETED', Suspended: 'PAUSED',
};
// A state drawn in a colour of its own, not its type's: Late runs are overdue, not merely scheduled.
export const NAME_COLORS = { Late: '#a3367a' };

export function stateColor(type, name) {
  return NAME_COLORS[name] || STATE_COLORS[type] || '#8c96a8';
}

// A state token of a URL or filter (`FAILED`, `failed`, `Late`, `late`) as a type or a name; null if neither.
export function parseStateToken(token) {
  const t = String(token || '').trim();
  if (!t) return null;
  const type = STATE_TYPES.find((x) => x === t.toUpperCase());
  if (type) return { type };
  const name = Object.keys(STATE_NAMES).find((x) => x.toLowerCase() === t.toLowerCase());
  return name ? { name } : null;
}

export function stateName(type) {
  if (!type) return 'Unknown';
  return type.charAt(0) + type.slice(1).toLowerCase();
}

export function isTerminal(type) { return TERMINAL.has(type); }

const dtf = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
const tf = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const df = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric' });

export function parseTime(iso) {
  if (!iso) return null;
  const d = new Date(iso);
  return isNaN(d) ? null : d;
}

export function fmtDateTime(iso) {
  const d = parseTime(iso);
  return d ? dtf.format(d) : '—';
}

export function fmtTimeShort(d) { return tf.format(d); }
export function fmtDateShort(d) { return df.format(d); }

export function fmtRelative(iso, now = Date.now()) {
  const d = parseTime(iso);
  if (!d) return '—';
  const s = Math.round((d.getTime() - now) / 1000);
  const a = Math.abs(s);
  let txt;
  if (a < 10) return 'just now';
  if (a < 60) txt = `${a} s`;
  else if (a < 3600) txt = `${Math.round(a / 60)} min`;
  else if (a < 86400) txt = `${Math.round(a / 3600)} h`;
  else txt = `${Math.round(a / 86400)} d`;
  return s < 0 ? `${txt} ago` : `in ${txt}`;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || isNaN(seconds)) return '—';
  if (seconds < 1) return `${Math.round(seconds * 1000)}ms`;
  let s = Math.round(seconds);
  const d = Math.floor(s / 86400); s -= d * 86400;
  const hh = Math.floor(s / 3600); s -= hh * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  const parts = [];
  if (d) parts.push(`${d}d`);
  if (hh) parts.push(`${hh}h`);
  if (m) parts.push(`${m}m`);
  if (s || !parts.length) parts.push(`${s}s`);
  return parts.slice(0, 2).join(' ');
}

// Run duration: total_run_time for finished runs, live for running ones.
export function runDuration(run, now = Date.now()) {
  if (run.state_type === 'RUNNING' && run.start_time) {
    return (now - parseTime(run.start_time).getTime()) / 1000;
  }
  if (run.total_run_time) return run.total_run_time;
  if (run.start_time && run.end_time) return (parseTime(run.end_time) - parseTime(run.start_time)) / 1000;
  return run.estimated_run_time || 0;
}

export function plural(n, word, many) {
  return `${n.toLocaleString()} ${n === 1 ? word : (many || word + 's')}`;
}

export function fmtNumber(n) { return Number(n || 0).toLocaleString(); }

export function describeSchedule(sched) {
  if (!sched) return 'No schedule';
  const tz = sched.timezone ? ` (${sched.timezone})` : '';
  if (sched.interval !== undefined) {
    const s = Number(sched.interval);
    const units = [[86400 * 7, 'week'], [86400, 'day'], [3600, 'hour'], [60, 'minute'], [1, 'second']];
    for (const [n, u] of units) {
      if (s >= n && s % n === 0) { const k = s / n; return `Every ${k === 1 ? '' : k + ' '}${u}${k === 1 ? '' : 's'}`; }
    }
    return `Every ${fmtDuration(s)}`;
  }
  if (sched.cron !== undefined) return `Cron “${sched.cron}”${tz}`;
  if (sched.rrule !== undefined) return `RRule “${sched.rrule}”${tz}`;
  return JSON.stringify(sched);
}
