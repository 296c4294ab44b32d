// The live view: camera frames -> POST /predict (faces=true) a few times a second, boxes drawn over
// the video; or one uploaded photo (POST /predict) or clip (POST /predict_sequence).

import { describeError, postForm } from './api.js';
import { openCorrection, withToken } from './dialogs.js';
import { bars, el, percent, setMessage } from './ui.js';

const MAX_SIDE = 640; // frames are sent at most this many pixels a side

const $ = (id) => document.getElementById(id);
const view = {
  toggle: $('camera-toggle'), rate: $('rate'), upload: $('upload'), message: $('live-message'),
  stage: $('stage'), video: $('video'), photo: $('photo'), boxes: $('boxes'), faces: $('faces'),
  clip: $('clip'), clipVideo: $('clip-video'), clipSummary: $('clip-summary'), clipFrames: $('clip-frames'),
};

let ctx = null;        // { defaultTask(), onFeedback(ack, label, prediction) }
let stream = null;     // the camera's MediaStream while on
let paused = false;    // while a correction is being given, the frame it is about stays put
let photoUrl = null;
let clipUrl = null;

export function initLive(context) {
  ctx = context;
  view.toggle.addEventListener('click', () => (stream ? stopCamera() : startCamera()));
  view.upload.addEventListener('change', () => {
    const file = view.upload.files[0];
    if (file) handleUpload(file);
  });
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden && stream) view.video.play().catch(() => {});
  });
}

// ---- camera ------------------------------------------------------------------------------------
async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    setMessage(view.message, 'This browser offers no camera here (a camera needs https or localhost). Upload a photo or clip instead.', true);
    return;
  }
  setMessage(view.message, 'Asking for the camera…');
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
  } catch (err) {
    stream = null;
    setMessage(view.message, `No camera: ${err.message || err.name}. Upload a photo or clip instead.`, true);
    return;
  }
  showStage('video');
  view.video.srcObject = stream;
  await view.video.play().catch(() => {});
  view.toggle.textContent = 'Stop camera';
  view.toggle.setAttribute('aria-pressed', 'true');
  setMessage(view.message, 'Camera on: looking for faces.');
  loop(stream);
}

