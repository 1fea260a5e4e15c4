// Inline SVG charts, drawn by hand.
import { h, svg } from './dom.js';
import { STATE_COLORS, NAME_COLORS, stateName, fmtTimeShort, fmtDateShort, fmtDateTime, fmtDuration, parseTime } from './format.js';

const ORDER = ['COMPLETED', 'RUNNING', 'SCHEDULED', 'LATE', 'PENDING', 'PAUSED', 'CANCELLING', 'CANCELLED', 'CRASHED', 'FAILED'];
// Late runs are drawn apart from the other Scheduled ones.
const colorOf = (key) => (key === 'LATE' ? NAME_COLORS.Late : STATE_COLORS[key]);
const labelOf = (key) => (key === 'LATE' ? 'Late' : stateName(key));
const dayOf = (d) => `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}`;

// Axis labels: over days, one at each day's first bucket (no day skipped); within a day or two, a time every few
// buckets, with its date where the day changes.
function axisLabels(buckets) {
  const n = buckets.length;
  const spanMs = n ? buckets[n - 1].end - buckets[0].start : 0;
  const labels = new Map();
  if (spanMs > 2 * 86400000) {
    buckets.forEach((b, i) => { if (i === 0 || dayOf(b.start) !== dayOf(buckets[i - 1].start)) labels.set(i, fmtDateShort(b.start)); });
    return labels;
  }
  const every = Math.max(1, Math.ceil(n / 6));
  let lastDay = null;
  buckets.forEach((b, i) => {
    if (i % every) return;
    const day = dayOf(b.start);
    labels.set(i, day !== lastDay ? `${fmtDateShort(b.start)} ${fmtTimeShort(b.start)}` : fmtTimeShort(b.start));
    lastDay = day;
  });
  return labels;
}

// history: [{interval_start, interval_end, states: [{state_type, state_name, count_runs}]}]
export function runHistoryChart(history, { width = 820, height = 220 } = {}) {
  const pad = { l: 40, r: 12, t: 12, b: 30 };
  const iw = width - pad.l - pad.r;
  const ih = height - pad.t - pad.b;
  const buckets = history.map((b) => {
    const counts = {};
    for (const s of b.states || []) {
      const key = s.state_name === 'Late' ? 'LATE' : s.state_type;
      counts[key] = (counts[key] || 0) + (s.count_runs || 0);
    }
    return { start: parseTime(b.interval_start), end: parseTime(b.interval_end), counts, total: Object.values(counts).reduce((a, c) => a + c, 0) };
  });
  const max = Math.max(1, ...buckets.map((b) => b.total));
  const niceMax = max <= 4 ? max : Math.ceil(max / 4) * 4;
  const n = Math.max(1, buckets.length);
  const bw = iw / n;
  const gap = Math.min(4, bw * 0.2);
  const labels = axisLabels(buckets);
  const parts = [];
  for (let k = 0; k <= 4; k++) {
    const v = Math.round((niceMax * k) / 4);
    const y = pad.t + ih - (ih * v) / niceMax;
    parts.push(svg('line', { x1: pad.l, x2: width - pad.r, y1: y, y2: y, class: 'grid' }));
    parts.push(svg('text', { x: pad.l - 6, y: y + 4, 'text-anchor': 'end', class: 'axis' }, String(v)));
    if (niceMax <= 4 && k < 4 && niceMax < 4) { /* small maxima: labels may repeat; fine */ }
  }
  buckets.forEach((b, idx) => {
    const x = pad.l + idx * bw + gap / 2;
    let y = pad.t + ih;
    const tip = [`${fmtDateTime(b.start.toISOString())} – ${fmtTimeShort(b.end)}`, `${b.total} run${b.total === 1 ? '' : 's'}`];
    for (const t of ORDER) {
      const c = b.counts[t];
      if (!c) continue;
      const bh = (ih * c) / niceMax;
      y -= bh;
      tip.push(`${labelOf(t)}: ${c}`);
      parts.push(svg('rect', { x, y, width: Math.max(1, bw - gap), height: bh, fill: colorOf(t), class: 'bar', 'data-state': t, 'data-count': c },
        svg('title', null, `${labelOf(t)}: ${c} (${fmtTimeShort(b.start)}–${fmtTimeShort(b.end)})`)));
    }
    parts.push(svg('rect', { x: pad.l + idx * bw, y: pad.t, width: bw, height: ih, fill: 'transparent', class: 'hover' }, svg('title', null, tip.join('\n'))));
    if (labels.has(idx)) parts.push(svg('text', { x: pad.l + idx * bw + bw / 2, y: height - 10, 'text-anchor': 'middle', class: 'axis' }, labels.get(idx)));
  });
  const present = ORDER.filter((t) => buckets.some((b) => b.counts[t]));
  return h('figure', { class: 'chart' },
    svg('svg', { viewBox: `0 0 ${width} ${height}`, width: '100%', role: 'img', 'aria-label': `Flow runs over time: ${buckets.reduce((a, b) => a + b.total, 0)} runs` }, parts),
    h('figcaption', { class: 'legend' }, present.length ? present.map((t) => h('span', { class: 'legend-item' },
      h('span', { class: 'swatch', style: { background: colorOf(t) } }), labelOf(t))) : h('span', { class: 'muted' }, 'No runs in this period')));
}

