// The Mission Control dashboard: a plain ES module served by the service itself.
// Every piece of data reaches the page through textContent or attributes, never as HTML.

const API = "/api/mission-control";
const KEY_STORAGE = "mc.apiKey";
const STATUSES = [
  ["pending", "Pending"], ["queued", "Queued"], ["running", "Running"], ["awaiting_input", "Needs input"], ["review", "Review"],
  ["done", "Done"], ["failed", "Failed"], ["cancelled", "Cancelled"],
];
const ACTIVE = new Set(["running", "awaiting_input"]);
const CARDS_PER_COLUMN = 200; // two pages of the board
const PAGE = 100; // tasks per page of the board; "Load more" reads the next
const FEED_LIMIT = 150;
const FEED_HISTORY = 60; // events before the page opened that the feed starts with
const LOG_PAGE = 50;
const OVERVIEW_EVERY_MS = 5000;
const PRESENCE_EVERY_MS = 30000;
const RECONNECT_MS = 3000;
const INLINE_ARTIFACT_BYTES = 64 * 1024;

const FEED_PRESENCE = "mc.feedPresence"; // localStorage: "1" when the feed shows presence rows
const NOTIFY = "mc.notify"; // localStorage: "1" when this browser shows notifications
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const UNREACHABLE = "The server cannot be reached. Check that it is running, then try again.";

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

/** "Chrome on Linux", from the user agent: how a person tells their browsers apart. */
function browserName() {
  const ua = navigator.userAgent;
  const browser = /Edg\//.test(ua) ? "Edge" : /Firefox\//.test(ua) ? "Firefox" : /Chrome\//.test(ua) ? "Chrome"
    : /Safari\//.test(ua) ? "Safari" : "Browser";
  const os = /Android/.test(ua) ? "Android" : /iPhone|iPad/.test(ua) ? "iOS" : /Windows/.test(ua) ? "Windows"
    : /Mac OS X/.test(ua) ? "macOS" : /CrOS/.test(ua) ? "ChromeOS" : /Linux/.test(ua) ? "Linux" : "";
  return os ? `${browser} on ${os}` : browser;
}

/** This tab's device id, which is also its name: "Chrome on Linux · tab 2 · k3f9". Tabs are counted
 * per browser (localStorage); the short tag of this browser keeps two people's "tab 1" on one task
 * apart, since presence is kept per task and device. A reload keeps the tab's id (sessionStorage). */
function tabDevice() {
  const kept = sessionStorage.getItem("mc.deviceId");
  if (kept) return kept;
  const tab = Number(localStorage.getItem("mc.tabs") || 0) + 1;
  localStorage.setItem("mc.tabs", String(tab));
  const tag = localStorage.getItem("mc.browserTag") || crypto.randomUUID().slice(0, 4);
  localStorage.setItem("mc.browserTag", tag);
  return `${browserName()} · tab ${tab} · ${tag}`;
}

/** A device as a person knows it: the dashboard's own ids are names; a bare UUID (a script's) is cut short. */
const deviceLabel = (id) => (UUID.test(id) ? `device ${id.slice(0, 8)}` : id);

const state = {
  key: sessionStorage.getItem(KEY_STORAGE),
  deviceId: tabDevice(),
  me: null, // {user, scopes, projectId}: what this key may do (GET /me)
  tasks: new Map(),
  names: new Map(), // task id -> its name, for feed rows of tasks not on the board
  totalTasks: 0,
  loaded: 0, // tasks read so far by pages of the board's query
  filters: { search: "", status: "", agentId: "", desktopId: "", projectId: "", archived: false },
  approvals: [],
  agents: new Map(),
  desktops: [],
  projects: [],
  overview: null,
  view: "board",
  lastPosition: 0,
  lastEventAt: 0,
  source: null,
  timers: [],
  createKey: null, // the Idempotency-Key of the form's submission, kept until it succeeds or the form changes
  deviceRegistered: null, // a promise: this tab registered as a browser device (before it marks presence)
  logAfter: null, // the audit view's page: the position its first event follows
  panel: null, // the open task: {taskId, runId, positions (of the events shown), presence (timer)}
};
sessionStorage.setItem("mc.deviceId", state.deviceId);

/** What the key may do: `admin` implies every scope. */
const can = (scope) => !!state.me && (state.me.scopes.includes("admin") || state.me.scopes.includes(scope));

// --- DOM -----------------------------------------------------------------------------

/** An element with properties and children; strings become text nodes, so nothing is parsed as HTML. */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Replaces an element's children, skipping the absent ones (null, undefined, false). */
function fill(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function toast(message, kind = "info") {
  const el = h("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  $(".toasts").append(el);
  setTimeout(() => el.remove(), kind === "error" ? 7000 : 3500);
}

function ago(iso) {
  if (!iso) return "";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 5) return "just now";
  if (seconds < 60) return `${Math.floor(seconds)}s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ago`;
  return new Date(iso).toLocaleDateString();
}

function clock(iso) {
  const date = new Date(iso);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

/** A time with its date, "2 Dec 14:03:07.120" (the year too when it is not this one): a timeline spans days. */
function stamp(iso) {
  const date = new Date(iso);
  const sameYear = date.getFullYear() === new Date().getFullYear();
  const day = date.toLocaleDateString(undefined, { day: "numeric", month: "short", ...(sameYear ? {} : { year: "numeric" }) });
  return `${day} ${clock(iso)}`;
}

const shortId = (id) => (id ? id.slice(0, 8) : "");
const taskName = (task) => task.title || task.content.split("\n")[0].slice(0, 80);
const statusLabel = (status) => (STATUSES.find(([s]) => s === status) || [status, status])[1];

/** Tokens and cost, as the contract's `usage` gives them; null when the server reports none. */
function usageText(usage) {
  if (!usage) return null;
  const tokens = (usage.promptTokens || 0) + (usage.completionTokens || 0);
  const parts = [`${tokens.toLocaleString()} tokens (${(usage.promptTokens || 0).toLocaleString()} in, ${(usage.completionTokens || 0).toLocaleString()} out)`];
  parts.push(`$${usage.costUsd || "0"}`);
  if (usage.unpricedRuns) parts.push(`${usage.unpricedRuns} run${usage.unpricedRuns === 1 ? "" : "s"} unpriced`);
  return parts.join(" · ");
}

/** Runs `fn` once per animation frame however often it is asked for. */
function coalesced(fn) {
  let queued = false;
  return () => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; fn(); });
  };
}

/** Runs `fn` at most once per `ms`, however often it is asked for, and always after the last ask. */
function throttled(fn, ms) {
  let timer = null;
  return () => {
    if (timer === null) timer = setTimeout(() => { timer = null; fn(); }, ms);
  };
}

/** Runs `fn(key)` once, `ms` after the last request for that key. */
function debounced(fn, ms) {
  const timers = new Map();
  return (key = "") => {
    clearTimeout(timers.get(key));
    timers.set(key, setTimeout(() => { timers.delete(key); fn(key); }, ms));
  };
}

// --- HTTP ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail, code) {
    super(detail);
    this.status = status;
    this.code = code;
  }
}

async function request(method, path, body, extraHeaders = {}) {
  const headers = { Authorization: `Bearer ${state.key}`, ...extraHeaders };
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(API + path, init);
  } catch {
    throw new ApiError(0, UNREACHABLE, "unreachable"); // fetch's own words ("Failed to fetch") tell a person nothing
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    let code;
    try { ({ detail = detail, code } = await response.json()); } catch { /* not JSON */ }
    if (response.status === 401 && state.source) signOut("The key was refused; sign in again.");
    throw new ApiError(response.status, detail, code);
  }
  return response;
}

async function api(method, path, body, headers) {
  const response = await request(method, path, body, headers);
  return response.status === 204 ? null : response.json();
}

/** Runs an action from a button, showing its failure instead of throwing it. */
async function act(what, fn) {
  try {
    return await fn();
  } catch (error) {
    toast(`${what}: ${error.message}`, "error");
    return undefined;
  }
}

// --- sign-in -------------------------------------------------------------------------

function showSignIn(message = "") {
  $("#app").hidden = true;
  $("#signin").hidden = false;
  $("[data-testid=signin-error]").textContent = message;
  $("#signin-key").focus();
}

