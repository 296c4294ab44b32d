// Model history: every head version of a task (origin, verdict, why), accuracy over versions as an
// inline SVG chart, and the admin actions "update now" and "roll back".

import { ApiError, describeError, getJSON, postJSON } from './api.js';
import { askToken } from './dialogs.js';
import { clock, el, fillSelect, percent, setMessage, svg } from './ui.js';

const $ = (id) => document.getElementById(id);
const view = {
  task: $('history-task'), update: $('update-now'), rollback: $('rollback'), message: $('history-message'),
  chart: $('chart'), rows: $('history-rows'),
};
const VERDICTS = {
  champion: 'serving (champion)', promoted: 'promoted earlier', refused: 'refused by the gate',
  rolled_back: 'promoted, then rolled back', registered: 'registered, not promoted',
};
const ORIGINS = { train: 'trained', online_update: 'online update', feedback_adaptation: 'backbone adaptation' };
let ctx = null; // { status(), announce(text) }
let current = null;

export function initHistory(context) {
  ctx = context;
  view.task.addEventListener('change', () => loadHistory());
  view.update.addEventListener('click', updateNow);
  view.rollback.addEventListener('click', rollback);
}

export function historyStatusChanged(status) {
  fillSelect(view.task, Object.keys(status.tasks), view.task.value || status.default_task);
  view.update.disabled = !status.admin;
  view.update.title = status.admin ? '' : 'needs INFANTINO_ADMIN_TOKEN on the service';
}

const task = () => view.task.value || (ctx.status() || {}).default_task;

export async function loadHistory() {
  try {
    const params = new URLSearchParams();
    if (task()) params.set('task', task());
    const query = params.toString();
    current = await getJSON(`/ui/history${query ? `?${query}` : ''}`);
    render(current);
  } catch (err) {
    setMessage(view.message, `The history did not load: ${describeError(err)}`, true);
  }
}

function render(data) {
  const status = ctx.status();
  const admin = status ? status.admin : true;
  view.rollback.disabled = !data.rollback_to || !admin;
  view.rollback.textContent = data.rollback_to ? `Roll back to v${data.rollback_to}` : 'Roll back (no earlier champion)';
  setMessage(view.message, `${data.versions.length} head version${data.versions.length === 1 ? '' : 's'} of ${data.task}; `
    + `champion v${data.champion ?? '–'}.`);
  drawChart(data.versions);
  view.rows.replaceChildren(...[...data.versions].reverse().map((v) => el('tr', { class: v.verdict === 'champion' ? 'is-champion' : '', dataset: { version: v.version } },
    el('th', { scope: 'row', text: `v${v.version}` }),
    el('td', { text: v.created ? clock(v.created) : '–' }),
    el('td', { text: (ORIGINS[v.origin] || v.origin || '–') + (v.parent_version ? ` of v${v.parent_version}` : '') }),
    el('td', {}, el('span', { class: `verdict ${v.verdict}`, text: VERDICTS[v.verdict] || v.verdict })),
    el('td', { text: v.val_accuracy != null ? percent(v.val_accuracy) : '–' }),
    el('td', { text: v.heldout_accuracy != null ? heldout(v) : '–' }),
    el('td', { text: v.gate_reason || v.gate || (v.origin === 'train' ? 'offline training' : '') }))));
}

function heldout(v) {
  const reference = v.heldout_reference_accuracy != null ? `${v.heldout_reference} ${percent(v.heldout_reference_accuracy)}, ` : '';
  const items = v.heldout_items != null ? `${v.heldout_items} item${v.heldout_items === 1 ? '' : 's'}` : '';
  return `${percent(v.heldout_accuracy)}${reference || items ? ` (${reference}${items})` : ''}`;
}

