// A finished video's thumbnail on its card: the poster, and, when the task has a
// spritesheet, a scrub through the video's frames under the pointer.
//
// Guarantees:
// - Without a spritesheet (spritesheet_url and spritesheet absent or malformed) the
//   thumbnail is the poster and nothing else; a broken sheet leaves the poster too.
// - Over the thumbnail, pointer x selects tile floor(x / width * count) (clamped to the
//   tiles there are), shown as the sheet's background scaled so one tile fills the
//   thumbnail; leaving it shows the poster again.
// - From the keyboard the thumbnail is one button: the left and right arrows, Home and End step
//   through the tiles; Enter, Space or a click hand the chosen moment (0 to 1 of the
//   video, the poster's is 0) to onPick.
// - Media URLs carry a media token (the page's streamToken); a poster or sheet that
//   fails to load is retried once with a fresh token.

import { h } from "./dom.js";

/** The spritesheet's geometry, or null when the task has none usable. */
export function sheetOf(task) {
  const s = task.spritesheet;
  if (!task.spritesheet_url || !s) return null;
  const ints = ["columns", "rows", "count", "tile_width", "tile_height"].map((k) => Number(s[k]));
  if (!ints.every((n) => Number.isInteger(n) && n > 0)) return null;
  const [columns, rows, count, tileWidth, tileHeight] = ints;
  if (count > columns * rows) return null;
  return { url: task.spritesheet_url, columns, rows, count, tileWidth, tileHeight };
}

/** The tile under pointer x of a thumbnail `width` wide. */
export function tileAt(x, width, count) {
  if (!(width > 0)) return 0;
  return Math.max(0, Math.min(count - 1, Math.floor((x / width) * count)));
}

export class Thumb {
  /**
   * token(): a promise of a media token; dropToken(): forget it (a load failed);
   * mediaUrl(path, token): the path with the token; onPick(fraction): play from there.
   */
  constructor({ token, dropToken, mediaUrl, onPick }) {
    this.token = token;
    this.dropToken = dropToken;
    this.mediaUrl = mediaUrl;
    this.onPick = onPick;
    this.poster = h("img", { class: "thumb-poster", "data-testid": "thumb-poster", alt: "", draggable: "false" });
    this.tiles = h("span", { class: "thumb-sheet", "data-testid": "thumb-sheet", "aria-hidden": "true", hidden: true });
    this.el = h("button", { type: "button", class: "thumb", "data-testid": "thumb", hidden: true }, this.poster, this.tiles);
    this.task = null;
    this.sheet = null;
    this.sheetState = "none"; // none | loading | ready | broken
    this.tile = null;
    this.el.addEventListener("pointermove", (ev) => {
      const box = this.el.getBoundingClientRect();
      this.show(tileAt(ev.clientX - box.left, box.width, this.sheet ? this.sheet.count : 1));
    });
    this.el.addEventListener("pointerenter", () => this.loadSheet());
    this.el.addEventListener("pointerleave", () => this.show(null));
    this.el.addEventListener("focus", () => this.loadSheet());
    this.el.addEventListener("blur", () => this.show(null));
    this.el.addEventListener("keydown", (ev) => this.onKey(ev));
    this.el.addEventListener("click", () => {
      const count = this.sheet ? this.sheet.count : 1;
      this.onPick(this.tile == null ? 0 : this.tile / count);
    });
    this.posterRetried = false;
    this.poster.addEventListener("error", () => {
      if (this.posterRetried || !this.task) return;
      this.posterRetried = true;
      this.dropToken();
      this.setPoster().catch(() => {});
    });
  }

  /** Show the task (a completed one with a poster), or hide the thumbnail. */
  update(task, label) {
    this.el.setAttribute("aria-label", label);
    if (task.status !== "completed" || !task.poster_url) {
      this.el.hidden = true;
      return;
    }
    const first = !this.task;
    this.task = task;
    this.el.hidden = false;
    const sheet = sheetOf(task);
    if (sheet && (!this.sheet || sheet.url !== this.sheet.url)) {
      this.sheet = sheet;
      this.sheetState = "none";
      this.el.dataset.tiles = String(sheet.count);
      // The thumbnail takes the tiles' shape (the poster's, scaled).
      this.el.style.aspectRatio = `${sheet.tileWidth} / ${sheet.tileHeight}`;
    } else if (!sheet && first) {
      const r = task.result || {};
      if (r.width > 0 && r.height > 0) this.el.style.aspectRatio = `${r.width} / ${r.height}`;
    }
    if (first) this.setPoster().catch(() => {});
  }

  async setPoster() {
    this.poster.src = this.mediaUrl(this.task.poster_url, await this.token());
  }

  async loadSheet() {
    if (!this.sheet || this.sheetState !== "none") return;
    this.sheetState = "loading";
    const sheet = this.sheet;
    const load = async (second) => {
      const url = this.mediaUrl(sheet.url, await this.token());
      const img = new Image();
      img.onload = () => {
        if (this.sheet !== sheet) return;
        this.sheetState = "ready";
        this.tiles.style.backgroundImage = `url("${url.replace(/["\\]/g, "\\$&")}")`;
        this.tiles.style.backgroundSize = `${sheet.columns * 100}% ${sheet.rows * 100}%`;
        this.show(this.tile);
      };
      img.onerror = () => {
        if (this.sheet !== sheet) return;
        if (second) {
          this.sheetState = "broken"; // the poster stays
          return;
        }
        this.dropToken();
        load(true).catch(() => { this.sheetState = "broken"; });
      };
      img.src = url;
    };
    load(false).catch(() => { this.sheetState = "none"; });
  }

  /** Show tile `i` (null: the poster). */
  show(i) {
    this.tile = this.sheet ? i : null;
    if (this.tile == null) delete this.el.dataset.tile;
    else this.el.dataset.tile = String(this.tile);
    const visible = this.tile != null && this.sheetState === "ready";
    this.tiles.hidden = !visible;
    if (!visible) return;
    const { columns, rows } = this.sheet;
    const col = this.tile % columns;
    const row = Math.floor(this.tile / columns);
    // A percentage puts that share of the sheet's overflow left of the box: col/(columns-1)
    // of it brings tile col to the left edge, whatever size the thumbnail is.
    const x = columns > 1 ? (col / (columns - 1)) * 100 : 0;
    const y = rows > 1 ? (row / (rows - 1)) * 100 : 0;
    this.tiles.style.backgroundPosition = `${x}% ${y}%`;
  }

  onKey(ev) {
    if (!this.sheet) return;
    const last = this.sheet.count - 1;
    const now = this.tile == null ? -1 : this.tile;
    const next = { ArrowRight: now + 1, ArrowLeft: now - 1, Home: 0, End: last }[ev.key];
    if (next === undefined) return;
    ev.preventDefault();
    this.loadSheet();
    this.show(Math.max(0, Math.min(last, next)));
  }
}