function stopCamera() {
  if (stream) stream.getTracks().forEach((t) => t.stop());
  stream = null;
  view.video.srcObject = null;
  view.toggle.textContent = 'Start camera';
  view.toggle.setAttribute('aria-pressed', 'false');
  setMessage(view.message, 'Camera off.');
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

const liveView = document.getElementById('view-live');

/** One request in flight at a time, at most ``rate`` per second; nothing is sent while the live view
 * (or the browser tab) is hidden, or while a correction is being given. */
async function loop(mine) {
  while (stream === mine) {
    const started = performance.now();
    if (!paused && !document.hidden && !liveView.hidden && view.video.readyState >= 2 && view.video.videoWidth) {
      const frame = grab(view.video, view.video.videoWidth, view.video.videoHeight);
      try {
        const blob = await new Promise((resolve) => { frame.canvas.toBlob(resolve, 'image/jpeg', 0.85); });
        const form = new FormData();
        form.append('image', blob, 'frame.jpg');
        form.append('faces', 'true');
        form.append('whole_image_if_no_face', 'false');
        const answer = await withToken((token) => postForm('/predict', form, { token }), 'read photos');
        if (stream === mine && !paused) show(answer, frame, 'live');
      } catch (err) {
        if (stream === mine && err.status === 401) {
          stopCamera(); // no token given: do not ask again at every frame
          setMessage(view.message, `Camera stopped: ${describeError(err)}`, true);
        } else if (stream === mine) setMessage(view.message, `Frame not read: ${describeError(err)}`, true);
      }
    }
    const period = 1000 / Number(view.rate.value || 3);
    await sleep(Math.max(50, period - (performance.now() - started)));
  }
}

/** The source drawn on a canvas at most MAX_SIDE a side: what is sent, and what crops are cut from. */
function grab(source, width, height) {
  const scale = Math.min(1, MAX_SIDE / Math.max(width, height));
  const canvas = document.createElement('canvas');
  canvas.width = Math.round(width * scale);
  canvas.height = Math.round(height * scale);
  canvas.getContext('2d').drawImage(source, 0, 0, canvas.width, canvas.height);
  // boxScale: answer pixels -> canvas pixels (1 for a frame sent as drawn; ``scale`` for a file sent as it is).
  return { canvas, width: canvas.width, height: canvas.height, scale, boxScale: 1 };
}

function crop(frame, box) {
  if (!frame || !box) return null;
  const [x, y, w, h] = box.map((v) => v * frame.boxScale);
  const canvas = document.createElement('canvas');
  canvas.width = 128;
  canvas.height = 128;
  canvas.getContext('2d').drawImage(frame.canvas, x, y, w, h, 0, 0, 128, 128);
  return canvas.toDataURL('image/jpeg', 0.9);
}

// ---- what came back -------------------------------------------------------------------------------
/** Draw a FacesAnswer: one box per face over the stage, and one card per face in the list. */
function show(answer, frame, source) {
  const faces = answer.faces || [];
  const items = faces.map((face, i) => ({ answer: face, name: `Face ${i + 1}`, box: face.box }));
  if (!faces.length && answer.whole_image) items.push({ answer: answer.whole_image, name: 'Whole image', box: null });
  setMessage(view.message, faces.length ? `${faces.length} face${faces.length > 1 ? 's' : ''} found (${source}).` : `${answer.message || 'No face found'}.`);
  drawBoxes(items.filter((item) => item.box), frame);
  listFaces(items, frame);
}

function drawBoxes(items, frame) {
  // Boxes are reused between frames so keyboard focus stays on the face a person is on.
  while (view.boxes.children.length > items.length) view.boxes.lastElementChild.remove();
  items.forEach((item, i) => {
    let button = view.boxes.children[i];
    if (!button) {
      button = el('button', { type: 'button', class: 'face-box' });
      button.addEventListener('click', () => correctItem(button.item, button.frame));
      view.boxes.append(button);
    }
    button.item = item;
    button.frame = frame;
    const [x, y, w, h] = item.box;
    const sx = (frame.boxScale / frame.width) * 100;
    const sy = (frame.boxScale / frame.height) * 100;
    Object.assign(button.style, { left: `${x * sx}%`, top: `${y * sy}%`, width: `${w * sx}%`, height: `${h * sy}%` });
    const { label, confidence, probabilities, prediction_id: id } = item.answer;
    button.dataset.predictionId = id;
    button.dataset.label = label;
    button.setAttribute('aria-label', `${item.name}: ${label}, ${percent(confidence)}. Give the true label.`);
    const mini = el('span', { class: 'mini', 'aria-hidden': 'true' });
    for (const [name, p] of Object.entries(probabilities)) {
      const fill = el('span', { class: 'fill' });
      fill.style.width = percent(p);
      mini.append(el('span', { class: 'row' }, el('span', { text: name }), el('span', { class: 'bar' }, fill)));
    }
    button.replaceChildren(el('span', { class: 'tag', 'aria-hidden': 'true', text: `${label} ${percent(confidence)}` }), mini);
  });
}

function listFaces(items, frame) {
  const focused = document.activeElement && view.faces.contains(document.activeElement) ? document.activeElement.dataset.index : null;
  view.faces.replaceChildren(...items.map((item, i) => {
    const { label, confidence, probabilities } = item.answer;
    const fix = el('button', { type: 'button', class: 'correct', dataset: { index: String(i) }, text: 'Correct…',
      'aria-label': `Correct ${item.name} (${label})`, onclick: () => correctItem(item, frame) });
    return el('li', { class: 'face-card' },
      el('header', {}, el('strong', { text: `${item.name}: ${label} ${percent(confidence)}` }), fix),
      bars(probabilities, label));
  }));
  if (focused !== null) {
    const again = view.faces.querySelector(`button[data-index="${focused}"]`);
    if (again) again.focus();
  }
}

function correctItem(item, frame) {
  paused = true;
  const opener = document.activeElement;
  openCorrection({
    answer: item.answer,
    crop: crop(frame, item.box),
    defaultTask: ctx.defaultTask(),
    onDone: (ack, label, prediction) => ctx.onFeedback(ack, label, prediction),
    onClose: () => {
      paused = false;
      if (opener && opener.isConnected) opener.focus();
    },
  });
}

// ---- uploads ---------------------------------------------------------------------------------------
function showStage(what) {
  view.stage.hidden = what === 'none';
  view.video.hidden = what !== 'video';
  view.photo.hidden = what !== 'photo';
  view.boxes.replaceChildren();
  view.faces.replaceChildren();
  view.clip.hidden = true;
}

async function handleUpload(file) {
  if (stream) stopCamera();
  if (file.type.startsWith('video/')) return handleClip(file);
  if (photoUrl) URL.revokeObjectURL(photoUrl);
  photoUrl = URL.createObjectURL(file);
  showStage('photo');
  view.photo.src = photoUrl;
  setMessage(view.message, 'Reading the photo…');
  try {
    await view.photo.decode();
    const form = new FormData();
    form.append('image', file, file.name);
    form.append('faces', 'true');
    const answer = await withToken((token) => postForm('/predict', form, { token }), 'read photos');
    // Boxes are in the photo's own pixels (the service turns it upright, as the browser shows it).
    const frame = grab(view.photo, view.photo.naturalWidth, view.photo.naturalHeight);
    frame.boxScale = frame.scale;
    show(answer, frame, 'photo');
  } catch (err) {
    setMessage(view.message, `The photo was not read: ${describeError(err)}`, true);
  }
}

async function handleClip(file) {
  showStage('none');
  if (clipUrl) URL.revokeObjectURL(clipUrl);
  clipUrl = URL.createObjectURL(file);
  view.clipVideo.src = clipUrl;
  view.clip.hidden = false;
  view.clipSummary.replaceChildren();
  view.clipFrames.replaceChildren();
  setMessage(view.message, 'Reading the clip…');
  try {
    const form = new FormData();
    form.append('video', file, file.name);
    form.append('faces', 'true');
    const answer = await withToken((token) => postForm('/predict_sequence', form, { token }), 'read clips');
    const { aggregate } = answer;
    setMessage(view.message, `${answer.frame_count} frames read.`);
    view.clipSummary.replaceChildren(
      el('p', { text: `Across the clip: ${aggregate.mean_label} on average; most recently (moving average) ${aggregate.ema_label}.` }),
      bars(aggregate.mean, aggregate.mean_label));
    view.clipFrames.replaceChildren(...answer.frames.map((frame, i) => el('tr', {},
      el('td', { text: frame.time_s != null ? `${frame.time_s.toFixed(2)} s` : `#${i + 1}` }),
      el('td', { text: frame.label }),
      el('td', { text: percent(frame.confidence) }),
      el('td', {}, el('button', { type: 'button', text: 'Correct…', 'aria-label': `Correct frame ${i + 1} (${frame.label})`,
        onclick: () => correctItem({ answer: frame, name: `Frame ${i + 1}`, box: null }, null) })))));
  } catch (err) {
    setMessage(view.message, `The clip was not read: ${describeError(err)}`, true);
  }
}
