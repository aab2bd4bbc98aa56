// Small DOM and formatting helpers shared by the user page (app.js) and the admin page
// (admin.js). Text always goes in through textContent: user data is never parsed as HTML.

export const $ = (sel) => document.querySelector(sel);

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c != null) el.append(c);
  return el;
}

export function parseTime(text) {
  // Server times are UTC; some databases hand them back without an offset.
  return new Date(/(Z|[+-]\d\d:?\d\d)$/.test(text) ? text : `${text}Z`);
}

export function fmtDuration(s) {
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  return `${m}:${String(s % 60).padStart(2, "0")}`;
}

// "about 3 min", "about 40 s", "about 2 h": a start estimate, deliberately coarse.
export function roughDuration(s) {
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${Math.max(5, Math.round(s / 5) * 5)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(s < 36000 ? 1 : 0)} h`;
}
