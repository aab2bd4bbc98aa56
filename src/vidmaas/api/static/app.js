// The vidmaas web page: sign in with an API key, submit, and watch your tasks live.
//
// How it stays live: one WebSocket to /v1/events (live.js) carries every card: a
// snapshot per unfinished task, then its events, and each new task as it is created
// (from this tab, another one or the CLI). When the socket drops it reconnects with
// backoff and resumes every card from the last event id it saw, so no card misses or
// repeats an event; while it cannot, the unfinished cards are polled (GET
// /v1/tasks/{id} every 2 s), and a browser without WebSocket support only polls.
// Progress never goes backwards and a terminal state is final. A reload starts from
// GET /v1/tasks (the database is the source of truth).
// While a task denoises, each "preview" event makes its card fetch the latest preview
// image (GET /v1/tasks/{id}/preview with the API key, shown from a blob: URL); the
// newest step wins, and the preview goes once the video is there or the task ends.
// A finished video's card shows its thumbnail (thumbs.js: the poster, scrubbed through
// the spritesheet under the pointer; a click plays the video from that moment), and
// every finished card can be remixed: run again with a new prompt (remix.js).
// Model names and descriptions follow the page's language (the registry's display
// texts, English where a language is missing).
// An admin also gets the admin page (admin.js, loaded only for admins).

import { $, fmtDuration, h, parseTime } from "./dom.js";
import { initialLanguage, saveLanguage, translator } from "./i18n.js";
import { LiveStream } from "./live.js";
import { mountRemix } from "./remix.js";
import { Thumb, sheetOf } from "./thumbs.js";

const KEY_STORAGE = "vidmaas.apiKey";
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const POLL_MS = 2000;
const PAGE = 20;
const LIST_REFRESH_MS = 30_000;

const state = {
  lang: initialLanguage(),
  t: null,
  apiKey: null,
  me: null,
  models: [],
  defaultModel: null,
  tasks: new Map(), // id -> task (TaskOut shape, updated by events)
  order: [], // ids, newest first
  cursor: null,
  pagedOn: false, // "Load more" was used: refreshes leave the cursor alone
  adopting: new Map(), // id -> messages held while a new task's card is fetched
  settling: new Set(), // ids whose final row is being read
  token: null, // {token, expiresAt}
  image: null, // File
  imageUrl: null,
  admin: null, // the admin page's handle, for admins
};
state.t = translator(state.lang);

const ICONS = {
  x: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M6 6l12 12M18 6L6 18"/></svg>',
  down: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M12 4v12m0 0l-5-5m5 5l5-5M4 20h16"/></svg>',
  remix: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 12a8 8 0 0113.7-5.6L20 8.7M20 4v4.7h-4.7M20 12a8 8 0 01-13.7 5.6L4 15.3M4 20v-4.7h4.7"/></svg>',
  alert: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M12 8v5m0 3.5v.5M10.3 3.9L2.4 18a2 2 0 001.7 3h15.8a2 2 0 001.7-3L13.7 3.9a2 2 0 00-3.4 0z"/></svg>',
};

function icon(name) {
  const span = document.createElement("span");
  span.className = "icon";
  span.innerHTML = ICONS[name]; // constant markup, never user data
  return span;
}

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
  }
}

async function api(path, { method = "GET", body, json } = {}) {
  const headers = { Authorization: `Bearer ${state.apiKey}` };
  let payload = body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(json);
  }
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: payload });
  } catch (e) {
    throw new ApiError(0, "unreachable", state.t("serverDown"));
  }
  let data = null;
  try {
    data = await resp.json();
  } catch (e) {
    data = null;
  }
  if (!resp.ok) {
    const err = (data && data.error) || {};
    const error = new ApiError(resp.status, err.code || `http_${resp.status}`, err.message || resp.statusText, err.field);
    if (resp.status === 401 && state.apiKey) signOut(state.t("keyRejected"));
    throw error;
  }
  return data;
}

let tokenRequest = null; // one request shared by every socket that needs a token now

async function streamToken() {
  const now = Date.now();
  if (state.token && state.token.expiresAt - now > 30_000) return state.token.token;
  if (!tokenRequest) {
    tokenRequest = api("/v1/auth/stream-token", { method: "POST" })
      .then((data) => {
        state.token = { token: data.token, expiresAt: Date.now() + data.expires_in_s * 1000 };
        return data.token;
      })
      .finally(() => { tokenRequest = null; });
  }
  return tokenRequest;
}