$("[data-testid=signin-form]").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("#signin-key").value.trim();
  state.key = key;
  try {
    state.me = await api("GET", "/me");
  } catch (error) {
    state.key = null;
    const words = { 401: "That key is not known, or it was revoked.", 403: "That key lacks the task:read scope the dashboard needs." };
    $("[data-testid=signin-error]").textContent = words[error.status] || error.message;
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  $("#signin-key").value = "";
  start();
});

function signOut(message = "") {
  closePanel(); // while the key is still at hand to clear this device's presence
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = null;
  state.me = null;
  if (state.source) state.source.close();
  state.source = null;
  state.timers.forEach(clearInterval);
  state.timers = [];
  state.deviceRegistered = null;
  // Another key may see other projects: nothing of this one's view survives it.
  state.tasks.clear();
  state.names.clear();
  state.approvals = [];
  cards.clear();
  $("[data-testid=board]").replaceChildren();
  $(".feed-list").replaceChildren();
  showSignIn(message);
}

$("[data-action=signout]").addEventListener("click", () => signOut());

// --- start ---------------------------------------------------------------------------

/** Shows each user only what their key can do: a form it cannot submit, a button it cannot press, is not offered. */
function applyScopes() {
  for (const el of $$("[data-needs]")) el.hidden = !can(el.dataset.needs);
  const { user, scopes, projectId } = state.me;
  $("[data-testid=whoami]").textContent = `${user} · ${scopes.join(", ")}`;
  $("[data-testid=whoami]").title = projectId ? `This key acts within project ${projectId} only` : "";
  const missing = [["task:write", "create or change tasks"], ["approval:write", "decide approvals"]].filter(([s]) => !can(s));
  const note = $("[data-testid=readonly-note]");
  note.hidden = !missing.length;
  note.textContent = missing.length ? `This key (${scopes.join(", ")}) can watch but not ${missing.map(([, w]) => w).join(" or ")}.` : "";
  if (!can("audit:read") && state.view === "audit") showView("board");
}

async function start() {
  $("#signin").hidden = true;
  $("#app").hidden = false;
  buildBoard();
  try {
    state.me = await api("GET", "/me");
    applyScopes();
    // The head is read before the snapshots, so the stream replays whatever lands meanwhile.
    const overview = await api("GET", "/overview");
    renderOverview(overview);
    state.snapshotHead = overview.log.head;
    // The stream starts a little in the past: the feed opens with recent history, not empty.
    state.lastPosition = Math.max(0, overview.log.head - FEED_HISTORY);
    await Promise.all([loadProjects(), loadAgents(), loadDesktops()]);
    await Promise.all([loadTasks(), loadApprovals()]);
  } catch (error) {
    if (error.status === 401) signOut("The key was refused; sign in again.");
    else toast(`Could not load the dashboard: ${error.message}`, "error");
    return;
  }
  registerDevice(); // task:read is enough: a key that cannot mark presence is still told of its tasks
  renderNotifyToggle();
  connect();
  state.timers.push(setInterval(refreshOverview, OVERVIEW_EVERY_MS));
  state.timers.push(setInterval(renderConnection, 1000));
  state.timers.push(setInterval(renderTimes, 15000));
}

/** This tab as a `browser` device of its user: presence is marked from a registered device, and a
 * browser device is told of notifications on the stream. */
function registerDevice() {
  state.deviceRegistered = api("POST", "/devices", { deviceId: state.deviceId, kind: "browser" }).catch(() => {});
  return state.deviceRegistered;
}

// --- views -----------------------------------------------------------------------------

function showView(view) {
  state.view = view;
  for (const tab of $$(".view-tab")) tab.setAttribute("aria-pressed", String(tab.dataset.view === view));
  for (const panel of $$("[data-view-panel]")) panel.hidden = panel.dataset.viewPanel !== view;
  if (view === "agents") loadAgents().catch(() => {});
  if (view === "desktops") loadDesktops().catch(() => {});
  if (view === "audit" && state.logAfter === null) loadLog(Math.max(0, (state.overview ? state.overview.log.head : 0) - LOG_PAGE));
}
for (const tab of $$(".view-tab")) tab.addEventListener("click", () => showView(tab.dataset.view));

// --- keyboard ------------------------------------------------------------------------------

document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") { closePanel(); return; }
  const typing = e.target.closest("input, textarea, select, [contenteditable]");
  if (typing || e.ctrlKey || e.metaKey || e.altKey || $("#app").hidden) return;
  if (e.key === "/") {
    e.preventDefault();
    showView("board");
    $("[data-testid=search]").focus();
  } else if (e.key === "n" && can("task:write")) {
    e.preventDefault();
    showView("board");
    $(".composer").open = true;
    $("[data-testid=create-form] [name=title]").focus();
  }
});

// --- the live stream -------------------------------------------------------------------

function connect() {
  if (state.source) state.source.close();
  // EventSource cannot send headers, hence the key in the query; it resends Last-Event-ID itself on reconnect.
  const query = new URLSearchParams({ access_token: state.key, after: String(state.lastPosition) });
  const source = new EventSource(`${API}/activity/stream?${query}`);
  state.source = source;
  state.connection = "connecting";
  source.onopen = () => { state.connection = "live"; renderConnection(); };
  source.onmessage = (message) => onEvent(JSON.parse(message.data));
  source.onerror = () => {
    if (state.source !== source) return;
    if (source.readyState === EventSource.CLOSED) {
      // The server answered with an error (a restart, a 503): start again from the last event seen.
      state.connection = "offline";
      state.retryAt = Date.now() + RECONNECT_MS;
      setTimeout(() => { if (state.source === source && state.key) connect(); }, RECONNECT_MS);
    } else {
      state.connection = "reconnecting";
    }
    renderConnection();
  };
  renderConnection();
}

function onEvent(event) {
  if (event.position <= state.lastPosition) return;
  state.lastPosition = event.position;
  state.lastEventAt = Date.now();
  const [kind] = event.stream.split("-", 1);
  const id = event.stream.slice(kind.length + 1);
  const p = event.payload || {};
  if (event.type === "task.created") state.names.set(p.taskId || id, taskName(p));
  addToFeed(event);
  if (event.position <= state.snapshotHead) return; // history: the snapshots already hold it
  if (event.type === "notification.sent") notify(event);
  if (kind === "task" || kind === "presence") refreshTask(id);
  if (event.type === "task.queued" || event.type === "task.updated" || (QUEUE_MOVES.has(event.type) && queuedCount() > 0)) refreshQueue();
  if (event.type.startsWith("approval.") || event.type === "task.review") refreshApprovals();
  if (kind === "agent") refreshAgents();
  if (kind === "desktop") refreshDesktops();
  if (state.panel && state.panel.taskId === id && (event.type === "task.started" || ENDINGS.has(event.type))) refreshRuns();
  if (state.panel && state.panel.taskId === id && kind === "task") panelEvent(event);
  refreshOverview.soon();
  if (state.overview && event.position > state.overview.log.head) $("[data-stat=head]").textContent = `#${event.position}`;
  renderConnection();
}

function renderConnection() {
  const el = $("[data-testid=connection]");
  const head = state.overview ? state.overview.log.head : 0;
  // An audit:read key receives every event, so "behind" can be measured exactly; others see a part of the log.
  const behind = can("audit:read") ? Math.max(0, head - state.lastPosition) : 0;
  let view = state.connection || "connecting";
  let text = { connecting: "Connecting…", live: "Live", reconnecting: "Reconnecting…", offline: "Disconnected" }[view];
  // Events land between two overview polls all the time; only a lag that lasts is shown.
  state.behindSince = behind > 0 ? state.behindSince || Date.now() : 0;
  if (view === "live" && behind > 0 && Date.now() - state.behindSince > 1500) {
    view = "behind";
    text = `Catching up · ${behind} behind`;
  } else if (view === "offline") {
    const seconds = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
    text = `Disconnected · retrying${seconds ? ` in ${seconds}s` : "…"}`;
  }
  el.dataset.state = view;
  $(".connection-text", el).textContent = text;
  el.title = `Last event #${state.lastPosition}` + (state.lastEventAt ? `, ${ago(new Date(state.lastEventAt).toISOString())}` : "");
}

// --- notifications -------------------------------------------------------------------------