/** Accuracy per version: validation (solid) and held-out feedback (dashed); filled = promoted, hollow = refused. */
function drawChart(versions) {
  const W = 640, H = 260, left = 48, right = 24, top = 16, bottom = 48;
  const values = versions.flatMap((v) => [v.val_accuracy, v.heldout_accuracy]).filter((x) => x != null);
  const lo = values.length ? Math.max(0, Math.floor((Math.min(...values) - 0.05) * 10) / 10) : 0;
  const hi = 1;
  const x = (i) => left + (versions.length > 1 ? (i * (W - left - right)) / (versions.length - 1) : (W - left - right) / 2);
  const y = (v) => top + ((hi - v) * (H - top - bottom)) / (hi - lo || 1);
  const nodes = [svg('title', { id: 'chart-title', text: `Accuracy per head version of ${versions.length ? 'this task' : 'no versions yet'}` })];
  const step = hi - lo <= 0.3 ? 0.05 : 0.1;
  for (let k = 0; lo + k * step <= hi + 1e-9; k += 1) {
    const t = lo + k * step;
    nodes.push(svg('line', { x1: left, x2: W - right, y1: y(t), y2: y(t), stroke: '#d5d8e0', 'stroke-width': 1 }));
    nodes.push(svg('text', { x: left - 6, y: y(t) + 4, 'text-anchor': 'end', 'font-size': 11, fill: '#4a4a55', text: `${Math.round(t * 100)}%` }));
  }
  versions.forEach((v, i) => {
    const when = v.created ? new Date(v.created * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }) : '';
    nodes.push(svg('text', { x: x(i), y: H - bottom + 14, 'text-anchor': 'middle', 'font-size': 11, fill: '#1b1b1f', text: `v${v.version}` }));
    nodes.push(svg('text', { x: x(i), y: H - bottom + 26, 'text-anchor': 'middle', 'font-size': 9, fill: '#4a4a55', text: when }));
  });
  const series = [
    { key: 'val_accuracy', name: 'validation', color: '#0b57d0', dash: null },
    { key: 'heldout_accuracy', name: 'held-out feedback', color: '#b3261e', dash: '6 4' },
  ];
  for (const s of series) {
    const points = versions.map((v, i) => [i, v[s.key], v]).filter(([, value]) => value != null);
    if (points.length > 1) {
      nodes.push(svg('polyline', { points: points.map(([i, value]) => `${x(i)},${y(value)}`).join(' '), fill: 'none',
        stroke: s.color, 'stroke-width': 2, 'stroke-dasharray': s.dash }));
    }
    for (const [i, value, v] of points) {
      const refused = v.verdict === 'refused' || v.verdict === 'registered';
      nodes.push(svg('circle', { cx: x(i), cy: y(value), r: 5, stroke: s.color, 'stroke-width': 2, fill: refused ? '#ffffff' : s.color,
        class: 'point', 'data-series': s.key, 'data-version': v.version },
      svg('title', { text: `v${v.version} ${s.name}: ${percent(value)} (${VERDICTS[v.verdict] || v.verdict})` })));
    }
  }
  series.forEach((s, k) => {
    const lx = left + 8 + k * 170;
    nodes.push(svg('line', { x1: lx, x2: lx + 24, y1: H - 8, y2: H - 8, stroke: s.color, 'stroke-width': 2, 'stroke-dasharray': s.dash }));
    nodes.push(svg('text', { x: lx + 30, y: H - 4, 'font-size': 11, fill: '#1b1b1f', text: s.name }));
  });
  view.chart.replaceChildren(...nodes);
}

async function updateNow() {
  const which = task();
  const token = await askToken({
    title: `Update the ${which} head now`,
    text: 'Learns from the queued corrections now; the evaluation gate decides whether the result is promoted.',
    action: 'Update now',
  });
  if (!token) return;
  setMessage(view.message, 'Updating… (this can take a while)');
  view.update.disabled = true;
  try {
    const report = await postJSON('/admin/update', { force: true, task: which }, { token });
    ctx.announce(report.promoted
      ? `Update: ${which} head v${report.head_version} passed the gate and is promoted.`
      : `Update: ${which} head v${report.head_version} was refused by the gate: ${report.verdict}`);
  } catch (err) {
    const text = err instanceof ApiError && err.code === 'update_not_run'
      ? 'No update ran: no corrections are queued (or another worker is updating).' : `Update failed: ${describeError(err)}`;
    setMessage(view.message, text, true);
    return;
  } finally {
    view.update.disabled = false;
  }
  loadHistory();
}

async function rollback() {
  const which = task();
  if (!current || !current.rollback_to) return;
  const token = await askToken({
    title: `Roll back the ${which} head to v${current.rollback_to}?`,
    text: `v${current.champion} stops being served; v${current.rollback_to}, the previous champion, is served again.`,
    action: `Roll back to v${current.rollback_to}`,
  });
  if (!token) return;
  try {
    const answer = await postJSON('/admin/rollback', { task: which }, { token });
    ctx.announce(`Rolled back: ${which} head v${answer.head_version} is champion again (was v${answer.rolled_back_version}).`);
  } catch (err) {
    setMessage(view.message, `Rollback failed: ${describeError(err)}`, true);
    return;
  }
  loadHistory();
}