// Gantt-like timeline of task runs.
export function taskGantt(taskRuns, { now = Date.now(), width = 820 } = {}) {
  const rows = taskRuns.map((t) => {
    const start = parseTime(t.start_time) || parseTime(t.expected_start_time);
    let end = parseTime(t.end_time);
    if (!end && start) end = t.state_type === 'RUNNING' ? new Date(now) : start;
    return { t, start, end };
  }).filter((r) => r.start);
  if (!rows.length) return h('p', { class: 'muted' }, 'No task run has started yet.');
  const min = Math.min(...rows.map((r) => r.start.getTime()));
  const max = Math.max(...rows.map((r) => r.end.getTime()), min + 1000);
  const labelW = 170;
  const rowH = 22;
  const pad = { t: 22, b: 6, r: 12 };
  const iw = width - labelW - pad.r;
  const height = pad.t + rows.length * rowH + pad.b;
  const xs = (ms) => labelW + ((ms - min) / (max - min)) * iw;
  const parts = [];
  for (let k = 0; k <= 4; k++) {
    const ms = min + ((max - min) * k) / 4;
    const x = xs(ms);
    parts.push(svg('line', { x1: x, x2: x, y1: pad.t - 4, y2: height - pad.b, class: 'grid' }));
    parts.push(svg('text', { x, y: 12, 'text-anchor': k === 0 ? 'start' : k === 4 ? 'end' : 'middle', class: 'axis' }, `+${fmtDuration((ms - min) / 1000)}`));
  }
  rows.forEach((r, idx) => {
    const y = pad.t + idx * rowH;
    const x1 = xs(r.start.getTime());
    const x2 = Math.max(x1 + 3, xs(r.end.getTime()));
    const name = r.t.name || r.t.task_key;
    parts.push(svg('text', { x: 4, y: y + 15, class: 'gantt-label' }, name.length > 24 ? name.slice(0, 23) + '…' : name));
    parts.push(svg('rect', { x: x1, y: y + 4, width: x2 - x1, height: rowH - 8, rx: 3, fill: STATE_COLORS[r.t.state_type] || '#999', class: 'gantt-bar', 'data-task': name },
      svg('title', null, `${name}: ${r.t.state_name || stateName(r.t.state_type)}, ${fmtDuration((r.end - r.start) / 1000)}`)));
  });
  return h('figure', { class: 'chart gantt' },
    svg('svg', { viewBox: `0 0 ${width} ${height}`, width: '100%', role: 'img', 'aria-label': `Timeline of ${rows.length} task runs` }, parts));
}