function renderNotifyToggle() {
  const button = $("[data-testid=notify-toggle]");
  const supported = "Notification" in window;
  const on = supported && localStorage.getItem(NOTIFY) === "1" && Notification.permission === "granted";
  button.hidden = !supported;
  button.setAttribute("aria-pressed", String(on));
  button.textContent = on ? "Notify: on" : "Notify: off";
  button.title = supported && Notification.permission === "denied"
    ? "This browser blocks notifications for this page: allow them in its site settings."
    : "Tell me in this browser when a task I watch needs me or ends, while this tab is in the background.";
}

$("[data-testid=notify-toggle]").addEventListener("click", async () => {
  if (localStorage.getItem(NOTIFY) === "1") localStorage.removeItem(NOTIFY);
  else if ((await Notification.requestPermission()) === "granted") localStorage.setItem(NOTIFY, "1");
  else toast("This browser does not allow notifications for this page.", "error");
  renderNotifyToggle();
});

/** A `notification.sent` for this tab: the browser's notification while the tab is in the
 * background, a toast while it is in front (the stream shows a user's notifications to them alone). */
function notify(event) {
  const p = event.payload || {};
  if (p.deviceId !== state.deviceId) return;
  const text = p.text || `${(p.cause && p.cause.type) || "an event"} on ${state.names.get(p.taskId) || "a task"}`;
  const wanted = localStorage.getItem(NOTIFY) === "1" && "Notification" in window && Notification.permission === "granted";
  if (document.visibilityState === "hidden" && wanted) {
    const shown = new Notification("Mission Control", { body: text, tag: p.deliveryId });
    shown.onclick = () => { window.focus(); if (p.taskId) openPanel(p.taskId); shown.close(); };
  } else {
    toast(text);
  }
}

// --- overview ----------------------------------------------------------------------------

async function refreshOverview() {
  try {
    renderOverview(await api("GET", "/overview"));
    await loadDesktops(); // desktop events reach only keys that see everything: polled with the figures
  } catch { /* the next poll tries again */ }
}
refreshOverview.soon = throttled(refreshOverview, 800);

function renderOverview(overview) {
  state.overview = overview;
  const stat = (name, value) => { $(`[data-stat=${name}]`).textContent = value; };
  const running = overview.tasks.running + overview.tasks.awaiting_input;
  stat("runs", `${running} / ${overview.maxConcurrent}`);
  stat("agents", overview.activeAgents);
  stat("desktops", overview.activeDesktops);
  stat("cpu", `${overview.resources.cpu.toFixed(0)}%`);
  const memory = overview.resources.memory;
  stat("memory", `${(memory.used / 1024).toFixed(1)} / ${(memory.total / 1024).toFixed(1)} GiB`);
  stat("head", `#${Math.max(overview.log.head, state.lastPosition)}`);
  $("[data-usage]").hidden = !overview.usage;
  if (overview.usage) {
    stat("cost", `$${overview.usage.costUsd}`);
    $("[data-stat=cost]").title = usageText(overview.usage);
  }
  $("[data-stat=head]").title = `${overview.log.streams} streams`;
  $("[data-meter=cpu]").style.width = `${Math.min(100, overview.resources.cpu)}%`;
  $("[data-meter=memory]").style.width = `${Math.min(100, memory.percent)}%`;
  for (const [name, percent] of [["cpu", overview.resources.cpu], ["memory", memory.percent]]) {
    $(`[data-meter=${name}]`).dataset.level = percent > 85 ? "high" : percent > 60 ? "mid" : "low";
  }
  renderConnection();
}

// --- tasks and the board ---------------------------------------------------------------

/** The board's query: its filters as GET /tasks parameters. */
function taskQuery(offset) {
  const f = state.filters;
  const query = new URLSearchParams({ limit: String(PAGE), offset: String(offset), archived: f.archived ? "true" : "false" });
  for (const name of ["search", "status", "agentId", "desktopId", "projectId"]) if (f[name]) query.set(name, f[name]);
  return query;
}

/** Whether a task belongs on the board as filtered: live events bring tasks the query never read. */
function matches(task) {
  const f = state.filters;
  const search = f.search.toLowerCase();
  return !!task.archived === f.archived
    && (!f.status || task.status === f.status)
    && (!f.agentId || task.agentId === f.agentId)
    && (!f.desktopId || task.desktopId === f.desktopId)
    && (!f.projectId || task.projectId === f.projectId)
    && (!search || `${task.title || ""}\n${task.content}`.toLowerCase().includes(search));
}

const filtering = () => Object.entries(state.filters).some(([, v]) => v);

async function loadTasks(more = false) {
  const offset = more ? state.loaded : 0;
  const query = taskQuery(offset);
  const response = await request("GET", `/tasks?${query}`);
  if (query.toString() !== taskQuery(offset).toString()) return; // the filters moved on meanwhile
  state.totalTasks = Number(response.headers.get("X-Total-Count") || 0);
  if (!more) state.tasks.clear();
  const page = await response.json();
  for (const task of page) {
    state.tasks.set(task.id, task);
    state.names.set(task.id, taskName(task));
  }
  state.loaded = offset + page.length;
  renderBoard();
  renderDesktops(); // the names of the tasks they run
}

// Another task's start or ending moves every queued task's position: the queue is read again whole.
const QUEUE_MOVES = new Set(["task.started", "task.failed", "task.cancelled", "task.archived"]);
const queuedCount = () => [...state.tasks.values()].filter((t) => t.status === "queued").length;
const refreshQueue = debounced(async () => {
  try {
    for (const task of await api("GET", "/tasks?status=queued&sort=queue&limit=500")) {
      if (state.tasks.has(task.id) || matches(task)) state.tasks.set(task.id, task);
    }
  } catch { return; }
  renderBoard();
}, 300);

const refreshTask = debounced(async (taskId) => {
  try {
    const task = await api("GET", `/tasks/${taskId}`);
    state.names.set(taskId, taskName(task));
    renameFeedRows(taskId);
    const shown = state.tasks.has(taskId);
    if (matches(task)) {
      if (!shown) state.totalTasks += 1;
      state.tasks.set(taskId, task);
    } else if (shown) {
      state.tasks.delete(taskId);
      state.totalTasks = Math.max(0, state.totalTasks - 1);
    }
    if (state.panel && state.panel.taskId === taskId) state.panel.task = task;
    if (state.approvals.some((a) => a.taskId === taskId)) renderApprovals(); // its deliverable
    settleCreateError(task);
  } catch (error) {
    if (error.status !== 404) return;
    state.tasks.delete(taskId);
  }
  renderBoard();
  if (state.panel && state.panel.taskId === taskId) renderPanel();
}, 120);

function buildBoard() {
  const board = $("[data-testid=board]");
  if (board.childElementCount) return;
  for (const [status, label] of STATUSES) {
    board.append(h("section", { class: "column", dataset: { status }, "data-testid": `column-${status}`, "aria-label": label },
      h("header", { class: "column-head" },
        h("span", { class: "status-dot", "aria-hidden": "true" }), h("h3", {}, label),
        h("span", { class: "count", "data-count": status }, "0")),
      h("div", { class: "column-body", tabindex: "0", role: "group", "aria-label": `${label} tasks` })));
  }
  const statusFilter = $("[data-testid=status-filter]");
  if (statusFilter.options.length === 1) {
    statusFilter.append(...STATUSES.map(([status, label]) => h("option", { value: status }, label)));
  }
}

const cards = new Map(); // task id -> its card, reused across renders

