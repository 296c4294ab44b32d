// Small DOM helpers shared by the views.

/** el('p', {class: 'x', text: 'hello'}, child, ...): an element with attributes, text and children. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'text') node.textContent = value;
    else if (key === 'class') node.className = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : value);
  }
  node.append(...children.filter((c) => c !== undefined && c !== null));
  return node;
}

const SVG_NS = 'http://www.w3.org/2000/svg';
export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === 'text') node.textContent = value;
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

export const percent = (p) => `${Math.round(p * 100)}%`;

/** Probability bars, one row per label, the top one marked; readable as text too. */
export function bars(probabilities, label) {
  const list = el('ul', { class: 'bars' });
  for (const [name, p] of Object.entries(probabilities)) {
    const fill = el('span', { class: 'fill' });
    fill.style.width = percent(p);
    list.append(el('li', { class: name === label ? 'top' : '' },
      el('span', { class: 'name', text: name }),
      el('span', { class: 'bar', 'aria-hidden': 'true' }, fill),
      el('span', { class: 'value', text: percent(p) })));
  }
  return list;
}

export function timeAgo(epochSeconds) {
  const s = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

export function clock(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleString([], { dateStyle: 'short', timeStyle: 'medium' });
}

export function setMessage(node, text, isError = false) {
  node.textContent = text || '';
  node.classList.toggle('error', Boolean(isError));
}

/** Fill a <select> with options; show its .task-field label only when there is a choice. */
export function fillSelect(select, values, current) {
  const keep = current ?? select.value;
  select.replaceChildren(...values.map((v) => el('option', { value: v, text: v })));
  if (values.includes(keep)) select.value = keep;
  const field = select.closest('.task-field');
  if (field) field.hidden = values.length < 2;
}
