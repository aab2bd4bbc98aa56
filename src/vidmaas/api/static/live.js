// The page's one live connection: a WebSocket to /v1/events that carries every card
// (wire protocol in docs/streams-and-openai.md, "Resuming the multiplexed stream").
//
// Guarantees:
// - At most one socket is open at a time. It carries every unfinished task of the
//   signed-in user and each new one, whichever tab or client created it.
// - Per task, a message is handed on at most once and in stream order: the last event id
//   seen of each task is kept, every reconnect sends them all in the resume message (the
//   newest MAX_RESUME tasks), and an event at or before a task's last id is dropped.
// - A dropped socket (a close, the browser going offline, or SILENCE_MS without a frame
//   although the server pings every 15 s) is replaced with backoff: 0.5 s doubling to
//   15 s, with jitter, at once when the browser comes back online. After two failed tries
//   in a row the mode is "polling" (the page reads the tasks over REST meanwhile);
//   without WebSocket support at all it is "polling" for good.

const MAX_RESUME = 200; // the server's api.stream_resume_max_tasks default
const SILENCE_MS = 45_000;
const SETTLE_MS = 1000;
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 15_000;

/** Order of two stream ids ("<ms>-<seq>"): negative, zero or positive. */
export function compareIds(a, b) {
  const [am, as = "0"] = String(a).split("-");
  const [bm, bs = "0"] = String(b).split("-");
  const cmp = (x, y) => (x.length - y.length) || (x < y ? -1 : x > y ? 1 : 0);
  return cmp(am, bm) || cmp(as, bs);
}

export class LiveStream {
  /**
   * token(): a promise of a stream token; dropToken(): forget it (it was refused);
   * onMessage(msg): one message for a task (snapshot, event, position push, end,
   * not_found), each at most once; onMode(mode): "connecting" | "live" |
   * "reconnecting" | "polling" | "off"; onResumed(): a socket is back after a drop.
   */
  constructor({ token, dropToken, onMessage, onMode, onResumed }) {
    this.token = token;
    this.dropToken = dropToken;
    this.onMessage = onMessage;
    this.onModeChange = onMode;
    this.onResumed = onResumed;
    this.lastIds = new Map(); // task id -> last event id seen
    this.ws = null;
    this.mode = "off";
    this.failures = 0;
    this.dropped = false;
    this.running = false;
    this.retryTimer = null;
    this.silenceTimer = null;
    this.settleTimer = null;
    this.resumeRefused = false;
    this.onOnline = () => this.reconnectNow();
    this.onOffline = () => this.drop();
  }

  start() {
    if (this.running) return;
    this.running = true;
    window.addEventListener("online", this.onOnline);
    window.addEventListener("offline", this.onOffline);
    if (typeof WebSocket !== "function") {
      this.setMode("polling");
      return;
    }
    this.setMode("connecting");
    this.connect();
  }

  stop() {
    this.running = false;
    window.removeEventListener("online", this.onOnline);
    window.removeEventListener("offline", this.onOffline);
    clearTimeout(this.retryTimer);
    clearTimeout(this.silenceTimer);
    clearTimeout(this.settleTimer);
    this.closeSocket();
    this.lastIds.clear();
    this.failures = 0;
    this.dropped = false;
    this.setMode("off");
  }

  setMode(mode) {
    if (this.mode === mode) return;
    this.mode = mode;
    this.onModeChange(mode);
  }

  resumeList() {
    if (this.resumeRefused) {
      this.resumeRefused = false;
      this.lastIds.clear();
    }
    // Task ids sort by creation time: keep the newest when there are too many.
    const ids = [...this.lastIds.keys()].sort().reverse().slice(0, MAX_RESUME);
    return Object.fromEntries(ids.map((id) => [id, this.lastIds.get(id)]));
  }

  async connect() {
    if (!this.running || this.ws) return;
    if (navigator.onLine === false) {
      this.setMode("reconnecting"); // the "online" event brings it back
      return;
    }
    let token;
    try {
      token = await this.token();
    } catch (e) {
      this.retry();
      return;
    }
    if (!this.running || this.ws) return;
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const params = new URLSearchParams({ token, resume: "message" });
    let ws;
    try {
      ws = new WebSocket(`${proto}//${location.host}/v1/events?${params}`);
    } catch (e) {
      this.setMode("polling");
      return;
    }
    this.ws = ws;
    let settled = false;
    // Live once the server has said something, or kept the socket open for a moment (it
    // authenticates after accepting, so an open socket alone proves little).
    const settle = () => {
      if (settled || this.ws !== ws) return;
      settled = true;
      clearTimeout(this.settleTimer);
      this.failures = 0;
      this.setMode("live");
      if (this.dropped) {
        this.dropped = false;
        this.onResumed();
      }
    };
    ws.onopen = () => {
      ws.send(JSON.stringify({ type: "resume", after: this.resumeList() }));
      this.watchSilence();
      this.settleTimer = setTimeout(settle, SETTLE_MS);
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      settle();
      this.watchSilence();
      this.receive(ev.data);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      clearTimeout(this.silenceTimer);
      clearTimeout(this.settleTimer);
      if (ev.code === 4401) this.dropToken();
      if (ev.code === 4400) this.resumeRefused = true; // resume afresh: snapshots only
      this.retry();
    };
  }

  receive(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (e) {
      return;
    }
    const id = msg.task_id;
    if (!id || msg.type === "ping") return;
    if (msg.type === "end" || msg.type === "not_found") {
      this.lastIds.delete(id); // nothing more will come: not resumed again
    } else if (msg.id) {
      const last = this.lastIds.get(id);
      if (last !== undefined && compareIds(msg.id, last) <= 0 && msg.type !== "snapshot") return;
      if (last === undefined || compareIds(msg.id, last) > 0) this.lastIds.set(id, msg.id);
    }
    this.onMessage(msg);
  }

  watchSilence() {
    clearTimeout(this.silenceTimer);
    this.silenceTimer = setTimeout(() => this.drop(), SILENCE_MS);
  }

  closeSocket() {
    const ws = this.ws;
    this.ws = null;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = null;
    try {
      ws.close(1000);
    } catch (e) {
      /* already closed */
    }
  }

  /** The socket is unusable (offline, silent): close it and try again. */
  drop() {
    if (!this.running || !this.ws) return;
    clearTimeout(this.silenceTimer);
    clearTimeout(this.settleTimer);
    this.closeSocket();
    this.retry();
  }

  retry() {
    if (!this.running) return;
    this.dropped = true;
    this.failures += 1;
    this.setMode(this.failures > 2 ? "polling" : "reconnecting");
    const base = Math.min(BACKOFF_FIRST_MS * 2 ** Math.min(this.failures - 1, 5), BACKOFF_MAX_MS);
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.connect(), base * (0.75 + Math.random() * 0.5));
  }

  reconnectNow() {
    if (!this.running || this.ws || typeof WebSocket !== "function") return;
    clearTimeout(this.retryTimer);
    this.failures = 0;
    this.connect();
  }
}