function card(task) {
  let el = cards.get(task.id);
  if (!el) {
    // Only a new card animates in: re-rendering moves cards, which would restart the animation.
    el = h("article", {
      class: "card new", tabindex: "0", "data-testid": "task-card", dataset: { taskId: task.id },
      onclick: () => openPanel(task.id),
      onkeydown: (e) => { if (e.key === "Enter") openPanel(task.id); },
      onanimationend: () => el.classList.remove("new"),
    });
    cards.set(task.id, el);
  }
  const agent = state.agents.get(task.agentId);
  const when = task.completedAt || task.startedAt || task.createdAt;
  el.dataset.status = task.status;
  el.setAttribute("aria-label", `${taskName(task)}, ${statusLabel(task.status)}`);
  fill(el,
    h("div", { class: "card-title" }, taskName(task)),
    task.title ? h("div", { class: "card-content" }, task.content.slice(0, 140)) : null,
    task.status === "failed" && task.error ? h("div", { class: "card-error" }, task.error.slice(0, 140)) : null,
    ACTIVE.has(task.status) ? h("div", { class: "progress" }, h("span")) : null,
    h("footer", { class: "card-meta" },
      h("span", { class: "chip type" }, task.type),
      agent ? h("span", { class: "chip" }, agent.name) : null,
      task.requiresApproval ? h("span", { class: "chip needs-approval", title: "Requires approval" }, "approval") : null,
      task.priority !== 5 ? h("span", { class: "chip", title: "Priority" }, `P${task.priority}`) : null,
      task.queuePosition ? h("span", { class: "chip queue", title: "Place in the queue", "data-testid": "queue-position" }, `#${task.queuePosition}`) : null,
      task.watchers.length ? h("span", { class: "chip watch", title: `Watched on ${task.watchers.map(deviceLabel).join(", ")}` }, `◉ ${task.watchers.length}`) : null,
      task.usage && task.usage.costUsd && task.usage.costUsd !== "0" ? h("span", { class: "chip", title: usageText(task.usage) }, `$${task.usage.costUsd}`) : null,
      h("time", { class: "ago", datetime: when, title: new Date(when).toLocaleString() }, ago(when))),
  );
  return el;
}

const renderBoard = coalesced(() => {
  const columns = new Map(STATUSES.map(([s]) => [s, []]));
  for (const task of state.tasks.values()) columns.get(task.status)?.push(task);
  const recency = (t) => t.completedAt || t.startedAt || t.createdAt;
  const widths = [];
  for (const [status, tasks] of columns) {
    tasks.sort(status === "queued" ? (a, b) => (a.queuePosition ?? 1e9) - (b.queuePosition ?? 1e9)
      : status === "pending" ? (a, b) => b.priority - a.priority || a.createdAt.localeCompare(b.createdAt)
      : (a, b) => recency(b).localeCompare(recency(a)));
    const column = $(`[data-testid=column-${status}]`);
    $(`[data-count=${status}]`, column).textContent = tasks.length;
    // An empty column folds to a strip, so the others keep room for their titles.
    column.dataset.empty = String(tasks.length === 0);
    widths.push(tasks.length ? "minmax(var(--column-min), 1fr)" : "var(--column-folded)");
    const shown = tasks.slice(0, CARDS_PER_COLUMN).map(card);
    const more = tasks.length - shown.length;
    fill($(".column-body", column),
      ...shown,
      more > 0 ? h("p", { class: "more muted" }, `+ ${more} more`) : null,
      tasks.length === 0 ? h("p", { class: "empty" }, "Nothing here") : null,
    );
  }
  for (const id of cards.keys()) if (!state.tasks.has(id)) cards.delete(id);
  const board = $("[data-testid=board]");
  board.style.gridTemplateColumns = widths.join(" ");
  const total = Math.max(state.totalTasks, state.tasks.size);
  const what = state.filters.archived ? "archived tasks" : "tasks";
  $("[data-testid=board-status] [data-field=shown]").textContent = !total
    ? (filtering() ? `No ${what} match these filters.` : state.filters.archived ? "No task is archived." : can("task:write") ? "No task yet: create one above." : "No task yet.")
    : state.tasks.size < total ? `Showing ${state.tasks.size} of ${total} ${what}` : `${total} ${what}`;
  $("[data-testid=load-more]").hidden = state.loaded >= state.totalTasks;
});

$("[data-testid=load-more]").addEventListener("click", () => act("Load more", () => loadTasks(true)));

function renderTimes() {
  for (const el of document.querySelectorAll("time.ago")) el.textContent = ago(el.getAttribute("datetime"));
}

// --- filters and projects ------------------------------------------------------------------

const reloadTasks = debounced(() => loadTasks().catch((e) => toast(`Could not load the tasks: ${e.message}`, "error")), 250);

$("[data-testid=filters]").addEventListener("submit", (e) => e.preventDefault());
$("[data-testid=filters]").addEventListener("input", (event) => {
  const fields = event.currentTarget.elements;
  state.filters = {
    search: fields.search.value.trim(), status: fields.status.value, agentId: fields.agentId.value,
    desktopId: fields.desktopId.value, projectId: fields.projectId.value, archived: fields.archived.checked,
  };
  reloadTasks();
});

async function loadProjects() {
  state.projects = await api("GET", "/projects");
  const select = $("[data-testid=project-switcher]");
  const pinned = state.me.projectId; // a key issued for one project sees that one alone
  select.replaceChildren(
    pinned ? null : h("option", { value: "" }, "All projects"),
    ...state.projects.map((p) => h("option", { value: p.id }, p.name)),
  );
  if (pinned) {
    select.value = pinned;
    state.filters.projectId = pinned;
  }
  select.disabled = !!pinned || state.projects.length < 2;
}

// --- agents ------------------------------------------------------------------------------

/** The agents that can run a task of this type, best first: a command on a shell, a prompt on a model before the echo. */
function agentsFor(type) {
  const rank = type === "command" ? { shell: 0, echo: 1 } : { openai: 0, exec: 1, echo: 2 };
  return [...state.agents.values()]
    .filter((a) => a.status === "active" && a.kind in rank)
    .sort((a, b) => rank[a.kind] - rank[b.kind] || a.name.localeCompare(b.name));
}

function renderAgentOptions() {
  const form = $("[data-testid=create-form]");
  const type = form.elements.type.value;
  const select = $("[data-testid=agent-select]");
  const chosen = select.value;
  const fit = agentsFor(type);
  // A person's own pick is kept while it fits; a default gives way to a better agent that appears.
  const keep = fit.some((a) => a.id === chosen) && select.dataset.type === type && select.dataset.picked === chosen;
  select.dataset.type = type;
  select.replaceChildren(...fit.map((a) => h("option", { value: a.id }, `${a.name} · ${a.kind}`)));
  if (keep) select.value = chosen;
  const hint = $("[data-testid=agent-hint]");
  const agent = state.agents.get(select.value);
  const words = !fit.length ? `No active agent can run a ${type} task: register or resume one under Agents.`
    : type === "command" && agent && agent.kind === "echo"
      ? "No shell agent is registered, so nothing can run this command: the echo agent only writes it back. An admin can register a shell agent under Agents."
      : "";
  hint.textContent = words;
  hint.hidden = !words;
}
$("[data-testid=create-form] [name=type]").addEventListener("change", renderAgentOptions);
$("[data-testid=agent-select]").addEventListener("change", (event) => {
  event.target.dataset.picked = event.target.value;
  renderAgentOptions();
});

async function loadAgents() {
  const agents = await api("GET", "/agents");
  state.agents = new Map(agents.map((a) => [a.id, a]));
  renderAgentOptions();
  const filter = $("[data-testid=agent-filter]");
  const chosen = filter.value;
  filter.replaceChildren(h("option", { value: "" }, "All"), ...agents.map((a) => h("option", { value: a.id }, a.name)));
  filter.value = chosen;
  renderAgents();
  renderBoard();
}
const refreshAgents = debounced(() => loadAgents().catch(() => {}), 300);

function renderAgents() {
  $("[data-count=agents]").textContent = state.agents.size;
  const rows = [...state.agents.values()].map((agent) => {
    // A shell agent runs commands on the server's machine: only admin may change it.
    const mayChange = can("agent:write") && (agent.kind !== "shell" || can("admin"));
    const change = (verb) => act(verb === "pause" ? "Pause" : "Resume", async () => {
      await api("POST", `/agents/${agent.id}/${verb}`);
      await loadAgents();
    });
    return h("tr", { "data-testid": "agent", dataset: { agentId: agent.id, status: agent.status } },
      h("th", { scope: "row" }, agent.name),
      h("td", { class: "mono" }, agent.kind),
      h("td", {}, h("span", { class: "badge", dataset: { status: agent.status === "active" ? "done" : agent.status === "paused" ? "awaiting_input" : "failed" } }, agent.status)),
      h("td", { class: "small", "data-field": "usage" }, usageText(agent.usage) || "—"),
      h("td", { class: "actions-cell" },
        mayChange && agent.status === "active" ? h("button", { type: "button", class: "secondary small-button", onclick: () => change("pause") }, `Pause ${agent.name}`) : null,
        mayChange && agent.status === "paused" ? h("button", { type: "button", class: "secondary small-button", onclick: () => change("resume") }, `Resume ${agent.name}`) : null));
  });
  fill($("[data-testid=agent-table] tbody"), rows.length ? rows : h("tr", {}, h("td", { colspan: "5", class: "empty" }, "No agent yet.")));
}

