// The admin page: the queue by model and user, what runs now, usage per user over a
// period, and users and their keys (create, quotas, weight, priority, disable, revoke).
//
// Loaded by app.js only for a caller whose /v1/me says is_admin; everything it shows
// comes from the admin API (GET /v1/admin/queue, /v1/admin/users…, /v1/usage?all=true),
// which refuses anyone else anyway. The queue refreshes every few seconds while the
// page is shown. A new key's secret is shown once, in its own box, and never kept.

import { $, h, parseTime, roughDuration } from "./dom.js";

const QUOTAS = ["queued_tasks", "gpus_at_once", "gpu_seconds_day", "gpu_seconds_month"];
const PRIORITIES = ["low", "normal", "high"];
const REFRESH_MS = 5000;
const PAGE = 50;

function isoDay(d) {
  return d.toISOString().slice(0, 10);
}

export function mountAdmin({ api, t, lang }) {
  const st = { view: "tasks", queue: null, usage: null, users: [], cursor: null, editing: null, keysOf: null, keys: [], timer: null };
  const nav = $("#views");
  nav.hidden = false;

  function show(view) {
    st.view = view;
    $("#app-view").hidden = view !== "tasks";
    $("#admin-view").hidden = view !== "admin";
    $("#nav-tasks").setAttribute("aria-pressed", String(view === "tasks"));
    $("#nav-admin").setAttribute("aria-pressed", String(view === "admin"));
    clearInterval(st.timer);
    st.timer = null;
    if (view !== "admin") return;
    refreshQueue();
    loadUsers();
    loadUsage();
    st.timer = setInterval(() => { if (document.visibilityState === "visible") refreshQueue(); }, REFRESH_MS);
  }

  // ---------------------------------------------------------------- the queue

  async function refreshQueue() {
    try {
      st.queue = await api("/v1/admin/queue?limit=100");
    } catch (e) {
      $("#a-capacity").textContent = e.message;
      return;
    }
    renderQueue();
  }

  function nameOf(id) {
    return (st.queue && st.queue.user_names[id]) || id;
  }

  function startsText(s) {
    if (s === null || s === undefined) return t("neverFits");
    return s < 1 ? t("startsNow") : t("adminStartsIn", { t: roughDuration(s) });
  }

  // A table row; each cell carries its column's name, which a phone shows beside it.
  function row(cells, attrs = {}, labels = []) {
    return h("tr", attrs, ...cells.map((c, i) => (c instanceof Node
      ? h("td", { "data-label": labels[i] }, c)
      : h("td", { "data-label": labels[i], text: String(c) }))));
  }

  function labels(body) {
    return [...body.closest("table").querySelectorAll("thead th")].map((th) => th.textContent);
  }

  function empty(body, cols) {
    if (!body.children.length) body.append(h("tr", {}, h("td", { colspan: String(cols), class: "muted", text: t("none") })));
  }

  function renderQueue() {
    const q = st.queue;
    if (!q) return;
    const waiting = Object.values(q.queued_by_model).reduce((a, b) => a + b, 0);
    $("#a-capacity").textContent = t("capacityLine", { used: q.gpus_in_use, cap: q.capacity, n: waiting });
    const byModel = $("#a-by-model");
    const models = new Set([...Object.keys(q.queued_by_model), ...Object.keys(q.model_run_s)]);
    byModel.replaceChildren(...[...models].sort().map((m) => row(
      [m, q.queued_by_model[m] || 0, q.model_run_s[m] ? roughDuration(q.model_run_s[m]) : "—"], { "data-testid": "model-row", "data-model": m }, labels(byModel))));
    empty(byModel, 3);
    const byUser = $("#a-by-user");
    const users = new Set([...Object.keys(q.queued_by_user), ...Object.keys(q.running_by_user)]);
    byUser.replaceChildren(...[...users].sort((a, b) => nameOf(a).localeCompare(nameOf(b))).map((u) => row(
      [nameOf(u), q.queued_by_user[u] || 0, q.running_by_user[u] || 0], { "data-testid": "user-queue-row", "data-user": nameOf(u) }, labels(byUser))));
    empty(byUser, 3);
    const queued = $("#a-queued");
    queued.replaceChildren(...q.queued.map((x) => row(
      [x.position, h("code", { text: x.task_id.slice(-8), title: x.task_id }), x.user_name || x.user_id, x.model, x.gpus, startsText(x.starts_in_s)],
      { "data-testid": "queued-row", "data-task-id": x.task_id }, labels(queued))));
    empty(queued, 6);
    const running = $("#a-running");
    running.replaceChildren(...q.running.map((x) => {
      const pct = Math.round(Math.max(0, Math.min(100, x.progress)));
      const bar = h("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": String(pct), "aria-label": t("progressOf", { task: x.task_id.slice(-8) }) }, h("div", { class: "fill" }));
      bar.firstChild.style.width = `${pct}%`;
      const status = t(`status.${x.status}`) + (x.stage ? ` · ${t(`stage.${x.stage}`)}` : "") + (x.worker_id ? ` · ${x.worker_id}` : "");
      return row([h("code", { text: x.task_id.slice(-8), title: x.task_id }), x.user_name || x.user_id, x.model, x.gpus, status, h("div", { class: "bar-cell" }, bar, h("span", { text: `${pct}%` }))],
        { "data-testid": "running-row", "data-task-id": x.task_id }, labels(running));
    }));
    empty(running, 6);
    $("#a-workers-wrap").hidden = !q.workers.length;
    $("#a-workers").replaceChildren(...q.workers.map((w) => row(
      [w.id, w.model, w.gpus, t(`workerState.${w.state}`) + (w.alive ? "" : ` · ${t("lost")}`), w.task_id ? w.task_id.slice(-8) : "—", w.tasks_done],
      { "data-testid": "worker-row" }, labels($("#a-workers")))));
  }

  // ---------------------------------------------------------------- usage

  async function loadUsage() {
    const since = $("#a-since").value;
    const until = $("#a-until").value;
    $("#a-usage-error").textContent = "";
    try {
      st.usage = await api(`/v1/usage?${new URLSearchParams({ all: "true", since, until })}`);
    } catch (e) {
      $("#a-usage-error").textContent = e.message;
      return;
    }
    renderUsage();
  }

  function renderUsage() {
    if (!st.usage) return;
    const per = new Map();
    for (const r of st.usage.data) {
      const u = per.get(r.user_id) || { name: r.user_name || r.user_id, tasks: 0, gpu: 0, wait: 0 };
      u.tasks += r.tasks;
      u.gpu += r.gpu_seconds;
      u.wait += r.queue_wait_s;
      per.set(r.user_id, u);
    }
    const locale = lang() === "zh" ? "zh-CN" : "en";
    const fmt = (x, d) => x.toLocaleString(locale, { minimumFractionDigits: d, maximumFractionDigits: d });
    const body = $("#a-usage");
    body.replaceChildren(...[...per.values()].sort((a, b) => b.gpu - a.gpu).map((u) => row(
      [u.name, u.tasks, fmt(u.gpu / 3600, 2), roughDuration(u.wait)], { "data-testid": "usage-row", "data-user": u.name }, labels(body))));
    empty(body, 4);
  }

  // ---------------------------------------------------------------- users and keys

  async function loadUsers({ more = false } = {}) {
    const params = new URLSearchParams({ limit: String(PAGE) });
    if (more && st.cursor) params.set("cursor", st.cursor);
    const page = await api(`/v1/admin/users?${params}`);
    st.users = more ? [...st.users, ...page.data] : page.data;
    st.cursor = page.next_cursor;
    $("#a-users-more").hidden = !st.cursor;
    renderUsers();
  }

  function replaceUser(user) {
    st.users = st.users.map((u) => (u.id === user.id ? user : u));
    renderUsers();
  }

  function quotaText(u) {
    const v = (q) => (u.limits[q] === null ? "∞" : String(u.limits[q]));
    return QUOTAS.map((q) => `${t(`quota.${q}`)} ${v(q)}`).join(" · ");
  }

  function renderUsers() {
    const body = $("#a-users");
    const rows = [];
    for (const u of st.users) {
      const edit = h("button", { type: "button", class: "ghost small", "data-testid": "user-edit", "aria-expanded": String(st.editing === u.id), text: t("edit"), "aria-label": t("editUser", { name: u.name }), onclick: () => { st.editing = st.editing === u.id ? null : u.id; renderUsers(); } });
      const toggle = h("button", { type: "button", class: "ghost small", "data-testid": u.disabled ? "user-enable" : "user-disable", text: u.disabled ? t("enable") : t("disable"), "aria-label": t(u.disabled ? "enableUser" : "disableUser", { name: u.name }), onclick: () => setDisabled(u, !u.disabled) });
      const keys = h("button", { type: "button", class: "ghost small", "data-testid": "user-keys", "aria-expanded": String(st.keysOf === u.id), text: t("keys"), "aria-label": t("keysOf", { name: u.name }), onclick: () => toggleKeys(u) });
      rows.push(row([u.name, u.is_admin ? t("adminRole") : t("userRole"), u.weight, t(`priority.${u.max_priority}`), quotaText(u), u.disabled ? t("disabled") : t("active"), h("div", { class: "row-actions" }, edit, toggle, keys)],
        { "data-testid": "user-row", "data-user": u.name, class: u.disabled ? "is-disabled" : null }, labels(body)));
      if (st.editing === u.id) rows.push(h("tr", { class: "detail" }, h("td", { colspan: "7" }, editForm(u))));
      if (st.keysOf === u.id) rows.push(h("tr", { class: "detail" }, h("td", { colspan: "7" }, keysPanel(u))));
    }
    body.replaceChildren(...rows);
  }

  function editForm(u) {
    const id = (name) => `e-${u.id}-${name}`;
    const err = h("p", { class: "field-error", role: "alert", "data-testid": "edit-error" });
    const field = (name, label, input) => h("div", { class: "field" }, h("label", { for: id(name), text: label }), input);
    const weight = h("input", { id: id("weight"), type: "number", step: "0.01", min: "0.01", max: "100", value: String(u.weight), "data-testid": "edit-weight" });
    const top = h("select", { id: id("max_priority"), "data-testid": "edit-max-priority" }, ...PRIORITIES.map((p) => h("option", { value: p, text: t(`priority.${p}`), selected: p === u.max_priority })));
    const inputs = {};
    const quotaFields = QUOTAS.map((q) => {
      inputs[q] = h("input", { id: id(q), type: "number", min: "0", step: q.startsWith("gpu_seconds") ? "any" : "1", value: u.quotas[q] === null ? "" : String(u.quotas[q]), placeholder: t("defaultIs", { v: u.limits[q] === null ? "∞" : u.limits[q] }), "data-testid": `edit-quota-${q}` });
      return field(q, t(`quotaLong.${q}`), inputs[q]);
    });
    const form = h("form", { class: "edit-form", novalidate: true, "data-testid": "edit-form", "aria-label": t("editUser", { name: u.name }) },
      h("div", { class: "edit-grid" }, field("weight", t("weight"), weight), field("max_priority", t("maxPriority"), top), ...quotaFields),
      h("p", { class: "hint", text: t("blankIsDefault") }), err,
      h("div", { class: "row-actions" }, h("button", { type: "submit", class: "primary small", "data-testid": "edit-save", text: t("save") })));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      err.textContent = "";
      const body = { weight: weight.value === "" ? null : Number(weight.value), max_priority: top.value };
      for (const q of QUOTAS) body[`quota_${q}`] = inputs[q].value === "" ? null : Number(inputs[q].value);
      try {
        const user = await api(`/v1/admin/users/${u.id}`, { method: "PATCH", json: body });
        st.editing = null;
        replaceUser(user);
      } catch (e) {
        err.textContent = e.message;
        const bad = e.field && document.getElementById(id(e.field.replace(/^quota_/, "")));
        if (bad) { bad.setAttribute("aria-invalid", "true"); bad.focus(); }
      }
    });
    return form;
  }

  async function setDisabled(u, disabled) {
    try {
      replaceUser(await api(`/v1/admin/users/${u.id}/${disabled ? "disable" : "enable"}`, { method: "POST" }));
    } catch (e) {
      $("#a-new-error").textContent = e.message;
    }
  }

  async function toggleKeys(u) {
    if (st.keysOf === u.id) {
      st.keysOf = null;
      renderUsers();
      return;
    }
    st.keysOf = u.id;
    st.keys = (await api(`/v1/admin/users/${u.id}/keys`)).data;
    renderUsers();
  }

  function when(text) {
    return text ? parseTime(text).toLocaleString(lang() === "zh" ? "zh-CN" : "en") : t("never");
  }

  function keysPanel(u) {
    const state = (k) => (k.active ? t("active") : k.revoked_at ? t("revoked") : t("expired"));
    const head = ["keyPrefix", "keyName", "created", "lastUsed", "expires", "statusCol", "actions"].map((k) => t(k));
    const rows = st.keys.map((k) => row([
      h("code", { text: `${k.prefix}…` }), k.name || "—", when(k.created_at), when(k.last_used_at), k.expires_at ? when(k.expires_at) : t("never"), state(k),
      k.revoked_at ? "" : h("button", { type: "button", class: "ghost small danger", "data-testid": "key-revoke", text: t("revoke"), "aria-label": t("revokeKey", { prefix: k.prefix }), onclick: () => revoke(u, k) })],
    { "data-testid": "key-row", "data-key-id": String(k.id) }, head));
    const nameId = `k-${u.id}-name`;
    const name = h("input", { id: nameId, type: "text", maxlength: "64", "data-testid": "key-new-name", autocomplete: "off" });
    const form = h("form", { class: "inline-form", novalidate: true },
      h("div", { class: "field" }, h("label", { for: nameId, text: t("keyName") }), name),
      h("button", { type: "submit", class: "ghost small", "data-testid": "key-create", text: t("newKey") }));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const key = await api(`/v1/admin/users/${u.id}/keys`, { method: "POST", json: name.value.trim() ? { name: name.value.trim() } : {} });
      showSecret(key.secret);
      st.keys = (await api(`/v1/admin/users/${u.id}/keys`)).data;
      renderUsers();
    });
    return h("div", { class: "keys-panel" },
      h("div", { class: "table-wrap" }, h("table", { "data-testid": "keys-table", "aria-label": t("keysOf", { name: u.name }) },
        h("thead", {}, h("tr", {}, ...head.map((text) => h("th", { scope: "col", text })))), h("tbody", {}, ...rows))), form);
  }

  async function revoke(u, k) {
    await api(`/v1/admin/keys/${k.id}`, { method: "DELETE" });
    st.keys = (await api(`/v1/admin/users/${u.id}/keys`)).data;
    renderUsers();
  }

  function showSecret(secret) {
    $("#a-secret-value").textContent = secret;
    $("#a-secret").hidden = false;
    $("#a-secret-hide").focus();
  }

  async function createUser(ev) {
    ev.preventDefault();
    const input = $("#a-new-name");
    $("#a-new-error").textContent = "";
    input.removeAttribute("aria-invalid");
    const name = input.value.trim();
    if (!name) {
      $("#a-new-error").textContent = t("nameRequired");
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    try {
      const made = await api("/v1/admin/users", { method: "POST", json: { name, is_admin: $("#a-new-admin").checked } });
      input.value = "";
      $("#a-new-admin").checked = false;
      st.users = [...st.users, made.user];
      renderUsers();
      if (made.key) showSecret(made.key.secret);
    } catch (e) {
      $("#a-new-error").textContent = e.message;
      input.setAttribute("aria-invalid", "true");
      input.focus();
    }
  }

  // ---------------------------------------------------------------- wiring

  const today = new Date();
  $("#a-since").value = isoDay(new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), 1)));
  $("#a-until").value = isoDay(today);
  $("#nav-tasks").onclick = () => show("tasks");
  $("#nav-admin").onclick = () => show("admin");
  $("#a-refresh").onclick = () => refreshQueue();
  $("#a-usage-form").onsubmit = (ev) => { ev.preventDefault(); loadUsage(); };
  $("#a-new-user").onsubmit = createUser;
  $("#a-users-more").onclick = () => loadUsers({ more: true });
  $("#a-secret-hide").onclick = () => { $("#a-secret").hidden = true; $("#a-secret-value").textContent = ""; };

  function render() {
    nav.setAttribute("aria-label", t("pages"));
    renderQueue();
    renderUsage();
    renderUsers();
  }

  function unmount() {
    clearInterval(st.timer);
    nav.hidden = true;
    $("#admin-view").hidden = true;
    $("#a-secret").hidden = true;
    $("#a-secret-value").textContent = "";
    for (const id of ["#a-by-model", "#a-by-user", "#a-queued", "#a-running", "#a-workers", "#a-usage", "#a-users"]) $(id).replaceChildren();
  }

  render();
  show("tasks");
  return { render, unmount, show };
}
