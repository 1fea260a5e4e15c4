// The run graph of a flow run: its task runs and subflow runs as bars on a time axis, one row each, edges from
// task_inputs, retries as one segment per attempt. It scales by drawing only what is in view: rows outside the
// scrolled window and time outside the zoomed span are never put in the DOM. Data: task runs in pages of the
// API's size (bounded by MAX_NODES), the subflows, and the state history of a bounded number of retried tasks.
import { h, svg, replace } from './dom.js';
import { api } from './api.js';
import { stateColor, stateName, fmtDuration, runDuration, parseTime } from './format.js';
import { emptyState, errorBox, loading } from './ui.js';
import { paths } from './router.js';

const PAGE = 200;
const MAX_NODES = 2000;
const MAX_RETRIED = 50; // state histories fetched to draw attempts
const ROW = 24;
const AXIS = 28;
const MIN_TICK_PX = 90;
const STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 15e3, 3e4, 6e4, 12e4, 3e5, 6e5, 9e5, 18e5, 36e5, 72e5, 108e5, 216e5, 432e5, 864e5];
const pad = (n, w = 2) => String(n).padStart(w, '0');

function clock(ms, step) {
  const d = new Date(ms);
  const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  if (step < 1000) return `${hm}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  if (step < 60000) return `${hm}:${pad(d.getSeconds())}`;
  return hm;
}

async function loadNodes(run) {
  const filter = { task_runs: { flow_run_id: { any_: [run.id] } } };
  const total = await api.post('/task_runs/count', filter);
  const pages = Math.ceil(Math.min(total, MAX_NODES) / PAGE);
  const [taskPages, subflows] = await Promise.all([
    Promise.all(Array.from({ length: pages }, (_, i) => api.post('/task_runs/filter', { ...filter, sort: 'EXPECTED_START_TIME_ASC', limit: PAGE, offset: i * PAGE }))),
    api.post('/flow_runs/filter', { flow_runs: { parent_flow_run_id: { any_: [run.id] } }, sort: 'EXPECTED_START_TIME_ASC', limit: PAGE }),
  ]);
  const subOf = new Map(subflows.map((s) => [s.parent_task_run_id, s]));
  const nodes = taskPages.flat().map((t) => {
    const sub = subOf.get(t.id);
    const src = sub || t;
    const start = parseTime(src.start_time) || parseTime(src.expected_start_time);
    return {
      id: t.id, kind: sub ? 'flow-run' : 'task-run', href: sub ? paths.flowRun(sub.id) : paths.taskRun(t.id), label: src.name,
      run: src, start: start ? start.getTime() : null, end: parseTime(src.end_time) ? parseTime(src.end_time).getTime() : null,
      duration: runDuration(src), runCount: src.run_count || 0,
      parents: [...new Set(Object.values(t.task_inputs || {}).flat().filter((r) => r && r.input_type === 'task_run').map((r) => r.id))],
      attempts: null,
    };
  }).filter((n) => n.start !== null);
  // Attempts of retried tasks: the RUNNING spans of their state history.
  const retried = nodes.filter((n) => n.kind === 'task-run' && n.runCount > 1).slice(0, MAX_RETRIED);
  await Promise.all(retried.map(async (n) => {
    const states = await api.get(`/task_run_states/?task_run_id=${encodeURIComponent(n.id)}`).catch(() => []);
    states.sort((a, b) => new Date(a.timestamp) - new Date(b.timestamp));
    const spans = [];
    states.forEach((s, i) => {
      if (s.type !== 'RUNNING') return;
      const next = states[i + 1];
      spans.push({ start: new Date(s.timestamp).getTime(), end: next ? new Date(next.timestamp).getTime() : null, name: s.name });
    });
    if (spans.length) n.attempts = spans;
  }));
  return { nodes, total };
}

export function runGraph(ctx, run) {
  const el = h('div', { class: 'run-graph' }, loading('Loading the run graph…'));
  let data = null;
  let zoom = 1;
  let now = Date.now();

  async function load() {
    try {
      data = await loadNodes(run);
      if (!ctx.alive) return;
      now = Date.now();
      build();
    } catch (err) { if (ctx.alive) replace(el, errorBox(err, load)); }
  }

  function build() {
    const { nodes, total } = data;
    if (!nodes.length) { replace(el, emptyState('Nothing to draw', 'No task run of this flow run has started yet.')); return; }
    const index = new Map(nodes.map((n, i) => [n.id, i]));
    const t0 = Math.min(...nodes.map((n) => n.start));
    const t1 = Math.max(...nodes.map((n) => n.end ?? (n.run.state_type === 'RUNNING' ? now : n.start)), t0 + 1);
    const span = (t1 - t0) * 1.08; // room after the last bar for its duration
    const labels = h('div', { class: 'graph-labels' });
    const spacer = h('div', { class: 'graph-spacer' });
    const canvas = svg('svg', { class: 'graph-canvas', role: 'img', 'aria-label': `Run graph of ${nodes.length} runs` });
    const viewport = h('div', { class: 'graph-viewport', tabindex: '0', onscroll: () => schedule() }, spacer, canvas);
    const zoomLabel = h('span', { class: 'muted small graph-zoom' });
    const setZoom = (z, anchorFrac = 0.5) => {
      const old = zoom;
      zoom = Math.min(Math.max(z, 1), 2000);
      const w = viewport.clientWidth;
      const focus = (viewport.scrollLeft + w * anchorFrac) / old;
      layout();
      viewport.scrollLeft = Math.max(0, focus * zoom - w * anchorFrac);
      draw();
    };
    viewport.addEventListener('wheel', (ev) => {
      if (!ev.ctrlKey && !ev.metaKey) return;
      ev.preventDefault();
      const frac = (ev.clientX - viewport.getBoundingClientRect().left) / viewport.clientWidth;
      setZoom(zoom * (ev.deltaY < 0 ? 1.25 : 0.8), frac);
    }, { passive: false });
    const toolbar = h('div', { class: 'toolbar graph-toolbar' },
      h('button', { type: 'button', class: 'btn btn-small', 'aria-label': 'Zoom out', onclick: () => setZoom(zoom / 2) }, '−'),
      h('button', { type: 'button', class: 'btn btn-small', 'aria-label': 'Zoom in', onclick: () => setZoom(zoom * 2) }, '+'),
      h('button', { type: 'button', class: 'btn btn-small', onclick: () => setZoom(1, 0) }, 'Fit'),
      zoomLabel,
      h('span', { class: 'muted small graph-count' }, `${nodes.length.toLocaleString()} run${nodes.length === 1 ? '' : 's'}${total > nodes.length ? ` of ${total.toLocaleString()} (the first ${MAX_NODES.toLocaleString()} drawn)` : ''} · Ctrl + wheel zooms`));
    const body = h('div', { class: 'graph-body' }, labels, viewport);
    replace(el, toolbar, body);

    let width = 0;
    const x = (ms) => ((ms - t0) / span) * width;
    function layout() {
      width = Math.max(200, (viewport.clientWidth - 16) * zoom);
      spacer.style.width = `${width + 16}px`;
      spacer.style.height = `${AXIS + nodes.length * ROW + 8}px`;
      const height = Math.min(AXIS + nodes.length * ROW + 8, 560);
      viewport.style.height = `${height}px`;
      labels.style.height = `${height}px`;
      zoomLabel.textContent = zoom === 1 ? 'whole run' : `${zoom.toFixed(zoom < 10 ? 1 : 0)}×`;
    }
    let pending = false;
    function schedule() {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => { pending = false; if (ctx.alive) draw(); });
    }
    function draw() {
      const left = viewport.scrollLeft;
      const top = viewport.scrollTop;
      const w = viewport.clientWidth;
      const hgt = viewport.clientHeight;
      canvas.setAttribute('width', w);
      canvas.setAttribute('height', hgt);
      canvas.setAttribute('viewBox', `0 0 ${w} ${hgt}`);
      canvas.style.transform = `translate(${left}px, ${top}px)`;
      const first = Math.max(0, Math.floor((top - AXIS) / ROW) - 2);
      const last = Math.min(nodes.length - 1, Math.ceil((top + hgt) / ROW) + 2);
      const parts = [];
      // time axis: clock times at a step at least MIN_TICK_PX apart, for the visible span only
      const msPerPx = span / width;
      const step = STEPS.find((s) => s / msPerPx >= MIN_TICK_PX) || STEPS[STEPS.length - 1];
      const from = t0 + left * msPerPx;
      const to = t0 + (left + w) * msPerPx;
      for (let t = Math.ceil(from / step) * step; t <= to; t += step) {
        const px = x(t) - left + 8;
        parts.push(svg('line', { x1: px, x2: px, y1: AXIS - 6, y2: hgt, class: 'grid' }));
        parts.push(svg('text', { x: px, y: 14, 'text-anchor': 'middle', class: 'axis graph-tick', 'data-ms': t }, clock(t, step)));
      }
      const rowY = (i) => AXIS + i * ROW - top;
      const barEnd = (n) => n.end ?? (n.run.state_type === 'RUNNING' ? now : n.start);
      // edges into the visible rows (their other end may be out of view: the line is clipped)
      for (let i = first; i <= last; i++) {
        const n = nodes[i];
        for (const p of n.parents) {
          const j = index.get(p);
          if (j === undefined) continue;
          const a = nodes[j];
          const x1 = x(barEnd(a)) - left + 8;
          const y1 = rowY(j) + ROW / 2;
          const x2 = x(n.start) - left + 8;
          const y2 = rowY(i) + ROW / 2;
          const mid = Math.max(x1 + 6, (x1 + x2) / 2);
          parts.push(svg('path', { d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`, class: 'graph-edge', 'data-from': a.id, 'data-to': n.id }));
        }
      }
      for (let i = first; i <= last; i++) {
        const n = nodes[i];
        const y = rowY(i) + 4;
        const color = stateColor(n.run.state_type, n.run.state_name);
        const x1 = x(n.start) - left + 8;
        const x2 = Math.max(x1 + 3, x(barEnd(n)) - left + 8);
        const tip = `${n.label}: ${n.run.state_name || stateName(n.run.state_type)}, ${fmtDuration(n.duration)}${n.runCount > 1 ? `, ${n.runCount} runs` : ''}`;
        const a = svg('a', { href: n.href, class: 'graph-node' });
        if (n.attempts) {
          // one segment per attempt; the waits between them are the thin line
          a.appendChild(svg('line', { x1, x2, y1: y + (ROW - 8) / 2, y2: y + (ROW - 8) / 2, stroke: color, class: 'graph-wait' }));
          n.attempts.forEach((s, k) => {
            const sx = x(s.start) - left + 8;
            const ex = Math.max(sx + 2, x(s.end ?? barEnd(n)) - left + 8);
            a.appendChild(svg('rect', { x: sx, y, width: ex - sx, height: ROW - 8, rx: 3, fill: color, class: 'graph-attempt', 'data-attempt': k + 1 },
              svg('title', null, `${n.label}: attempt ${k + 1} (${s.name}), ${fmtDuration(((s.end ?? barEnd(n)) - s.start) / 1000)}`)));
          });
        }
        a.appendChild(svg('rect', { x: x1, y, width: x2 - x1, height: ROW - 8, rx: 3, fill: n.attempts ? 'transparent' : color,
          class: `graph-bar graph-${n.kind}`, 'data-id': n.id, 'data-duration': fmtDuration(n.duration), 'data-row': i }, svg('title', null, tip)));
        const labelX = Math.min(x2 + 6, w - 4);
        if (x2 + 6 < w - 40) a.appendChild(svg('text', { x: labelX, y: y + ROW - 11, class: 'graph-bar-label' }, fmtDuration(n.duration)));
        parts.push(a);
      }
      replace(canvas, ...parts);
      const rows = [];
      for (let i = first; i <= last; i++) {
        const n = nodes[i];
        rows.push(h('a', { class: `graph-label graph-label-${n.kind}`, href: n.href, title: n.label, style: { top: `${rowY(i)}px` }, dataset: { row: String(i) } },
          n.kind === 'flow-run' ? '↳ ' : '', n.label));
      }
      replace(labels, h('div', { class: 'graph-axis-label muted small' }, 'Time'), rows);
    }
    layout();
    draw();
    const resize = new ResizeObserver(() => { if (ctx.alive) { layout(); schedule(); } });
    resize.observe(viewport);
    ctx.onCleanup(() => resize.disconnect());
  }

  load();
  return { el, reload: load };
}