$("[data-testid=agent-form]").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const error = $("[data-testid=agent-error]");
  error.textContent = "";
  const body = { name: form.elements.name.value.trim(), kind: form.elements.kind.value };
  if (form.elements.config.value.trim()) {
    try { body.config = JSON.parse(form.elements.config.value); } catch { error.textContent = "Config must be a JSON object."; return; }
  }
  try {
    const agent = await api("POST", "/agents", body);
    form.reset();
    toast(`Agent ${agent.name} registered.`, "success");
    await loadAgents();
  } catch (e) {
    error.textContent = e.message;
  }
});

// --- desktops ------------------------------------------------------------------------------

async function loadDesktops() {
  state.desktops = await api("GET", "/desktops");
  renderDesktops();
}
const refreshDesktops = debounced(() => loadDesktops().catch(() => {}), 300);

function renderDesktops() {
  const desktops = state.desktops;
  $("[data-count=desktops]").textContent = desktops.filter((d) => d.status === "online").length;
  const filter = $("[data-testid=desktop-filter]");
  const chosen = filter.value;
  const names = desktops.map((d) => d.id).join("|");
  if (filter.dataset.names !== names) {
    filter.dataset.names = names;
    filter.replaceChildren(h("option", { value: "" }, "All"), ...desktops.map((d) => h("option", { value: d.id }, d.id)));
    filter.value = chosen;
  }
  const list = $(".desktop-list");
  if (!desktops.length) {
    list.replaceChildren(h("li", { class: "empty" }, "No desktop: nothing can run."));
  } else {
    list.replaceChildren(...desktops.map((d) =>
      h("li", { class: "desktop", "data-testid": "desktop", dataset: { desktopId: d.id, status: d.status }, title: d.status },
        h("span", { class: "dot", "aria-hidden": "true" }),
        h("span", { class: "desktop-name" }, d.id),
        h("span", { class: "muted" }, `${d.busy}/${d.capacity}`),
        h("span", { class: "desktop-kinds" }, d.status === "online" ? d.agents.join(", ") : d.status),
        h("time", { class: "ago", datetime: d.lastSeenAt }, ago(d.lastSeenAt)),
        d.running.length ? h("span", { class: "desktop-running" }, ...d.running.map((runId) => {
          // `running` lists runs: the task shown is the one whose current run it is.
          const task = [...state.tasks.values()].find((t) => t.runId === runId);
          return task ? h("button", { type: "button", class: "link", onclick: () => openPanel(task.id) }, taskName(task))
            : h("span", { class: "muted mono" }, `run ${shortId(runId)}`);
        })) : null)));
  }
  const admin = can("admin");
  const desktopAction = (d, verb, label) => h("button", {
    type: "button", class: verb === "remove" ? "danger small-button" : "secondary small-button", "data-action": verb,
    onclick: () => act(label, async () => {
      await api(verb === "remove" ? "DELETE" : "POST", verb === "remove" ? `/desktops/${d.id}` : `/desktops/${d.id}/${verb}`);
      await loadDesktops();
    }),
  }, label);
  const rows = desktops.map((d) => h("tr", { "data-testid": "desktop-row", dataset: { desktopId: d.id, status: d.status } },
    h("th", { scope: "row", class: "mono" }, d.id),
    h("td", {}, h("span", { class: "badge", dataset: { status: d.status === "online" ? "done" : d.status === "draining" ? "awaiting_input" : "cancelled" } }, d.status)),
    h("td", { class: "small" }, d.agents.join(", ") || "—"),
    h("td", {}, `${d.busy}/${d.capacity}`),
    h("td", {}, h("time", { class: "ago", datetime: d.lastSeenAt, title: d.lastSeenAt }, ago(d.lastSeenAt))),
    h("td", { class: "mono small" }, d.version || "—"),
    h("td", { class: "actions-cell" },
      admin && d.status === "online" ? desktopAction(d, "drain", `Drain ${d.id}`) : null,
      admin && d.status === "draining" ? desktopAction(d, "resume", `Resume ${d.id}`) : null,
      admin && d.status === "offline" ? desktopAction(d, "remove", `Remove ${d.id}`) : null)));
  fill($("[data-testid=desktop-table] tbody"), rows.length ? rows : h("tr", {}, h("td", { colspan: "7", class: "empty" }, "No desktop: start one with mission-control worker.")));
}

// --- artifacts -----------------------------------------------------------------------------

/** A task's artifacts as a person reads them: text inline, images as images, other files as downloads.
 * The bytes need the key, so they are fetched and shown from a blob, never linked to directly. */
async function renderArtifacts(container, taskId, only) {
  const listed = await api("GET", `/tasks/${taskId}/artifacts`);
  const artifacts = only ? listed.filter((a) => only.includes(a.sha256)) : listed;
  const items = await Promise.all(artifacts.map(async (artifact) => {
    const label = `${artifact.name} · ${artifact.size.toLocaleString()} bytes`;
    const item = h("figure", { class: "artifact", "data-testid": "artifact", dataset: { sha256: artifact.sha256, direction: artifact.direction } });
    const type = artifact.contentType || "";
    const textual = type.startsWith("text/") || /json|xml|yaml|csv/.test(type);
    if ((textual && artifact.size <= INLINE_ARTIFACT_BYTES) || type.startsWith("image/")) {
      const blob = await (await request("GET", `/tasks/${taskId}/artifacts/${artifact.sha256}`)).blob();
      item.append(textual ? h("pre", { class: "deliverable" }, await blob.text())
        : h("img", { src: URL.createObjectURL(blob), alt: artifact.name, class: "artifact-image" }));
    }
    item.append(h("figcaption", {}, h("button", {
      type: "button", class: "link small", "data-action": "download",
      onclick: () => act("Download", async () => {
        const blob = await (await request("GET", `/tasks/${taskId}/artifacts/${artifact.sha256}`)).blob();
        const link = h("a", { href: URL.createObjectURL(blob), download: artifact.name });
        link.click();
        setTimeout(() => URL.revokeObjectURL(link.href), 10000);
      }),
    }, `Download ${label}`)));
    return item;
  }));
  fill(container, items);
  return items.length;
}

// --- approvals -----------------------------------------------------------------------------

async function loadApprovals() {
  state.approvals = await api("GET", "/approvals?status=pending");
  renderApprovals();
}
const refreshApprovals = debounced(() => loadApprovals().catch(() => {}), 150);

function renderApprovals() {
  const list = $(".tray-list");
  // The user's own tray, not the overview's count of every project's approvals.
  $("[data-count=approvals]").textContent = state.approvals.length;
  $("[data-stat=approvals]").textContent = state.approvals.length;
  $("[data-count=approvals]").dataset.hot = state.approvals.length > 0;
  if (!state.approvals.length) {
    list.replaceChildren(h("p", { class: "empty" }, "No deliverable is waiting for a decision."));
    return;
  }
  const drafts = new Map([...list.querySelectorAll("[data-approval-id]")].map((el) =>
    [el.dataset.approvalId, $("textarea", el) ? $("textarea", el).value : ""]));
  const shownArtifacts = new Map($$("[data-approval-id]", list).map((el) => [el.dataset.approvalId, $(".artifacts", el)]));
  const mayDecide = can("approval:write");
  list.replaceChildren(...state.approvals.map((approval) => {
    const task = state.tasks.get(approval.taskId);
    const feedback = mayDecide ? h("textarea", { rows: "2", placeholder: "Feedback (optional)", "aria-label": "Feedback" }) : null;
    if (feedback) feedback.value = drafts.get(approval.id) || "";
    const decide = (decision) => act(decision === "approve" ? "Approve" : "Reject", async () => {
      await api("POST", `/approvals/${approval.id}/resolve`, { decision, feedback: feedback.value || null });
      toast(decision === "approve" ? "Approved: the task is done." : "Rejected: the task failed.", "success");
      refreshApprovals();
      refreshTask(approval.taskId);
    });
    const title = approval.task ? (approval.task.title || approval.task.content.slice(0, 80)) : shortId(approval.taskId);
    let artifacts = null;
    if (approval.artifacts && approval.artifacts.length) {
      artifacts = shownArtifacts.get(approval.id) || h("div", { class: "artifacts" });
      if (!artifacts.dataset.loaded) {
        artifacts.dataset.loaded = "1";
        renderArtifacts(artifacts, approval.taskId, approval.artifacts).catch(() => { artifacts.textContent = "The artifacts could not be read."; });
      }
    }
    return h("article", { class: "approval", "data-testid": "approval", dataset: { approvalId: approval.id, taskId: approval.taskId }, "aria-label": title },
      h("div", { class: "approval-head" },
        h("button", { type: "button", class: "link", onclick: () => openPanel(approval.taskId) }, title),
        h("time", { class: "ago", datetime: approval.createdAt }, ago(approval.createdAt))),
      task && task.result ? h("pre", { class: "deliverable", tabindex: "0", role: "region", "aria-label": "Deliverable" }, task.result.slice(0, 600)) : null,
      artifacts,
      feedback,
      mayDecide ? h("div", { class: "approval-actions" },
        h("button", { type: "button", class: "danger", "data-action": "reject", onclick: () => decide("reject") }, "Reject"),
        h("button", { type: "button", class: "success", "data-action": "approve", onclick: () => decide("approve") }, "Approve"))
        : h("p", { class: "muted small" }, "Your key cannot decide approvals (it lacks approval:write)."));
  }));
}