function mediaUrl(path, token) {
  return `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
}

// ------------------------------------------------------------------ i18n

function applyLanguage() {
  const t = state.t;
  document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  const toggle = $("#lang-toggle");
  toggle.textContent = t("switchTo");
  toggle.setAttribute("aria-label", t("switchLabel"));
  renderModelOptions();
  updateImageField();
  for (const id of state.order) renderTask(id);
  updateConnection();
  if (state.admin) state.admin.render();
}

function setLanguage(lang) {
  state.lang = lang;
  state.t = translator(lang);
  saveLanguage(lang);
  applyLanguage();
}

// ------------------------------------------------------------------ sign in / out

function showSignIn(message) {
  $("#app-view").hidden = true;
  $("#signin-view").hidden = false;
  $("#sign-out").hidden = true;
  $('[data-testid="user-name"]').hidden = true;
  $("#signin-error").textContent = message || "";
  $("#api-key").focus();
}

async function signIn(key) {
  state.apiKey = key;
  try {
    state.me = await api("/v1/me");
  } catch (e) {
    state.apiKey = null;
    showSignIn(e.status === 401 ? state.t("keyRejected") : e.message);
    return false;
  }
  localStorage.setItem(KEY_STORAGE, key);
  $("#signin-view").hidden = true;
  $("#app-view").hidden = false;
  $("#sign-out").hidden = false;
  const who = $('[data-testid="user-name"]');
  who.textContent = state.me.name;
  who.hidden = false;
  if (state.me.is_admin && !state.admin) {
    const { mountAdmin } = await import("./admin.js");
    state.admin = mountAdmin({ api, t: (...a) => state.t(...a), lang: () => state.lang });
  }
  try {
    await loadModels();
    await loadTasks();
  } catch (e) {
    if (state.apiKey) $("#form-error").textContent = e.message;
  }
  if (state.apiKey) live.start();
  return true;
}

function signOut(message) {
  remix.close();
  if (state.admin) state.admin.unmount();
  state.admin = null;
  localStorage.removeItem(KEY_STORAGE);
  state.apiKey = null;
  state.me = null;
  state.token = null;
  live.stop();
  state.adopting.clear();
  state.tasks.clear();
  state.order = [];
  state.cursor = null;
  state.pagedOn = false;
  cards.clear();
  $("#tasks").replaceChildren();
  $("#api-key").value = "";
  showSignIn(message);
}

// ------------------------------------------------------------------ the form

async function loadModels() {
  const data = await api("/v1/models");
  state.models = data.data;
  state.defaultModel = data.default;
  renderModelOptions();
  const usable = state.models.filter((m) => m.available !== false);
  $("#f-model").value = usable.some((m) => m.id === data.default) ? data.default : usable[0]?.id;
  onModelChange();
}

function modelText(m) {
  // The model's name and description in the page's language; English (or the fields of
  // a server without display texts) where the registry has none in it.
  const d = m.display || {};
  const text = d[state.lang] || d.en || {};
  return { name: text.name || m.display_name || m.id, description: text.description ?? m.description ?? "" };
}

function modelName(id) {
  const m = state.models.find((x) => x.id === id);
  return m ? modelText(m).name : id;
}

function renderModelOptions() {
  // A model too large for the platform's GPUs is listed but cannot be chosen.
  const select = $("#f-model");
  const chosen = select.value;
  select.replaceChildren(...state.models.map((m) => {
    const { name } = modelText(m);
    return h("option", {
      value: m.id, disabled: m.available === false, title: m.unavailable_reason,
      text: m.available === false ? `${name} (${state.t("modelUnavailable")})` : name });
  }));
  if (chosen && state.models.some((m) => m.id === chosen)) select.value = chosen;
  const m = currentModel();
  $("#model-desc").textContent = m ? modelText(m).description : "";
}

function currentModel() {
  return state.models.find((m) => m.id === $("#f-model").value) || null;
}

function onModelChange() {
  const m = currentModel();
  if (!m) return;
  $("#model-desc").textContent = modelText(m).description;
  const size = $("#f-size");
  size.replaceChildren(...m.sizes.map((s) => h("option", { value: s, text: s.replace("*", " × ") })));
  size.value = m.default_size;
  const frames = $("#f-frames");
  frames.replaceChildren(...m.frame_counts.map((n) => h("option", { value: n, text: `${n} (${(n / m.fps).toFixed(1)} s)` })));
  frames.value = String(m.default_frames);
  const steps = $("#f-steps");
  steps.max = m.max_steps;
  steps.value = m.default_steps;
  clearErrors();
  updateImageField();
}

function updateImageField() {
  const m = currentModel();
  const field = $("#image-field");
  if (!m) return;
  field.hidden = m.image === "none";
  $("#image-optional").textContent = m.image === "required" ? state.t("required") : state.t("optional");
  $("#f-image").required = m.image === "required";
}

function setImage(file) {
  $("#err-image").textContent = "";
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.image = null;
  state.imageUrl = null;
  const preview = $("#image-preview");
  if (file && !/^image\/(png|jpeg|webp)$/.test(file.type)) {
    showFieldError("image", state.t("notAnImage"));
    file = null;
  }
  if (file) {
    state.image = file;
    state.imageUrl = URL.createObjectURL(file);
    preview.src = state.imageUrl;
    preview.alt = file.name;
  } else {
    preview.removeAttribute("src");
    $("#f-image").value = "";
  }
  preview.hidden = !file;
  $("#drop-text").hidden = !!file;
  $("#image-clear").hidden = !file;
  $("#drop").classList.toggle("has-image", !!file);
}

function clearErrors() {
  for (const el of document.querySelectorAll("#submit-form .field-error")) el.textContent = "";
  for (const el of document.querySelectorAll("#submit-form [aria-invalid]")) el.removeAttribute("aria-invalid");
}

const FIELD_INPUT = {
  prompt: "#f-prompt", model: "#f-model", size: "#f-size", num_frames: "#f-frames",
  steps: "#f-steps", seed: "#f-seed", negative_prompt: "#f-negative", image: "#drop",
};

function showFieldError(field, message) {
  const name = field ? String(field).split(".")[0] : null;
  const target = name && document.getElementById(`err-${name}`);
  if (target) {
    target.textContent = message;
    const input = $(FIELD_INPUT[name] || "#f-prompt");
    if (input) {
      input.setAttribute("aria-invalid", "true");
      if (name === "seed" || name === "negative_prompt") $(".advanced").open = true;
      input.focus();
    }
  } else {
    $("#form-error").textContent = message;
  }
}

async function onSubmit(ev) {
  ev.preventDefault();
  clearErrors();
  const m = currentModel();
  const prompt = $("#f-prompt").value.trim();
  if (!prompt) {
    showFieldError("prompt", state.t("promptRequired"));
    return;
  }
  const form = new FormData();
  form.append("prompt", prompt);
  if (m) form.append("model", m.id);
  form.append("size", $("#f-size").value);
  form.append("num_frames", $("#f-frames").value);
  if ($("#f-steps").value) form.append("steps", $("#f-steps").value);
  if ($("#f-seed").value) form.append("seed", $("#f-seed").value);
  if ($("#f-negative").value.trim()) form.append("negative_prompt", $("#f-negative").value.trim());
  if (state.image && m && m.image !== "none") form.append("image", state.image, state.image.name);
  const button = $("#submit-btn");
  button.disabled = true;
  button.textContent = state.t("submitting");
  try {
    const task = await api("/v1/tasks", { method: "POST", body: form });
    showCreated(task);
    $("#f-prompt").value = "";
    setImage(null);
  } catch (e) {
    if (e.status !== 401) showFieldError(e.field, e.message);
  } finally {
    button.disabled = false;
    button.textContent = state.t("generate");
  }
}

function showCreated(task) {
  // A task this page created (the form, or a remix): its card goes to the top.
  upsertTask(task, { front: true });
  const card = cards.get(task.id);
  if (card) card.scrollIntoView({ block: "nearest" });
}

const remix = mountRemix({ api, t: (...a) => state.t(...a), create: showCreated, modelName });

// ------------------------------------------------------------------ tasks

async function loadTasks({ more = false } = {}) {
  const params = new URLSearchParams({ limit: String(PAGE) });
  if (more && state.cursor) params.set("cursor", state.cursor);
  const page = await api(`/v1/tasks?${params}`);
  // Tasks already known are merged (events may be newer than the list), never dropped.
  for (const task of page.data) upsertTask(task, { front: false });
  // A refresh of the first page keeps the place of pages loaded with "Load more".
  if (more || !state.pagedOn) {
    state.cursor = page.next_cursor;
    state.pagedOn = more;
    $("#more").hidden = !page.next_cursor;
  }
  sortOrder();
  renderList();
}

function sortOrder() {
  state.order.sort((a, b) => {
    const ta = state.tasks.get(a).created_at;
    const tb = state.tasks.get(b).created_at;
    return ta < tb ? 1 : ta > tb ? -1 : (a < b ? 1 : -1);
  });
}

function upsertTask(task, { front }) {
  const known = state.tasks.get(task.id);
  if (known) {
    mergeTask(known, task);
  } else {
    state.tasks.set(task.id, { ...task });
    if (front) state.order.unshift(task.id);
    else state.order.push(task.id);
  }
  if (front) renderList();
  renderTask(task.id);
}

function mergeTask(known, fresh) {
  // A terminal status is final: a read that lags behind the event stream (the server
  // records an event a moment after it is streamed) must not bring a task back to life.
  if (TERMINAL.has(known.status) && fresh.status && !TERMINAL.has(fresh.status)) return;
  // Progress never goes backwards within one attempt.
  const progress = fresh.status === known.status ? Math.max(known.progress || 0, fresh.progress || 0) : fresh.progress;
  Object.assign(known, fresh, { progress });
}

function renderList() {
  const list = $("#tasks");
  const want = state.order.map((id) => cardOf(id));
  want.forEach((card, i) => {
    if (list.children[i] !== card) list.insertBefore(card, list.children[i] || null);
  });
  $("#tasks-empty").hidden = state.order.length > 0;
}

const cards = new Map();

function cardOf(id) {
  let card = cards.get(id);
  if (card) return card;
  const t = state.tasks.get(id);
  card = h("li", { class: "task card", "data-testid": "task", "data-task-id": id });
  const badge = h("span", { class: "badge", "data-testid": "status" });
  const prompt = h("p", { class: "prompt", "data-testid": "task-prompt", text: t.prompt });
  const meta = h("p", { class: "meta muted", "data-testid": "task-meta" });
  const origin = h("p", { class: "origin muted", "data-testid": "remix-of", hidden: true });
  const thumb = new Thumb({ token: streamToken, dropToken: () => { state.token = null; }, mediaUrl,
    onPick: (fraction) => playFrom(id, fraction) });
  const bar = h("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100", "data-testid": "progress" },
    h("div", { class: "fill" }));
  const percent = h("span", { class: "percent", "data-testid": "percent" });
  const stage = h("span", { class: "stage", "data-testid": "stage" });
  const eta = h("span", { class: "eta muted", "data-testid": "eta" });
  const position = h("span", { class: "position", "data-testid": "queue-position" });
  const startsIn = h("span", { class: "starts-in muted", "data-testid": "starts-in" });
  const progressRow = h("div", { class: "progress-row" }, bar, h("div", { class: "progress-text" }, position, startsIn, stage, percent, eta));
  const error = h("p", { class: "task-error", "data-testid": "error", role: "status" });
  const preview = h("img", { class: "preview", "data-testid": "preview", alt: state.t("preview"), hidden: true });
  const media = h("div", { class: "media" });
  const cancel = h("button", { type: "button", class: "ghost danger", "data-testid": "cancel", onclick: () => cancelTask(id) });
  const remixButton = h("button", { type: "button", class: "ghost", "data-testid": "remix", "aria-haspopup": "dialog",
    onclick: () => { const task = state.tasks.get(id); if (task) remix.open(task); } });
  const mediaActions = h("span", { class: "media-actions" }); // the download, once there is a video
  const actions = h("div", { class: "actions" }, mediaActions, remixButton, cancel);
  card.append(h("div", { class: "task-head" }, badge, h("time", { class: "muted", "data-testid": "created" })),
    h("div", { class: "task-main" }, thumb.el, h("div", { class: "task-text" }, prompt, meta, origin)), progressRow, error, preview, media, actions);
  card.parts = { badge, meta, origin, bar, percent, stage, eta, position, startsIn, progressRow, error, preview, media, mediaActions, cancel, remix: remixButton, actions, thumb };
  card.previewState = { step: 0, seq: 0, url: null };
  cards.set(id, card);
  return card;
}

function renderTask(id) {
  const t = state.tasks.get(id);
  if (!t) return;
  const card = cardOf(id);
  const p = card.parts;
  const tr = state.t;
  card.dataset.status = t.status;
  p.badge.textContent = tr(`status.${t.status}`);
  p.badge.className = `badge s-${t.status}`;
  const params = t.params || {};
  p.meta.textContent = [t.model, params.size ? params.size.replace("*", "×") : null, params.num_frames ? `${params.num_frames}f` : null, params.steps ? `${params.steps} ${tr("steps").toLowerCase()}` : null]
    .filter(Boolean).join(" · ");
  renderOrigin(t, p.origin);
  const created = card.querySelector("time");
  if (t.created_at) {
    created.dateTime = t.created_at;
    created.textContent = parseTime(t.created_at).toLocaleString(state.lang === "zh" ? "zh-CN" : "en");
  }
  const percent = Math.max(0, Math.min(100, Number(t.progress) || 0));
  p.progressRow.hidden = TERMINAL.has(t.status);
  p.bar.setAttribute("aria-valuenow", String(Math.round(percent)));
  p.bar.setAttribute("aria-label", tr(`status.${t.status}`));
  p.bar.firstChild.style.width = `${percent}%`;
  p.percent.textContent = `${percent.toFixed(0)}%`;
  p.position.textContent = t.status === "queued" && t.queue_position ? tr("queuePosition", { n: t.queue_position }) : "";
  p.position.hidden = !p.position.textContent;
  // The estimated start, when the server sends one (seconds until the task starts).
  const startsIn = Number(t.starts_in_s);
  p.startsIn.textContent = t.status === "queued" && t.starts_in_s != null && Number.isFinite(startsIn)
    ? tr("startsIn", { n: Math.max(1, Math.round(startsIn / 60)) }) : "";
  p.startsIn.hidden = !p.startsIn.textContent;
  p.stage.textContent = t.status === "running" && t.stage ? tr(`stage.${t.stage}`) : "";
  p.stage.hidden = !p.stage.textContent;
  p.eta.textContent = t.status === "running" && t.eta_s != null ? tr("eta", { t: fmtDuration(t.eta_s) }) : "";
  p.eta.hidden = !p.eta.textContent;
  // Failure reason (or a retry note while the task is queued again after a failure).
  let errorText = "";
  if (t.status === "failed" && t.error) errorText = tr("failedReason", { reason: t.error.message || t.error.code });
  else if (t.status === "failed") errorText = tr("failedReason", { reason: tr("status.failed") });
  else if (t.retry_note) errorText = tr("retrying", { reason: t.retry_note });
  else if (t.status === "queued" && t.error) errorText = tr("retrying", { reason: t.error.code });
  p.error.textContent = "";
  if (errorText) p.error.append(icon("alert"), document.createTextNode(errorText));
  p.error.hidden = !errorText;
  p.cancel.textContent = "";
  p.cancel.append(icon("x"), document.createTextNode(tr("cancel")));
  p.cancel.hidden = TERMINAL.has(t.status) || t.status === "cancelling";
  p.remix.replaceChildren(icon("remix"), document.createTextNode(tr("remix")));
  p.remix.hidden = !TERMINAL.has(t.status);
  p.thumb.update(t, tr(sheetOf(t) ? "playFrom" : "playVideo", { prompt: t.prompt.slice(0, 120) }));
  p.preview.alt = tr("preview");
  // The preview stays until the video replaces it, or the task ends without one.
  if (TERMINAL.has(t.status) && (t.status !== "completed" || t.video_url)) clearPreview(card);
  renderMedia(id, t, p);
}

function clearPreview(card) {
  const ps = card.previewState;
  ps.seq += 1; // a fetch still in flight is dropped
  ps.step = 0;
  if (ps.url) URL.revokeObjectURL(ps.url);
  ps.url = null;
  card.parts.preview.hidden = true;
  card.parts.preview.removeAttribute("src");
  delete card.parts.preview.dataset.step;
}

async function loadPreview(id, step) {
  // The task's latest preview image, fetched with the API key and shown from a blob: URL.
  const card = cards.get(id);
  if (!card || !state.apiKey) return;
  const ps = card.previewState;
  if (step && step <= ps.step) return; // an older preview than the one shown
  ps.seq += 1;
  const seq = ps.seq;
  let blob;
  try {
    const resp = await fetch(`/v1/tasks/${id}/preview`, { headers: { Authorization: `Bearer ${state.apiKey}` }, cache: "no-store" });
    if (!resp.ok) return; // none yet (404 no_preview), or not now: the next event retries
    blob = await resp.blob();
  } catch (e) {
    return;
  }
  const t = state.tasks.get(id);
  if (seq !== ps.seq || !t || TERMINAL.has(t.status)) return;
  if (ps.url) URL.revokeObjectURL(ps.url);
  ps.url = URL.createObjectURL(blob);
  ps.step = step || ps.step;
  card.parts.preview.src = ps.url;
  card.parts.preview.dataset.step = String(ps.step);
  card.parts.preview.hidden = false;
}

function renderMedia(id, t, p) {
  if (t.status !== "completed" || !t.video_url) {
    if (p.media.firstChild) p.media.replaceChildren();
    if (p.mediaActions.firstChild) p.mediaActions.replaceChildren();
    delete p.media.dataset.ready;
    return;
  }
  if (p.media.dataset.ready === "1") {
    const dl = p.mediaActions.querySelector('[data-testid="download"]');
    dl.lastChild.textContent = state.t("download");
    return;
  }
  p.media.dataset.ready = "1";
  const video = h("video", { controls: true, playsinline: true, preload: "metadata", "data-testid": "video", "aria-label": t.prompt.slice(0, 120) });
  const download = h("a", { class: "button ghost", "data-testid": "download", download: `${id}.mp4`, href: "#" }, icon("down"), document.createTextNode(state.t("download")));
  p.media.append(video);
  p.mediaActions.append(download);
  let retried = false;
  const setSources = async () => {
    const token = await streamToken();
    if (t.poster_url) video.poster = mediaUrl(t.poster_url, token);
    video.src = mediaUrl(t.video_url, token);
    download.href = mediaUrl(t.video_url, token);
  };
  // A media token expires after a few minutes: refresh it when the video errors, and
  // right before a download starts.
  video.addEventListener("error", () => {
    if (retried) return;
    retried = true;
    state.token = null;
    setSources().catch(() => {});
  });
  download.addEventListener("pointerdown", () => streamToken().then((tok) => { download.href = mediaUrl(t.video_url, tok); }).catch(() => {}));
  setSources().catch(() => {});
}

function renderOrigin(t, el) {
  // A remix names the task it was made from: its prompt, a link to its card when the
  // page holds it (its id otherwise).
  if (!t.rerun_of) {
    el.hidden = true;
    return;
  }
  const src = state.tasks.get(t.rerun_of);
  const label = src ? `“${src.prompt.length > 60 ? `${src.prompt.slice(0, 60)}…` : src.prompt}”` : t.rerun_of;
  const target = src
    ? h("a", { href: `#${t.rerun_of}`, "data-testid": "remix-of-link", text: label,
      onclick: (e) => { e.preventDefault(); showCard(t.rerun_of); } })
    : document.createTextNode(label);
  el.replaceChildren(document.createTextNode(`${state.t("remixedFrom")} `), target);
  el.hidden = false;
}

