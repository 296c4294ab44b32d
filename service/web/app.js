// The page: tabs, the served models and queue in the header (kept current by server-sent events,
// or polling where those fail), announcements, and the three views.

import { adminToken, getJSON } from './api.js';
import { historyStatusChanged, initHistory, loadHistory } from './history.js';
import { initLive } from './live.js';
import { initReview, loadReview, reviewStatusChanged } from './review.js';
import { el } from './ui.js';

const served = document.getElementById('served');
const announcer = document.getElementById('announce');
let status = null;

/** Add a line to the announcements (a polite live region; the last three are kept, newest first). */
function announce(text) {
  announcer.prepend(el('p', { text }));
  while (announcer.children.length > 3) announcer.lastElementChild.remove();
}

// ---- tabs (WAI-ARIA tabs: arrow keys move between them; the URL's #fragment names the view) ----------
const tabs = [...document.querySelectorAll('[role="tab"]')];
const loaders = { 'view-review': () => loadReview(), 'view-history': () => loadHistory() };

function select(tab, { focus = false, push = true } = {}) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute('aria-selected', String(on));
    t.tabIndex = on ? 0 : -1;
    document.getElementById(t.getAttribute('aria-controls')).hidden = !on;
  }
  if (focus) tab.focus();
  const panel = tab.getAttribute('aria-controls');
  if (push) history.replaceState(null, '', `#${panel.replace('view-', '')}`);
  if (loaders[panel]) loaders[panel]();
}

tabs.forEach((tab, i) => {
  tab.addEventListener('click', () => select(tab));
  tab.addEventListener('keydown', (event) => {
    const moves = { ArrowRight: 1, ArrowLeft: -1, Home: -i, End: tabs.length - 1 - i };
    if (!(event.key in moves)) return;
    event.preventDefault();
    select(tabs[(i + moves[event.key] + tabs.length) % tabs.length], { focus: true });
  });
});

const visible = () => tabs.find((t) => t.getAttribute('aria-selected') === 'true').getAttribute('aria-controls');

// ---- status: served versions and queue, and the announcement of a new champion -----------------------
function onStatus(next) {
  if (next.error) return;
  const before = status;
  status = next;
  const changed = [];
  served.replaceChildren(...Object.entries(next.tasks).map(([task, t]) => {
    const old = before && before.tasks[task];
    const fresh = old && old.head_version && old.head_version !== t.head_version;
    if (fresh) changed.push(`${task}: head v${t.head_version} is now served (was v${old.head_version})`);
    return el('li', { dataset: { task } },
      el('span', { class: 'task', text: `${task}: ` }),
      el('span', { id: `head-${task}`, class: fresh ? 'fresh' : '', text: `head v${t.head_version ?? '…'}` }), ' · ',
      el('span', { id: `backbone-${task}`, text: `backbone v${t.backbone_version ?? '…'}` }), ' · ',
      el('span', { text: 'queue ' }), el('span', { id: `queue-${task}`, class: 'queue', text: String(t.queue.queued) }));
  }));
  if (changed.length) {
    announce(`New model: ${changed.join('; ')}.`);
    if (visible() === 'view-history') loadHistory();
  }
  reviewStatusChanged(next);
  historyStatusChanged(next);
  if (!before && visible() === 'view-review') loadReview(); // it may have been drawn before the status was known
}

function follow() {
  const poll = async () => {
    try {
      onStatus(await getJSON('/ui/status'));
    } catch {
      served.replaceChildren(el('li', { text: 'The service is not answering; retrying…' }));
    }
  };
  poll();
  if (!window.EventSource) {
    setInterval(poll, 3000);
    return;
  }
  const events = new EventSource('/ui/events');
  events.addEventListener('status', (event) => onStatus(JSON.parse(event.data)));
  let polling = null;
  events.addEventListener('error', () => {
    // EventSource reconnects by itself; if it gave up (CLOSED), poll instead.
    if (events.readyState === EventSource.CLOSED && !polling) polling = setInterval(poll, 3000);
  });
}

const context = {
  status: () => status,
  defaultTask: () => (status ? status.default_task : undefined),
  announce,
  onFeedback: (ack, label) => {
    announce(`Thank you: "${label}" is queued for the ${ack.task} model (${ack.queue_depth} waiting for the next update).`);
    const queue = document.getElementById(`queue-${ack.task}`);
    if (queue) queue.textContent = String(ack.queue_depth);
  },
};

initLive(context);
initReview(context);
initHistory(context);
document.getElementById('forget-token').addEventListener('click', () => {
  adminToken.clear();
  announce('The admin token is forgotten.');
  if (visible() === 'view-review') loadReview();
});
follow();
const fromHash = () => tabs.find((t) => t.getAttribute('aria-controls') === `view-${location.hash.slice(1)}`);
window.addEventListener('hashchange', () => {
  const tab = fromHash();
  if (tab && visible() !== tab.getAttribute('aria-controls')) select(tab, { push: false });
});
select(fromHash() || tabs[0], { push: false });
