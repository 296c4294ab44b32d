// The review queue (active learning): recent predictions the model was least sure of, not yet
// labelled, with their crops; one click on the true label sends it to POST /feedback.

import { adminToken, ApiError, describeError, getJSON, sendFeedback } from './api.js';
import { askToken } from './dialogs.js';
import { el, fillSelect, percent, setMessage, timeAgo } from './ui.js';

const $ = (id) => document.getElementById(id);
const view = {
  task: $('review-task'), order: $('review-order'), refresh: $('review-refresh'), unlock: $('review-unlock'),
  note: $('review-note'), message: $('review-message'), list: $('review-list'),
};
let ctx = null; // { status(), onFeedback(ack, label, prediction) }

export function initReview(context) {
  ctx = context;
  view.refresh.addEventListener('click', () => loadReview());
  view.order.addEventListener('change', () => loadReview());
  view.task.addEventListener('change', () => loadReview());
  view.unlock.addEventListener('click', async () => {
    const token = await askToken({
      title: 'Unlock the review queue',
      text: 'The review queue shows recent photos of the people this service has seen, so it needs the admin token.',
      action: 'Unlock',
    });
    if (token) loadReview(token);
  });
}

export function reviewStatusChanged(status) {
  fillSelect(view.task, Object.keys(status.tasks), view.task.value || status.default_task);
  view.note.hidden = status.store_images;
  view.note.textContent = status.store_images ? '' : 'Image storage is off (INFANTINO_STORE_FEEDBACK_IMAGES=false): '
    + 'predictions are kept without their pictures, so this list cannot show what the model saw. Correct faces from the live view instead.';
}

export async function loadReview(token = adminToken.get()) {
  const status = ctx.status();
  if (status && !status.admin) {
    view.unlock.hidden = true;
    view.list.replaceChildren();
    setMessage(view.message, 'The review queue shows other people\'s photos, so it needs the admin token, and this service has none: '
      + 'set INFANTINO_ADMIN_TOKEN to use it.', true);
    return;
  }
  if (!token) {
    view.unlock.hidden = false;
    view.list.replaceChildren();
    setMessage(view.message, 'Locked: the review queue needs the admin token.');
    return;
  }
  setMessage(view.message, 'Loading…');
  const params = new URLSearchParams({ order: view.order.value, limit: '24' });
  if (view.task.value) params.set('task', view.task.value);
  try {
    const data = await getJSON(`/ui/review?${params}`, { token });
    view.unlock.hidden = true;
    render(data);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      adminToken.clear();
      view.unlock.hidden = false;
      view.list.replaceChildren();
      setMessage(view.message, 'That admin token was not accepted.', true);
      return;
    }
    setMessage(view.message, `The review queue did not load: ${describeError(err)}`, true);
  }
}

function render(data) {
  const hours = Math.round(data.within_s / 3600);
  setMessage(view.message, data.items.length
    ? `${data.items.length} prediction${data.items.length > 1 ? 's' : ''} to review, least sure first (last ${hours} h).`
    : 'Nothing to review: every recent prediction is labelled, or there are none yet.');
  view.list.replaceChildren(...data.items.map((item) => {
    const li = el('li', { class: 'review-item', dataset: { predictionId: item.prediction_id } });
    const alt = `What the model read as ${item.label} (${percent(item.confidence)}), ${timeAgo(item.created)}`;
    const picture = item.image ? el('img', { src: item.image, alt }) : el('div', { class: 'no-image', text: 'no picture kept' });
    const choices = el('div', { class: 'label-choices', role: 'group', 'aria-label': `True label for the ${item.label} prediction from ${timeAgo(item.created)}` },
      ...data.labels.map((label) => el('button', {
        type: 'button', class: `label-choice${label === item.label ? ' predicted' : ''}`, dataset: { label }, text: label,
        onclick: () => label_(li, item, label),
      })));
    li.append(picture, el('div', {},
      el('p', {}, el('strong', { text: `${item.label} ${percent(item.confidence)}` })),
      el('p', { text: `margin ${item.margin.toFixed(2)} · head v${item.head_version}` }),
      el('p', { text: timeAgo(item.created) })), choices);
    return li;
  }));
}

async function label_(li, item, label) {
  const buttons = [...li.querySelectorAll('button')];
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const ack = await sendFeedback(item.prediction_id, label);
    const next = li.nextElementSibling || li.previousElementSibling;
    li.remove();
    if (next) next.querySelector('button').focus();
    ctx.onFeedback(ack, label, item);
    if (!view.list.children.length) loadReview();
  } catch (err) {
    buttons.forEach((b) => { b.disabled = false; });
    setMessage(view.message, `Not sent: ${describeError(err)}`, true);
  }
}