function showCard(id) {
  const card = cards.get(id);
  if (!card) return;
  card.scrollIntoView({ block: "nearest" });
  card.tabIndex = -1;
  card.focus();
}

function playFrom(id, fraction) {
  // The thumbnail's chosen moment (0 to 1 of the video) in the card's player.
  const card = cards.get(id);
  const video = card && card.parts.media.querySelector("video");
  if (!video) return;
  const go = () => {
    if (Number.isFinite(video.duration) && video.duration > 0) video.currentTime = fraction * video.duration;
    video.play().catch(() => {});
  };
  if (video.readyState >= 1) go();
  else video.addEventListener("loadedmetadata", go, { once: true });
  video.scrollIntoView({ block: "nearest" });
}

async function cancelTask(id) {
  const card = cardOf(id);
  card.parts.cancel.disabled = true;
  try {
    const task = await api(`/v1/tasks/${id}/cancel`, { method: "POST" });
    upsertTask(task, { front: false });
  } catch (e) {
    if (e.status === 409) await refreshTask(id);
  } finally {
    card.parts.cancel.disabled = false;
  }
}

async function settleTask(id) {
  // Read the task until its row shows the end the stream announced (a minute at most).
  if (state.settling.has(id)) return;
  state.settling.add(id);
  try {
    for (let i = 0; i < 60 && state.apiKey; i += 1) {
      try {
        const task = await api(`/v1/tasks/${id}`);
        if (TERMINAL.has(task.status)) {
          upsertTask(task, { front: false });
          return;
        }
      } catch (e) {
        if (e.status === 404 || e.status === 401) return;
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  } finally {
    state.settling.delete(id);
  }
}

async function refreshTask(id) {
  try {
    const task = await api(`/v1/tasks/${id}`);
    upsertTask(task, { front: false });
  } catch (e) {
    /* the next poll or event tries again */
  }
}

// ------------------------------------------------------------------ live updates

const SNAPSHOT_FIELDS = ["status", "progress", "stage", "eta_s", "queue_position", "starts_in_s", "attempts", "error"];

function snapshotState(msg) {
  // The task state a snapshot carries: in "data" (a subset of the task) or "task".
  const src = msg.task || msg.data || {};
  const out = {};
  for (const k of SNAPSHOT_FIELDS) if (k in src) out[k] = src[k];
  if (msg.task) Object.assign(out, msg.task);
  return out;
}

function applyEvent(t, msg) {
  const d = msg.data || {};
  switch (msg.type) {
    case "queued":
      if (!msg.id) {
        // A queue-position push (not an event): the place in the queue, and the
        // estimated start when the server sends one.
        if (t.status === "queued") {
          if (d.position != null) t.queue_position = d.position;
          if ("starts_in_s" in d) t.starts_in_s = d.starts_in_s;
        }
        break;
      }
      Object.assign(t, { status: "queued", queue_position: d.position ?? t.queue_position, progress: t.status === "queued" ? t.progress : 0, stage: null, eta_s: null });
      if ("starts_in_s" in d) t.starts_in_s = d.starts_in_s;
      break;
    case "dispatched":
      // Never back from a later state the page already shows (a poll can be ahead).
      if (t.status === "queued") t.status = "dispatching";
      Object.assign(t, { queue_position: null, starts_in_s: null, retry_note: null });
      break;
    case "started":
      if (t.status === "queued" || t.status === "dispatching") t.status = "running";
      Object.assign(t, { queue_position: null, starts_in_s: null });
      break;
    case "stage":
      t.stage = d.stage;
      break;
    case "progress":
      if (t.status === "queued" || t.status === "dispatching") t.status = "running";
      t.progress = Math.max(Number(t.progress) || 0, Number(d.percent) || 0);
      t.eta_s = d.eta_s ?? null;
      if (d.stage) t.stage = d.stage;
      t.queue_position = null;
      t.starts_in_s = null;
      break;
    case "status":
      if (d.status) t.status = d.status;
      break;
    case "completed":
      Object.assign(t, { status: "completed", progress: 100, eta_s: null });
      break;
    case "failed":
      if (d.retryable) t.retry_note = d.message || d.code;
      else Object.assign(t, { status: "failed", error: { code: d.code, message: d.message } });
      break;
    case "cancelled":
      t.status = "cancelled";
      break;
    default:
      break; // heartbeat, log, preview (handled after rendering), and types this page does not know yet
  }
}

function applyStreamMessage(id, msg) {
  const t = state.tasks.get(id);
  if (!t) return;
  if (msg.type === "end" || msg.type === "not_found") {
    // Events carry no media URLs: read the task once the server has recorded the end.
    settleTask(id);
    return;
  }
  if (TERMINAL.has(t.status)) return; // a terminal state is final
  if (msg.type === "snapshot") mergeTask(t, snapshotState(msg));
  else applyEvent(t, msg);
  if (msg.type === "queued" && msg.id) clearPreview(cardOf(id)); // a new attempt starts over
  renderTask(id);
  if (TERMINAL.has(t.status)) settleTask(id);
  else if (msg.type === "preview") loadPreview(id, Number((msg.data || {}).step) || 0);
  else if (msg.type === "snapshot" && t.status === "running") loadPreview(id, 0); // a reload mid-run
}

async function adoptTask(id, msg) {
  // A task this page has no card for (created in another tab, by the CLI, or beyond the
  // loaded pages): fetch it, then apply what the stream said meanwhile, in order.
  const held = state.adopting.get(id);
  if (held) {
    held.push(msg);
    return;
  }
  state.adopting.set(id, [msg]);
  let task = null;
  try {
    task = await api(`/v1/tasks/${id}`);
  } catch (e) {
    /* gone, or not reachable now: the list refresh shows it later */
  }
  const msgs = state.adopting.get(id) || [];
  state.adopting.delete(id);
  if (!task || !state.apiKey) return;
  const known = state.tasks.has(id);
  upsertTask(task, { front: false });
  if (!known) {
    sortOrder();
    renderList();
  }
  for (const m of msgs) applyStreamMessage(id, m);
}

function onStreamMessage(msg) {
  const id = msg.task_id;
  if (state.tasks.has(id) && !state.adopting.has(id)) applyStreamMessage(id, msg);
  else if (msg.type !== "not_found") adoptTask(id, msg);
}

// While the stream cannot be used, the unfinished cards are read every POLL_MS.
let pollTimer = null;

function schedulePolling(delayMs = 0) {
  if (live.mode !== "polling" || !state.apiKey) {
    clearTimeout(pollTimer);
    pollTimer = null;
    return;
  }
  if (pollTimer) return;
  pollTimer = setTimeout(async () => {
    const ids = state.order.filter((id) => !TERMINAL.has(state.tasks.get(id).status));
    await Promise.all(ids.map((id) => refreshTask(id)));
    pollTimer = null;
    schedulePolling(POLL_MS);
  }, delayMs);
}

const live = new LiveStream({
  token: streamToken,
  dropToken: () => { state.token = null; },
  onMessage: onStreamMessage,
  onMode: () => {
    updateConnection();
    schedulePolling();
  },
  // Back after a drop: a task created and finished meanwhile is only in the list.
  onResumed: () => { if (state.apiKey) loadTasks().catch(() => {}); },
});

function updateConnection() {
  const el = $("#conn");
  const mode = live.mode;
  const text = { live: "live", reconnecting: "reconnecting", polling: "polling" }[mode];
  el.textContent = text ? state.t(text) : "";
  el.dataset.mode = text ? mode : "";
}

// ------------------------------------------------------------------ start

function wire() {
  $("#lang-toggle").addEventListener("click", () => setLanguage(state.lang === "zh" ? "en" : "zh"));
  $("#sign-out").addEventListener("click", () => signOut(""));
  $("#signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("#api-key").value.trim();
    if (!key) {
      $("#signin-error").textContent = state.t("keyRequired");
      return;
    }
    signIn(key);
  });
  $("#submit-form").addEventListener("submit", onSubmit);
  $("#f-model").addEventListener("change", onModelChange);
  $("#more").addEventListener("click", () => loadTasks({ more: true }));
  const drop = $("#drop");
  const input = $("#f-image");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); input.click(); }
  });
  input.addEventListener("change", () => setImage(input.files[0] || null));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    const file = ev.dataTransfer && ev.dataTransfer.files[0];
    if (file) setImage(file);
  });
  $("#image-clear").addEventListener("click", () => setImage(null));
  // Back from a sleeping laptop or a lost network: catch up at once.
  window.addEventListener("online", () => { if (state.apiKey) loadTasks().catch(() => {}); });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && state.apiKey) loadTasks().catch(() => {});
  });
  // Tasks submitted elsewhere (the CLI, another tab) show up within half a minute.
  setInterval(() => {
    if (document.visibilityState === "visible" && state.apiKey) loadTasks().catch(() => {});
  }, LIST_REFRESH_MS);
}

async function start() {
  wire();
  applyLanguage();
  const saved = localStorage.getItem(KEY_STORAGE);
  if (saved) await signIn(saved);
  else showSignIn("");
  document.body.dataset.ready = "1";
}

start();