// --- the activity feed -----------------------------------------------------------------------

function describe(event) {
  const p = event.payload || {};
  switch (event.type) {
    case "task.created": return `${p.type} · priority ${p.priority}${p.requiresApproval ? " · needs approval" : ""}`;
    case "task.output": return `${p.stream}: ${(p.chunk || "").replace(/\s+/g, " ").slice(0, 80)}`;
    case "task.failed": return p.error;
    case "task.cancelled": return p.reason || "";
    case "task.message": return p.message;
    case "task.input_requested": return p.prompt;
    case "approval.resolved": return [p.decision, p.feedback].filter(Boolean).join(" — ");
    case "presence.marked": return `watching on ${deviceLabel(p.deviceId)}`;
    case "presence.cleared": return `left, on ${deviceLabel(p.deviceId)}`;
    case "agent.registered": return `${p.name} (${p.kind})`;
    case "project.created": return p.name;
    case "apikey.issued": return `${p.user}: ${(p.scopes || []).join(", ")}`;
    case "notification.sent": return p.text || "";
    case "device.registered": return `${p.kind} · ${deviceLabel(p.deviceId)}`;
    case "device.removed": return deviceLabel(p.deviceId);
    case "artifact.staged": return `${p.name} (${p.size} bytes) for the next run`;
    case "artifact.recorded": return `${p.direction} ${p.name} (${p.size} bytes)`;
    default: return "";
  }
}

const taskIdOf = (event) => (event.payload && event.payload.taskId) || (event.stream.startsWith("task-") ? event.stream.slice(5) : null);

function subject(event) {
  const p = event.payload || {};
  const taskId = taskIdOf(event);
  if (taskId) {
    if (state.names.has(taskId)) return state.names.get(taskId);
    if (event.type === "task.created") return taskName(p);
    lookUpName(taskId);
    return "a task"; // its name follows once read
  }
  if (p.agentId) return (state.agents.get(p.agentId) || { name: "an agent" }).name;
  if (event.stream.startsWith("devices-")) return `${event.stream.slice(8)}'s devices`;
  return event.stream.replace(/-([0-9a-f]{8})[0-9a-f-]{28}$/, " $1");
}

/** A feed row's task made elsewhere (another tab, the CLI) is named once the task is read. */
const lookedUp = new Set();
function lookUpName(taskId) {
  if (lookedUp.has(taskId)) return;
  lookedUp.add(taskId);
  api("GET", `/tasks/${taskId}`).then((task) => {
    state.names.set(taskId, taskName(task));
    renameFeedRows(taskId);
  }).catch(() => {});
}

function renameFeedRows(taskId) {
  const name = state.names.get(taskId);
  for (const row of $$(`.feed-item[data-task-id="${taskId}"] .feed-subject`)) row.textContent = name;
}

// Presence is an event at every renewal (30 s per open panel): kept in the log, but out of the feed
// unless asked for. Hidden rows are counted apart, so they never push the other events out.
const NOT_PRESENCE = ".feed-item:not([data-kind=presence])";

function showPresence(shown) {
  $(".feed-list").classList.toggle("with-presence", shown);
  $("[data-testid=feed-presence-toggle]").checked = shown;
  if (shown) localStorage.setItem(FEED_PRESENCE, "1");
  else localStorage.removeItem(FEED_PRESENCE);
}
$("[data-testid=feed-presence-toggle]").addEventListener("change", (event) => showPresence(event.target.checked));
showPresence(localStorage.getItem(FEED_PRESENCE) === "1");

function addToFeed(event) {
  const list = $(".feed-list");
  const top = list.querySelector(NOT_PRESENCE);
  const actor = event.meta && event.meta.actor;
  // A run's output is many small events: they gather into one line per task.
  if (event.type === "task.output" && top && top.dataset.type === "task.output" && top.dataset.stream === event.stream) {
    top.dataset.count = Number(top.dataset.count) + 1;
    $(".feed-detail", top).textContent = `${top.dataset.count} chunks · ${describe(event)}`;
    $("time", top).textContent = clock(event.recordedAt);
    return;
  }
  const kind = event.type.split(".")[0];
  const taskId = taskIdOf(event);
  const item = h("li", { class: "feed-item", dataset: { type: event.type, stream: event.stream, count: "1", kind, taskId } },
    h("div", { class: "feed-line" },
      h("span", { class: `event-type ${kind}` }, event.type),
      actor ? h("span", { class: "feed-actor" }, actor) : null,
      h("time", { datetime: event.recordedAt, title: stamp(event.recordedAt) }, clock(event.recordedAt))),
    h("div", { class: "feed-subject" }, subject(event)),
    h("div", { class: "feed-detail" }, describe(event)));
  if (taskId) {
    item.classList.add("clickable");
    item.addEventListener("click", () => openPanel(taskId));
  }
  list.prepend(item);
  const alike = list.querySelectorAll(kind === "presence" ? ".feed-item[data-kind=presence]" : NOT_PRESENCE);
  for (let i = FEED_LIMIT; i < alike.length; i++) alike[i].remove();
  $("[data-feed-status]").textContent = `#${event.position}`;
}

// --- the task panel ----------------------------------------------------------------------------

async function openPanel(taskId) {
  closePanel();
  const panel = { taskId, runId: null, positions: new Set(), output: [], loading: true };
  state.panel = panel;
  const drawer = $("[data-testid=task-panel]");
  drawer.hidden = false;
  document.body.classList.add("panel-open");
  drawer.dataset.taskId = taskId;
  $("[data-testid=task-output]").replaceChildren();
  $("[data-testid=timeline]").replaceChildren();
  $("[data-testid=task-runs]").replaceChildren();
  $("[data-testid=asof]").hidden = true;
  $("[data-field=artifacts-section]").hidden = true;
  try {
    const task = await api("GET", `/tasks/${taskId}`);
    if (state.panel !== panel) return;
    panel.task = task;
    if (matches(task)) state.tasks.set(taskId, task);
    panel.runId = task.runId;
    renderPanel();
    // Live events that arrive while the history loads are kept by position, so none shows twice.
    let after = 0;
    for (;;) {
      const response = await request("GET", `/tasks/${taskId}/events?after=${after}&limit=1000`);
      const events = await response.json();
      if (state.panel !== panel) return;
      events.forEach(panelEvent);
      if (events.length < 1000) break;
      after = Number(response.headers.get("X-Next-After"));
    }
  } catch (error) {
    toast(`Could not open the task: ${error.message}`, "error");
  }
  panel.loading = false;
  renderOutput();
  refreshRuns();
  if (can("task:write")) {
    markPresence();
    panel.presence = setInterval(markPresence, PRESENCE_EVERY_MS);
  }
}

const ENDINGS = new Set(["task.review", "task.completed", "task.failed", "task.cancelled"]);

