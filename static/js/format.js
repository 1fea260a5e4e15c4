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

// fmtDateTime's text as its parts (Intl's: month, literal, day, ..., hour, ...), for a cell that lays them out.
export function fmtDateTimeParts(iso) {
  const d = parseTime(iso);
  return d ? dtf.formatToParts(d) : null;
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

const WEEKDAYS = ['Sunday', 'Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday'];
const MONTHS = ['January', 'February', 'March', 'April', 'May', 'June', 'July', 'August', 'September', 'October', 'November', 'December'];
const two = (n) => String(n).padStart(2, '0');
const ordinal = (n) => `${n}${[11, 12, 13].includes(n % 100) ? 'th' : ({ 1: 'st', 2: 'nd', 3: 'rd' }[n % 10] || 'th')}`;

// The wall-clock time of an instant in a time zone, as HH:MM.
function wallTime(iso, timeZone) {
  const d = parseTime(iso);
  if (!d) return null;
  try {
    return new Intl.DateTimeFormat('en-GB', { hour: '2-digit', minute: '2-digit', hourCycle: 'h23', timeZone: timeZone || 'UTC' }).format(d);
  } catch { return null; }
}

function cronList(field, names) {
  const parts = field.split(',');
  if (!parts.every((p) => /^\d+(-\d+)?$/.test(p))) return null;
  const words = parts.map((p) => {
    const [a, b] = p.split('-').map(Number);
    const name = (n) => (names ? names[n % names.length] : String(n));
    if (names && (a >= names.length + 1 || (b !== undefined && b > names.length))) return null;
    return b === undefined ? name(a) : `${name(a)} to ${name(b)}`;
  });
  return words.includes(null) ? null : words.join(', ').replace(/, ([^,]*)$/, ' and $1');
}

// A cron expression as a sentence for the shapes people write; null for the others (shown as written).
function cronSentence(expr) {
  const f = String(expr).trim().split(/\s+/);
  if (f.length !== 5) return null;
  const [min, hour, dom, mon, dow] = f;
  const num = (x) => /^\d+$/.test(x);
  const step = (x) => (/^\*\/(\d+)$/.exec(x) || [])[1];
  if (min === '*' && hour === '*' && dom === '*' && mon === '*' && dow === '*') return 'every minute';
  if (step(min) && hour === '*' && dom === '*' && mon === '*' && dow === '*') return `every ${step(min)} minutes`;
  if (num(min) && hour === '*' && dom === '*' && mon === '*' && dow === '*') return `every hour at ${two(min)} minutes past`;
  if (num(min) && step(hour) && dom === '*' && mon === '*' && dow === '*') return `every ${step(hour)} hours at ${two(min)} minutes past`;
  if (!num(min) || !/^\d+(,\d+)*$/.test(hour)) return null;
  const at = `at ${hour.split(',').map((hh) => `${two(hh)}:${two(min)}`).join(', ').replace(/, ([^,]*)$/, ' and $1')}`;
  if (dom === '*' && mon === '*' && dow === '*') return `every day ${at}`;
  if (dom === '*' && mon === '*') {
    if (dow === '1-5') return `every weekday (Monday to Friday) ${at}`;
    const days = cronList(dow, WEEKDAYS);
    return days ? `every ${days} ${at}` : null;
  }
  if (dow === '*' && /^\d+(,\d+)*$/.test(dom)) {
    const days = dom.split(',').map((d) => ordinal(Number(d))).join(', ').replace(/, ([^,]*)$/, ' and $1');
    if (mon === '*') return `on the ${days} of every month ${at}`;
    const months = cronList(mon, [null, ...MONTHS.slice(0, 11)].map((m, i) => (i === 0 ? 'December' : MONTHS[i - 1])));
    return months ? `on the ${days} of ${months} ${at}` : null;
  }
  return null;
}

const RRULE_DAYS = { MO: 'Monday', TU: 'Tuesday', WE: 'Wednesday', TH: 'Thursday', FR: 'Friday', SA: 'Saturday', SU: 'Sunday' };
const RRULE_UNITS = { YEARLY: 'year', MONTHLY: 'month', WEEKLY: 'week', DAILY: 'day', HOURLY: 'hour', MINUTELY: 'minute' };
const andList = (words) => words.join(', ').replace(/, ([^,]*)$/, ' and $1');
const numbers = (text) => (/^-?\d+(,-?\d+)*$/.test(text) ? text.split(',').map(Number) : null);

function rruleDays(byday) {
  const days = byday.split(',').map((d) => /^([+-]?\d{1,2})?(MO|TU|WE|TH|FR|SA|SU)$/.exec(d));
  if (days.includes(null)) return null;
  if (days.every((m) => !m[1]) && byday === 'MO,TU,WE,TH,FR') return 'on weekdays (Monday to Friday)';
  return 'on ' + andList(days.map(([, n, d]) => {
    if (!n) return RRULE_DAYS[d];
    return `the ${Number(n) === -1 ? 'last' : ordinal(Number(n))} ${RRULE_DAYS[d]}`;
  }));
}

// An RRULE (RFC 5545) as a sentence for the parts people write (FREQ, INTERVAL, BYDAY, BYMONTHDAY, BYMONTH,
// BYHOUR, BYMINUTE, COUNT, UNTIL); null for anything else (shown as written). The time zone comes back too:
// a DTSTART;TZID=... names it.
export function rruleSentence(text) {
  const lines = String(text).trim().split(/\s*\n\s*/);
  const rules = lines.filter((l) => !/^DTSTART/i.test(l));
  const start = lines.find((l) => /^DTSTART/i.test(l));
  if (rules.length !== 1) return null;
  const parts = {};
  for (const item of rules[0].replace(/^RRULE:/i, '').split(';')) {
    const [key, value] = item.split('=');
    if (!key || value === undefined) return null;
    parts[key.toUpperCase()] = value.toUpperCase();
  }
  const known = ['FREQ', 'INTERVAL', 'BYDAY', 'BYMONTHDAY', 'BYMONTH', 'BYHOUR', 'BYMINUTE', 'COUNT', 'UNTIL', 'WKST'];
  const unit = RRULE_UNITS[parts.FREQ];
  if (!unit || Object.keys(parts).some((k) => !known.includes(k))) return null;
  const every = Number(parts.INTERVAL || 1);
  if (!Number.isInteger(every) || every < 1) return null;
  const words = [every === 1 ? `every ${unit}` : `every ${every} ${unit}s`];
  if (parts.BYDAY) {
    const days = rruleDays(parts.BYDAY);
    if (!days) return null;
    // "every Monday and Wednesday", "every weekday (Monday to Friday)" where the rule reads so
    if (every === 1 && ['day', 'week'].includes(unit) && !/\d/.test(parts.BYDAY)) {
      words[0] = 'every ' + days.replace(/^on /, '').replace(/^weekdays/, 'weekday');
    } else words.push(days);
  }
  if (parts.BYMONTHDAY) {
    const days = numbers(parts.BYMONTHDAY);
    if (!days) return null;
    words.push('on the ' + andList(days.map((d) => (d === -1 ? 'last day' : ordinal(d)))));
  }
  if (parts.BYMONTH) {
    const months = numbers(parts.BYMONTH);
    if (!months || months.some((m) => m < 1 || m > 12)) return null;
    words.push('in ' + andList(months.map((m) => MONTHS[m - 1])));
  }
  const hours = parts.BYHOUR ? numbers(parts.BYHOUR) : null;
  const minutes = parts.BYMINUTE ? numbers(parts.BYMINUTE) : null;
  if ((parts.BYHOUR && !hours) || (parts.BYMINUTE && !minutes)) return null;
  if (hours) words.push('at ' + andList(hours.flatMap((hh) => (minutes || [0]).map((mm) => `${two(hh)}:${two(mm)}`))));
  else if (minutes) words.push(`at ${andList(minutes.map(String))} minutes past`);
  if (parts.COUNT) words.push(`${Number(parts.COUNT)} times`);
  if (parts.UNTIL) {
    const m = /^(\d{4})(\d{2})(\d{2})/.exec(parts.UNTIL);
    if (!m) return null;
    words.push(`until ${m[1]}-${m[2]}-${m[3]}`);
  }
  const zone = start && /TZID=([^:;]+)/i.exec(start);
  return { sentence: words.join(' ').replace(/ (\d+ times|until)/, ', $1'), timezone: zone ? zone[1] : null };
}

// A schedule as a sentence: "Every day at 06:00, Europe/Berlin", "Every 15 minutes", "Every Monday at 09:00, UTC".
export function describeSchedule(sched) {
  if (!sched) return 'No schedule';
  const tz = sched.timezone || 'UTC';
  const cap = (t) => t.charAt(0).toUpperCase() + t.slice(1);
  if (sched.interval !== undefined) {
    const s = Number(sched.interval);
    const units = [[86400 * 7, 'week'], [86400, 'day'], [3600, 'hour'], [60, 'minute'], [1, 'second']];
    let text = `every ${fmtDuration(s)}`;
    for (const [n, u] of units) {
      if (s >= n && s % n === 0) { const k = s / n; text = `every ${k === 1 ? '' : k + ' '}${u}${k === 1 ? '' : 's'}`; break; }
    }
    // Intervals of whole days keep the anchor's wall-clock time (the scheduler steps the local clock).
    const time = s % 86400 === 0 && sched.anchor_date ? wallTime(sched.anchor_date, tz) : null;
    if (time && s === 86400 * 7) {
      const day = new Intl.DateTimeFormat('en-GB', { weekday: 'long', timeZone: tz }).format(parseTime(sched.anchor_date));
      return cap(`every ${day} at ${time}, ${tz}`);
    }
    return cap(time ? `${text} at ${time}, ${tz}` : text);
  }
  if (sched.cron !== undefined) {
    const sentence = cronSentence(sched.cron);
    return sentence ? cap(`${sentence}, ${tz}`) : `Cron “${sched.cron}”, ${tz}`;
  }
  if (sched.rrule !== undefined) {
    const rule = rruleSentence(sched.rrule);
    return rule ? cap(`${rule.sentence}, ${rule.timezone || tz}`) : `RRule “${sched.rrule}”, ${tz}`;
  }
  return JSON.stringify(sched);
}
