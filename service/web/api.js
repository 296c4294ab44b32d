// Talking to the service: JSON in and out, errors as readable messages, the token (admin, or the one
// feedback or predictions need when the service sets INFANTINO_FEEDBACK_TOKEN / INFANTINO_PREDICT_TOKEN).

const TOKEN_KEY = 'infantino.adminToken';

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `the service answered HTTP ${status}`);
    this.status = status;
    this.code = body && body.error;
    this.body = body;
  }
}

async function answer(response) {
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = { message: text.slice(0, 200) };
  }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function headers(token, extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

export async function getJSON(path, { token } = {}) {
  return answer(await fetch(path, { headers: headers(token), cache: 'no-store' }));
}

export async function postJSON(path, data, { token } = {}) {
  return answer(await fetch(path, {
    method: 'POST', headers: headers(token, { 'Content-Type': 'application/json' }), body: JSON.stringify(data),
  }));
}

export async function postForm(path, form, { token = adminToken.get() } = {}) {
  return answer(await fetch(path, { method: 'POST', headers: headers(token), body: form }));
}

/** A fresh idempotency key (crypto.randomUUID needs a secure context; getRandomValues does not). */
export function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, '0')).join('');
}

/** POST /feedback for a prediction; a network failure is retried once with the same key (no duplicate). */
export async function sendFeedback(predictionId, label, { token = adminToken.get() } = {}) {
  const body = { label, prediction_id: predictionId, idempotency_key: newKey() };
  try {
    return await postJSON('/feedback', body, { token });
  } catch (err) {
    if (err instanceof ApiError) throw err;
    return postJSON('/feedback', body, { token });
  }
}

export const adminToken = {
  get: () => sessionStorage.getItem(TOKEN_KEY) || '',
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

export function describeError(err) {
  if (err instanceof ApiError) return err.message;
  return `cannot reach the service (${err.message || err})`;
}