/** Each run of the open task: where it ran, how it ended, what it spent; and its artifacts, if any run left some. */
async function loadRuns() {
  const panel = state.panel;
  if (!panel) return;
  const runs = await api("GET", `/tasks/${panel.taskId}/runs`);
  if (state.panel !== panel) return;
  $("[data-testid=task-runs]").replaceChildren(...runs.map((run) =>
    h("li", { class: "run", "data-testid": "task-run", dataset: { runId: run.runId, status: run.status } },
      h("span", { class: "mono" }, `#${run.number}`),
      h("span", { class: "badge", dataset: { status: run.status } }, statusLabel(run.status)),
      h("span", { "data-field": "desktop" }, run.desktopId ? `on ${run.desktopId}` : "on an unnamed desktop"),
      run.exitCode !== null && run.exitCode !== undefined ? h("span", { class: "muted small" }, `exit ${run.exitCode}`) : null,
      run.reason ? h("span", { class: "muted small" }, run.reason) : null,
      run.usage ? h("span", { class: "muted small", "data-field": "usage" }, usageText(run.usage)) : null)));
  if (runs.some((run) => run.artifacts && run.artifacts.length)) {
    const count = await renderArtifacts($("[data-testid=task-artifacts]"), panel.taskId);
    if (state.panel === panel) $("[data-field=artifacts-section]").hidden = count === 0;
  }
}
const refreshRuns = debounced(() => loadRuns().catch(() => {}), 200);

function closePanel() {
  const panel = state.panel;
  if (!panel) return;
  state.panel = null;
  clearInterval(panel.presence);
  $("[data-testid=task-panel]").hidden = true;
  document.body.classList.remove("panel-open");
  if (state.key && can("task:write")) {
    request("DELETE", `/tasks/${panel.taskId}/presence?deviceId=${encodeURIComponent(state.deviceId)}`).catch(() => {});
  }
}

$("[data-action=close-panel]").addEventListener("click", closePanel);

async function markPresence() {
  const panel = state.panel;
  if (!panel) return;
  await (state.deviceRegistered || registerDevice());
  if (state.panel !== panel) return;
  request("POST", `/tasks/${panel.taskId}/presence`, { deviceId: state.deviceId }).catch((error) => {
    // The device may have been removed elsewhere: register it again, and mark at the next renewal.
    if (error.status === 404) registerDevice();
  });
}

function panelEvent(event) {
  const panel = state.panel;
  if (!panel || panel.positions.has(event.position)) return;
  panel.positions.add(event.position);
  const p = event.payload || {};
  if (event.type === "task.started" && p.runId !== panel.runId) {
    panel.runId = p.runId;
    renderOutput();
  }
  if (event.type === "task.output") addOutput(event);
  appendTimeline(event);
}

/** Live chunks may overtake the history still loading (a run started just before the panel
 * opened), so the output is shown once the history is in, in log order; later chunks follow it. */
function addOutput(event) {
  const panel = state.panel;
  panel.output.push(event);
  if (!panel.loading && event.payload.runId === panel.runId) appendOutput(event.payload.stream, event.payload.chunk);
}

function renderOutput() {
  const panel = state.panel;
  if (!panel || panel.loading) return;
  panel.output.sort((a, b) => a.position - b.position);
  $("[data-testid=task-output]").replaceChildren();
  for (const { payload } of panel.output) {
    if (payload.runId === panel.runId) appendOutput(payload.stream, payload.chunk);
  }
}

function appendOutput(stream, chunk) {
  const output = $("[data-testid=task-output]");
  const atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 24;
  output.append(stream === "stderr" ? h("span", { class: "stderr" }, chunk) : document.createTextNode(chunk));
  if (atBottom) output.scrollTop = output.scrollHeight;
}

function appendTimeline(event) {
  const list = $("[data-testid=timeline]");
  const kind = event.type.split(".")[0];
  const detail = event.type === "task.output" ? `${event.payload.stream} · ${event.payload.chunk.length} chars` : describe(event);
  const item = h("li", { class: "timeline-item", "data-testid": "timeline-event", dataset: { type: event.type, kind } },
    h("span", { class: "timeline-dot", "aria-hidden": "true" }),
    h("div", { class: "timeline-body" },
      h("div", { class: "timeline-line" },
        h("span", { class: `event-type ${kind}` }, event.type),
        h("span", { class: "timeline-actor", "data-field": "actor" }, event.meta && event.meta.actor ? event.meta.actor : "—"),
        h("time", { datetime: event.recordedAt, title: event.recordedAt }, stamp(event.recordedAt)),
        h("button", {
          type: "button", class: "link position mono", title: "Show the task as it stood after this event",
          "aria-label": `The task as of #${event.position}`, onclick: () => showAsOf(event.position),
        }, `#${event.position}`)),
      detail ? h("div", { class: "timeline-detail" }, detail) : null));
  // History arrives in order; a live event may overtake a page still loading, so keep the list sorted.
  item.dataset.position = event.position;
  let before = null;
  for (let el = list.lastElementChild; el && Number(el.dataset.position) > event.position; el = el.previousElementSibling) before = el;
  list.insertBefore(item, before);
  const count = list.childElementCount;
  $("[data-field=event-count]").textContent = `${count} event${count === 1 ? "" : "s"}`;
}

/** The task as it stood at a log position (GET /tasks/{id}?asOf=): what an auditor asks of its history. */
async function showAsOf(position) {
  const panel = state.panel;
  const box = $("[data-testid=asof]");
  await act("History", async () => {
    const then = await api("GET", `/tasks/${panel.taskId}?asOf=${position}`);
    if (state.panel !== panel) return;
    box.hidden = false;
    fill(box,
      h("div", { class: "asof-head" },
        h("strong", {}, `As of #${position}`),
        h("button", { type: "button", class: "ghost small-button", onclick: () => { box.hidden = true; } }, "Back to now")),
      h("dl", { class: "facts" }, ...[
        ["Status", statusLabel(then.status)], ["Version", String(then.version)], ["Title", then.title || "—"],
        ["Priority", String(then.priority)], ["Runs", String(then.runs)], ["Result", then.result || "—"],
      ].flatMap(([k, v]) => [h("dt", {}, k), h("dd", { dataset: { fact: k.toLowerCase() } }, v)])));
  });
}

