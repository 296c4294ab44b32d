// The two dialogs: "what is the true label?" (one click sends the correction) and "admin token".

import { adminToken, ApiError, describeError, sendFeedback } from './api.js';
import { el, fillSelect, percent } from './ui.js';

const correct = {
  dialog: document.getElementById('correct'),
  crop: document.getElementById('correct-crop'),
  predicted: document.getElementById('correct-predicted'),
  task: document.getElementById('correct-task'),
  labels: document.getElementById('correct-labels'),
  error: document.getElementById('correct-error'),
  current: null,
};

correct.dialog.addEventListener('close', () => {
  const current = correct.current;
  correct.current = null;
  if (current && current.onClose) current.onClose();
});
correct.task.addEventListener('change', () => renderChoices());

function renderChoices() {
  const { answer } = correct.current;
  const task = correct.task.value;
  const prediction = answer.tasks ? answer.tasks[task] : answer;
  correct.dialog.dataset.predictionId = prediction.prediction_id;
  correct.predicted.textContent = `The model read ${prediction.label} (${percent(prediction.confidence)}).`;
  correct.labels.replaceChildren(...Object.keys(prediction.probabilities).map((label) => el('button', {
    type: 'button', class: `label-choice${label === prediction.label ? ' predicted' : ''}`, dataset: { label },
    onclick: () => choose(prediction, label),
  }, label, label === prediction.label ? el('span', { class: 'visually-hidden', text: ' (the model\'s answer)' }) : null)));
}

async function choose(prediction, label) {
  const { onDone } = correct.current;
  const buttons = [...correct.labels.querySelectorAll('button')];
  buttons.forEach((b) => { b.disabled = true; });
  correct.error.textContent = '';
  try {
    const ack = await withToken((token) => sendFeedback(prediction.prediction_id, label, { token }), 'send corrections');
    correct.dialog.close('sent');
    if (onDone) onDone(ack, label, prediction);
  } catch (err) {
    correct.error.textContent = err instanceof ApiError && err.code === 'unknown_prediction_id'
      ? 'This prediction is no longer kept; take a new picture and correct that one.'
      : `Not sent: ${describeError(err)}`;
    buttons.forEach((b) => { b.disabled = false; });
  }
}

/**
 * Ask for the true label of ``answer`` (a face, a whole image or a frame: an Answer with ``tasks``)
 * and send it to POST /feedback with that prediction's id. ``crop`` is an image URL to show, or null.
 */
export function openCorrection({ answer, crop, defaultTask, onDone, onClose }) {
  if (correct.dialog.open) correct.dialog.close('replaced');
  correct.current = { answer, onDone, onClose };
  const tasks = answer.tasks ? Object.keys(answer.tasks) : [answer.task];
  fillSelect(correct.task, tasks, tasks.includes(defaultTask) ? defaultTask : tasks[0]);
  correct.crop.hidden = !crop;
  if (crop) {
    correct.crop.src = crop;
    correct.crop.alt = 'The face being corrected';
  }
  correct.error.textContent = '';
  renderChoices();
  correct.dialog.showModal();
  const first = correct.labels.querySelector('button:not(.predicted)') || correct.labels.querySelector('button');
  if (first) first.focus();
}

const token = {
  dialog: document.getElementById('token-dialog'),
  title: document.getElementById('token-title'),
  text: document.getElementById('token-text'),
  label: document.getElementById('token-label'),
  input: document.getElementById('token-input'),
  remember: document.getElementById('token-remember'),
  confirm: document.getElementById('token-confirm'),
};

token.input.addEventListener('keydown', (event) => {
  if (event.key === 'Enter') {
    event.preventDefault();
    if (token.input.value) token.dialog.close('ok');
  }
});

/**
 * ``call(token)`` with the remembered token; when the service answers 401 (it wants a token for this:
 * INFANTINO_FEEDBACK_TOKEN or INFANTINO_PREDICT_TOKEN is set), ask for one and try once more.
 */
export async function withToken(call, what) {
  try {
    return await call(adminToken.get());
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 401) throw err;
    const given = await askToken({
      title: 'Token needed',
      text: `This service asks for a token to ${what}: its feedback or predict token, or the admin token.`,
      label: 'Token (INFANTINO_FEEDBACK_TOKEN, INFANTINO_PREDICT_TOKEN or INFANTINO_ADMIN_TOKEN)',
    });
    if (!given) throw err;
    return call(given);
  }
}

/** Ask for the admin token (prefilled when remembered); resolves to the token, or null if cancelled. */
export function askToken({ title = 'Admin token', text = '', action = 'Continue', label = 'Admin token (INFANTINO_ADMIN_TOKEN)' } = {}) {
  return new Promise((resolve) => {
    token.title.textContent = title;
    token.label.textContent = label;
    token.text.textContent = text;
    token.confirm.textContent = action;
    token.input.value = adminToken.get();
    token.dialog.returnValue = '';
    token.dialog.addEventListener('close', () => {
      const value = token.input.value;
      token.input.value = '';
      if (token.dialog.returnValue !== 'ok' || !value) return resolve(null);
      if (token.remember.checked) adminToken.set(value);
      else adminToken.clear();
      return resolve(value);
    }, { once: true });
    token.dialog.showModal();
    token.input.focus();
    if (token.input.value) token.input.select();
  });
}