function renderPanel() {
  const panel = state.panel;
  const task = panel && (state.tasks.get(panel.taskId) || panel.task);
  if (!task) return;
  const drawer = $("[data-testid=task-panel]");
  drawer.dataset.status = task.status;
  const badge = $("[data-field=status]", drawer);
  badge.textContent = statusLabel(task.status);
  badge.dataset.status = task.status;
  $("[data-field=title]", drawer).textContent = taskName(task);
  const agent = state.agents.get(task.agentId);
  const project = state.projects.find((p) => p.id === task.projectId);
  const facts = [
    ["Task", task.id], ["Type", task.type], ["Agent", agent ? `${agent.name} (${agent.kind})` : task.agentId || "—"],
    ["Project", project ? project.name : task.projectId],
    ["Created", `${new Date(task.createdAt).toLocaleString()} by ${task.createdBy}`],
    ["Started", task.startedAt ? new Date(task.startedAt).toLocaleString() : "—"],
    ["Finished", task.completedAt ? new Date(task.completedAt).toLocaleString() : "—"],
    ["Runs", String(task.runs)], ["Priority", String(task.priority)], ["Version", String(task.version)],
    ...(task.queuePosition ? [["In queue", `#${task.queuePosition}`]] : []),
    ...(task.archived ? [["Archived", "yes"]] : []),
    ...(task.usage ? [["Usage", usageText(task.usage)]] : []),
    ["Watching", task.watchers.length ? task.watchers.map(deviceLabel).join(", ") : "—"],
  ];
  if (task.error) facts.push(["Error", task.error]);
  if (task.status === "awaiting_input" && task.inputPrompt) facts.push(["Asks", task.inputPrompt]);
  $("[data-field=facts]", drawer).replaceChildren(...facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", { dataset: { fact: k.toLowerCase() } }, v)]));
  $("[data-field=content]", drawer)?.remove();
  $("[data-field=facts]", drawer).after(h("p", { class: "task-content", "data-field": "content" }, task.content));
  $("[data-field=run]", drawer).textContent = task.runId ? `run ${shortId(task.runId)}` : "no run yet";
  // Rebuilt only when what they offer changes: a re-render for another event keeps what was typed.
  const actions = $("[data-field=actions]", drawer);
  const offer = [task.id, task.status, task.priority, task.agentId, task.archived].join("|");
  if (actions.dataset.offer !== offer) {
    actions.dataset.offer = offer;
    actions.replaceChildren(...actionsFor(task));
  }
  $("[data-field=message-form]", drawer).hidden = !ACTIVE.has(task.status) || !can("task:write");
}

function actionsFor(task) {
  const post = (what, path, body) => () => act(what, async () => {
    await api("POST", `/tasks/${task.id}${path}`, body);
    refreshTask(task.id);
  });
  const buttons = [];
  const add = (label, kind, onclick) => {
    buttons.push(h("button", { type: "button", class: kind, "data-action": label.toLowerCase(), onclick }, label));
  };
  if (task.status === "review" && can("approval:write")) {
    const feedback = h("input", { placeholder: "Feedback (optional)", class: "grow", "aria-label": "Feedback" });
    buttons.push(feedback);
    add("Approve", "success", () => post("Approve", "/review", { decision: "approve", feedback: feedback.value || null })());
    add("Reject", "danger", () => post("Reject", "/review", { decision: "reject", feedback: feedback.value || null })());
  }
  if (!can("task:write")) return buttons;
  const agentId = () => task.agentId || agentsFor(task.type).map((a) => a.id)[0]; // read at the click
  if (task.archived) {
    add("Unarchive", "secondary", () => act("Unarchive", async () => {
      await api("PATCH", `/tasks/${task.id}`, { archived: false });
      refreshTask(task.id);
    }));
    return buttons;
  }
  if (task.status === "pending") add("Run", "primary", () => post("Run", "/run", { agentId: agentId() })());
  if (task.status === "pending") add("Queue", "secondary", () => post("Queue", "/run", { agentId: agentId(), queue: true })());
  if (["pending", "queued"].includes(task.status)) {
    const priority = h("input", { type: "number", min: "1", max: "10", value: String(task.priority), class: "priority",
      "aria-label": "Priority", "data-testid": "priority-input" });
    buttons.push(priority);
    add("Set priority", "ghost", () => act("Set priority", async () => {
      await api("PATCH", `/tasks/${task.id}`, { priority: Number(priority.value) });
      refreshTask(task.id);
      refreshQueue();
    }));
  }
  if (["pending", "queued", "running", "awaiting_input"].includes(task.status)) {
    // A cancel stops a running agent for good: it asks first, and takes a reason for the log.
    const confirm = h("div", { class: "confirm", "data-testid": "cancel-confirm", hidden: true, role: "group", "aria-label": "Confirm the cancel" },
      h("span", {}, "Cancel this task?"));
    const reason = h("input", { placeholder: "Reason (optional)", "aria-label": "Reason", class: "grow" });
    confirm.append(reason,
      h("button", { type: "button", class: "danger", "data-action": "confirm-cancel",
        onclick: () => post("Cancel", "/cancel", reason.value.trim() ? { reason: reason.value.trim() } : {})() }, "Yes, cancel it"),
      h("button", { type: "button", class: "ghost", onclick: () => { confirm.hidden = true; } }, "Keep it"));
    add("Cancel", "danger", () => { confirm.hidden = false; reason.focus(); });
    buttons.push(confirm);
  }
  if (["failed", "cancelled"].includes(task.status)) add("Retry", "secondary", post("Retry", "/retry"));
  if (!ACTIVE.has(task.status)) {
    add("Archive", "ghost", () => act("Archive", async () => {
      await api("DELETE", `/tasks/${task.id}`);
      closePanel();
      toast(`Archived “${taskName(task)}”: find it with the Archived filter.`, "success");
      refreshTask(task.id);
    }));
  }
  return buttons;
}

$("[data-field=message-form]").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = event.target.elements.message;
  const message = input.value.trim();
  if (!message || !state.panel) return;
  act("Send", async () => {
    await api("POST", `/tasks/${state.panel.taskId}/messages`, { message });
    input.value = "";
  });
});

// --- creating tasks ---------------------------------------------------------------------------

const createForm = $("[data-testid=create-form]");
const createError = $("[data-testid=create-error]");

function setCreateError(message, taskId = "") {
  createError.textContent = message;
  createError.dataset.taskId = taskId;
}

/** A task that was created but could not start is named in the form's message until it leaves pending. */
function settleCreateError(task) {
  if (createError.dataset.taskId === task.id && task.status !== "pending") setCreateError("");
}

// A changed form is another submission: it gets a key of its own.
createForm.addEventListener("input", () => { state.createKey = null; });

createForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const run = event.submitter && event.submitter.value === "run";
  setCreateError("");
  const fields = form.elements;
  const body = {
    type: fields.type.value,
    content: fields.content.value,
    priority: Number(fields.priority.value) || 5,
    requiresApproval: fields.requiresApproval.checked,
  };
  if (fields.title.value.trim()) body.title = fields.title.value.trim();
  if (fields.agentId.value) body.agentId = fields.agentId.value;
  if (state.filters.projectId) body.projectId = state.filters.projectId;
  if (fields.metadata.value.trim()) {
    try {
      body.metadata = JSON.parse(fields.metadata.value);
    } catch {
      setCreateError("Metadata must be a JSON object.");
      return;
    }
  }
  // One key per submission: a second click, or a resend after the server went away, makes no second task.
  state.createKey = state.createKey || crypto.randomUUID();
  for (const b of form.querySelectorAll("button")) b.disabled = true;
  try {
    let task;
    try {
      task = await api("POST", "/tasks", body, { "Idempotency-Key": state.createKey });
    } catch (e) {
      setCreateError(e.message);
      return;
    }
    state.createKey = null;
    form.reset();
    delete fields.agentId.dataset.picked;
    renderAgentOptions();
    state.names.set(task.id, taskName(task));
    if (run) {
      try {
        task = await api("POST", `/tasks/${task.id}/run`, body.agentId ? { agentId: body.agentId } : undefined);
        toast("Task created and running.", "success");
      } catch (e) {
        setCreateError(`Created “${taskName(task)}”, but it did not start: ${e.message.replace(/\.?$/, ".")} It waits in Pending: run or queue it from its panel.`, task.id);
      }
    } else {
      toast("Task created.", "success");
    }
    if (matches(task)) state.tasks.set(task.id, task);
    renderBoard();
    openPanel(task.id);
  } finally {
    for (const b of form.querySelectorAll("button")) b.disabled = false;
  }
});

// --- audit ------------------------------------------------------------------------------------

$("[data-action=verify]").addEventListener("click", () => act("Verify", async () => {
  const out = $("[data-testid=verify-result]");
  out.textContent = "Checking…";
  const result = await api("GET", "/audit/verify");
  out.dataset.ok = String(result.ok);
  out.textContent = result.ok
    ? `Intact: ${result.checked} events checked, up to the head #${result.head}.`
    : `Broken at #${result.firstBadPosition}: ${result.reason}`;
}));

$("[data-action=digest]").addEventListener("click", () => act("Digest", async () => {
  const digest = await api("GET", "/audit/digest");
  $("[data-testid=digest-result]").textContent =
    `#${digest.position} ${digest.hash} — keep it; later, mission-control verify --against ${digest.position}:${digest.hash}`;
}));

async function loadLog(after) {
  const page = await api("GET", `/events?after=${after}&limit=${LOG_PAGE}`);
  state.logAfter = after;
  state.logHead = page.head;
  fill($("[data-testid=log-list]"), page.events.reverse().map((event) =>
    h("li", { class: "log-item", "data-testid": "log-event", dataset: { position: event.position, type: event.type } },
      h("span", { class: "mono position-cell" }, `#${event.position}`),
      h("span", { class: `event-type ${event.type.split(".")[0]}` }, event.type),
      h("span", { class: "log-subject" }, subject(event)),
      h("span", { class: "muted small" }, (event.meta && event.meta.actor) || ""),
      h("time", { datetime: event.recordedAt, class: "mono small muted" }, stamp(event.recordedAt)))));
  $("[data-action=log-older]").disabled = after <= 0;
  $("[data-action=log-newer]").disabled = after + LOG_PAGE >= page.head;
}
$("[data-action=log-older]").addEventListener("click", () => act("The log", () => loadLog(Math.max(0, state.logAfter - LOG_PAGE))));
$("[data-action=log-newer]").addEventListener("click", () => act("The log", () => loadLog(state.logAfter + LOG_PAGE)));

// --- boot -------------------------------------------------------------------------------------

if (state.key) start();
else showSignIn();
