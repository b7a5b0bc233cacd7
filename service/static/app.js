// The Mission Control dashboard: a plain ES module served by the service itself.
// Every piece of data reaches the page through textContent or attributes, never as HTML.

const API = "/api/mission-control";
const KEY_STORAGE = "mc.apiKey";
const STATUSES = [
  ["pending", "Pending"], ["queued", "Queued"], ["running", "Running"], ["awaiting_input", "Needs input"], ["review", "Review"],
  ["done", "Done"], ["failed", "Failed"], ["cancelled", "Cancelled"],
];
const ACTIVE = new Set(["running", "awaiting_input"]);
const CARDS_PER_COLUMN = 60;
const FEED_LIMIT = 150;
const FEED_HISTORY = 60; // events before the page opened that the feed starts with
const OVERVIEW_EVERY_MS = 5000;
const PRESENCE_EVERY_MS = 30000;
const RECONNECT_MS = 3000;

const FEED_PRESENCE = "mc.feedPresence"; // localStorage: "1" when the feed shows presence rows
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

const $ = (selector, root = document) => root.querySelector(selector);

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
  tasks: new Map(),
  totalTasks: 0,
  approvals: [],
  agents: new Map(),
  overview: null,
  seesEverything: false, // an audit:read key receives every event, so "behind" can be measured exactly
  lastPosition: 0,
  lastEventAt: 0,
  source: null,
  timers: [],
  panel: null, // the open task: {taskId, runId, positions (of the events shown), presence (timer)}
};
sessionStorage.setItem("mc.deviceId", state.deviceId);

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

const shortId = (id) => (id ? id.slice(0, 8) : "");
const taskName = (task) => task.title || task.content.split("\n")[0].slice(0, 80);
const statusLabel = (status) => (STATUSES.find(([s]) => s === status) || [status, status])[1];

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
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function request(method, path, body) {
  const headers = { Authorization: `Bearer ${state.key}` };
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(API + path, init);
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try { detail = (await response.json()).detail || detail; } catch { /* not JSON */ }
    if (response.status === 401 && state.source) signOut("The key was refused; sign in again.");
    throw new ApiError(response.status, detail);
  }
  return response;
}

async function api(method, path, body) {
  const response = await request(method, path, body);
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
    await api("GET", "/overview");
  } catch (error) {
    state.key = null;
    const words = { 401: "That key is not known, or it was revoked.", 403: "That key lacks the task:read scope." };
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
  if (state.source) state.source.close();
  state.source = null;
  state.timers.forEach(clearInterval);
  state.timers = [];
  // Another key may see other projects: nothing of this one's view survives it.
  state.tasks.clear();
  state.approvals = [];
  cards.clear();
  $("[data-testid=board]").replaceChildren();
  $(".feed-list").replaceChildren();
  showSignIn(message);
}

$("[data-action=signout]").addEventListener("click", () => signOut());

// --- start ---------------------------------------------------------------------------

async function start() {
  $("#signin").hidden = true;
  $("#app").hidden = false;
  buildBoard();
  try {
    // The head is read before the snapshots, so the stream replays whatever lands meanwhile.
    const overview = await api("GET", "/overview");
    renderOverview(overview);
    state.snapshotHead = overview.log.head;
    // The stream starts a little in the past: the feed opens with recent history, not empty.
    state.lastPosition = Math.max(0, overview.log.head - FEED_HISTORY);
    await Promise.all([loadTasks(), loadApprovals(), loadAgents(), loadDesktops(), probeAudit()]);
    renderApprovals();
  } catch (error) {
    if (error.status === 401) signOut("The key was refused; sign in again.");
    else toast(`Could not load the dashboard: ${error.message}`, "error");
    return;
  }
  connect();
  state.timers.push(setInterval(refreshOverview, OVERVIEW_EVERY_MS));
  state.timers.push(setInterval(renderConnection, 1000));
  state.timers.push(setInterval(renderTimes, 15000));
}

async function probeAudit() {
  try {
    await api("GET", "/events?limit=1");
    state.seesEverything = true;
  } catch {
    state.seesEverything = false;
  }
}

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
  addToFeed(event);
  if (event.position <= state.snapshotHead) return; // history: the snapshots already hold it
  if (kind === "task" || kind === "presence") refreshTask(id);
  if (event.type === "task.queued" || event.type === "task.updated" || (QUEUE_MOVES.has(event.type) && queuedCount() > 0)) refreshQueue();
  if (event.type.startsWith("approval.") || event.type === "task.review") refreshApprovals();
  if (kind === "agent") refreshAgents();
  if (state.panel && state.panel.taskId === id && (event.type === "task.started" || ENDINGS.has(event.type))) refreshRuns();
  if (state.panel && state.panel.taskId === id && kind === "task") panelEvent(event);
  refreshOverview.soon();
  if (state.overview && event.position > state.overview.log.head) $("[data-stat=head]").textContent = `#${event.position}`;
  renderConnection();
}

function renderConnection() {
  const el = $("[data-testid=connection]");
  const head = state.overview ? state.overview.log.head : 0;
  const behind = state.seesEverything ? Math.max(0, head - state.lastPosition) : 0;
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
  stat("approvals", overview.approvalsPending);
  stat("agents", overview.activeAgents);
  stat("desktops", overview.activeDesktops);
  stat("cpu", `${overview.resources.cpu.toFixed(0)}%`);
  const memory = overview.resources.memory;
  stat("memory", `${(memory.used / 1024).toFixed(1)} / ${(memory.total / 1024).toFixed(1)} GiB`);
  stat("head", `#${Math.max(overview.log.head, state.lastPosition)}`);
  $("[data-stat=head]").title = `${overview.log.streams} streams`;
  $("[data-meter=cpu]").style.width = `${Math.min(100, overview.resources.cpu)}%`;
  $("[data-meter=memory]").style.width = `${Math.min(100, memory.percent)}%`;
  for (const [name, percent] of [["cpu", overview.resources.cpu], ["memory", memory.percent]]) {
    $(`[data-meter=${name}]`).dataset.level = percent > 85 ? "high" : percent > 60 ? "mid" : "low";
  }
  renderConnection();
}

// --- tasks and the board ---------------------------------------------------------------

async function loadTasks() {
  const response = await request("GET", "/tasks?limit=500");
  state.totalTasks = Number(response.headers.get("X-Total-Count") || 0);
  for (const task of await response.json()) state.tasks.set(task.id, task);
  renderBoard();
}

// Another task's start or ending moves every queued task's position: the queue is read again whole.
const QUEUE_MOVES = new Set(["task.started", "task.failed", "task.cancelled", "task.archived"]);
const queuedCount = () => [...state.tasks.values()].filter((t) => t.status === "queued").length;
const refreshQueue = debounced(async () => {
  try {
    for (const task of await api("GET", "/tasks?status=queued&sort=queue&limit=500")) state.tasks.set(task.id, task);
  } catch { return; }
  renderBoard();
}, 300);

const refreshTask = debounced(async (taskId) => {
  try {
    const task = await api("GET", `/tasks/${taskId}`);
    if (!state.tasks.has(taskId) && !task.archived) state.totalTasks += 1;
    if (task.archived) state.tasks.delete(taskId);
    else state.tasks.set(taskId, task);
    if (state.approvals.some((a) => a.taskId === taskId)) renderApprovals(); // its deliverable
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
    board.append(h("section", { class: "column", dataset: { status }, "data-testid": `column-${status}` },
      h("header", { class: "column-head" },
        h("span", { class: "status-dot" }), h("h3", {}, label), h("span", { class: "count", "data-count": status }, "0")),
      h("div", { class: "column-body" })));
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
      h("time", { class: "ago", datetime: when, title: new Date(when).toLocaleString() }, ago(when))),
  );
  return el;
}

const renderBoard = coalesced(() => {
  const columns = new Map(STATUSES.map(([s]) => [s, []]));
  for (const task of state.tasks.values()) columns.get(task.status)?.push(task);
  const recency = (t) => t.completedAt || t.startedAt || t.createdAt;
  for (const [status, tasks] of columns) {
    tasks.sort(status === "queued" ? (a, b) => (a.queuePosition ?? 1e9) - (b.queuePosition ?? 1e9)
      : status === "pending" ? (a, b) => b.priority - a.priority || a.createdAt.localeCompare(b.createdAt)
      : (a, b) => recency(b).localeCompare(recency(a)));
    const column = $(`[data-testid=column-${status}]`);
    $(`[data-count=${status}]`, column).textContent = tasks.length;
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
  board.dataset.partial = state.totalTasks > state.tasks.size ? `Showing the newest ${state.tasks.size} of ${state.totalTasks} tasks` : "";
});

function renderTimes() {
  for (const el of document.querySelectorAll("time.ago")) el.textContent = ago(el.getAttribute("datetime"));
}

// --- agents ------------------------------------------------------------------------------

async function loadAgents() {
  const agents = await api("GET", "/agents");
  state.agents = new Map(agents.map((a) => [a.id, a]));
  const select = $("[data-testid=agent-select]");
  const chosen = select.value;
  select.replaceChildren(...agents.filter((a) => a.status === "active").map((a) =>
    h("option", { value: a.id, selected: a.id === chosen || (!chosen && a.kind === "echo") }, `${a.name} · ${a.kind}`)));
  renderBoard();
}
const refreshAgents = debounced(() => loadAgents().catch(() => {}), 300);

// --- desktops ------------------------------------------------------------------------------

async function loadDesktops() {
  const desktops = await api("GET", "/desktops");
  $("[data-count=desktops]").textContent = desktops.filter((d) => d.status === "online").length;
  const list = $(".desktop-list");
  if (!desktops.length) {
    list.replaceChildren(h("li", { class: "empty" }, "No desktop: nothing can run."));
    return;
  }
  list.replaceChildren(...desktops.map((d) =>
    h("li", { class: "desktop", "data-testid": "desktop", dataset: { desktopId: d.id, status: d.status }, title: d.status },
      h("span", { class: "dot", "aria-hidden": "true" }),
      h("span", { class: "desktop-name" }, d.id),
      h("span", { class: "muted" }, `${d.busy}/${d.capacity}`),
      h("span", { class: "desktop-kinds" }, d.status === "online" ? d.agents.join(", ") : d.status),
      h("time", { class: "ago", datetime: d.lastSeenAt }, ago(d.lastSeenAt)),
      d.running.length ? h("span", { class: "desktop-running" }, ...d.running.map((taskId) =>
        h("button", { type: "button", class: "link", onclick: () => openPanel(taskId) },
          state.tasks.has(taskId) ? taskName(state.tasks.get(taskId)) : shortId(taskId)))) : null)));
}

// --- approvals -----------------------------------------------------------------------------

async function loadApprovals() {
  state.approvals = await api("GET", "/approvals?status=pending");
  renderApprovals();
}
const refreshApprovals = debounced(() => loadApprovals().catch(() => {}), 150);

function renderApprovals() {
  const list = $(".tray-list");
  $("[data-count=approvals]").textContent = state.approvals.length;
  $("[data-count=approvals]").dataset.hot = state.approvals.length > 0;
  if (!state.approvals.length) {
    list.replaceChildren(h("p", { class: "empty" }, "No deliverable is waiting for a decision."));
    return;
  }
  const drafts = new Map([...list.querySelectorAll("[data-approval-id]")].map((el) =>
    [el.dataset.approvalId, $("textarea", el).value]));
  list.replaceChildren(...state.approvals.map((approval) => {
    const task = state.tasks.get(approval.taskId);
    const feedback = h("textarea", { rows: "2", placeholder: "Feedback (optional)", "aria-label": "Feedback" });
    feedback.value = drafts.get(approval.id) || "";
    const decide = (decision) => act(decision === "approve" ? "Approve" : "Reject", async () => {
      await api("POST", `/approvals/${approval.id}/resolve`, { decision, feedback: feedback.value || null });
      toast(decision === "approve" ? "Approved: the task is done." : "Rejected: the task failed.", "success");
      refreshApprovals();
      refreshTask(approval.taskId);
    });
    return h("article", { class: "approval", "data-testid": "approval", dataset: { approvalId: approval.id, taskId: approval.taskId } },
      h("div", { class: "approval-head" },
        h("button", { type: "button", class: "link", onclick: () => openPanel(approval.taskId) },
          approval.task ? (approval.task.title || approval.task.content.slice(0, 80)) : shortId(approval.taskId)),
        h("time", { class: "ago", datetime: approval.createdAt }, ago(approval.createdAt))),
      task && task.result ? h("pre", { class: "deliverable" }, task.result.slice(0, 600)) : null,
      feedback,
      h("div", { class: "approval-actions" },
        h("button", { type: "button", class: "danger", "data-action": "reject", onclick: () => decide("reject") }, "Reject"),
        h("button", { type: "button", class: "success", "data-action": "approve", onclick: () => decide("approve") }, "Approve")));
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
    case "artifact.staged": return `${p.name} (${p.size} bytes) for the next run`;
    case "artifact.recorded": return `${p.direction} ${p.name} (${p.size} bytes)`;
    default: return "";
  }
}

function subject(event) {
  const p = event.payload || {};
  const task = p.taskId && state.tasks.get(p.taskId);
  if (task) return taskName(task);
  if (event.type === "task.created") return taskName(p);
  if (p.taskId) return `task ${shortId(p.taskId)}`;
  if (p.agentId) return (state.agents.get(p.agentId) || { name: `agent ${shortId(p.agentId)}` }).name;
  return event.stream.replace(/-([0-9a-f]{8})[0-9a-f-]{28}$/, " $1");
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
  const item = h("li", { class: "feed-item", dataset: { type: event.type, stream: event.stream, count: "1", kind } },
    h("div", { class: "feed-line" },
      h("span", { class: `event-type ${kind}` }, event.type),
      actor ? h("span", { class: "feed-actor" }, actor) : null,
      h("time", { datetime: event.recordedAt, title: event.recordedAt }, clock(event.recordedAt))),
    h("div", { class: "feed-subject" }, subject(event)),
    h("div", { class: "feed-detail" }, describe(event)));
  if (event.payload && event.payload.taskId) {
    item.classList.add("clickable");
    item.addEventListener("click", () => openPanel(event.payload.taskId));
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
  drawer.dataset.taskId = taskId;
  $("[data-testid=task-output]").replaceChildren();
  $("[data-testid=timeline]").replaceChildren();
  try {
    const task = await api("GET", `/tasks/${taskId}`);
    state.tasks.set(taskId, task);
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
  markPresence();
  panel.presence = setInterval(markPresence, PRESENCE_EVERY_MS);
}

const ENDINGS = new Set(["task.review", "task.completed", "task.failed", "task.cancelled"]);

/** Each run of the open task: where it ran, how it ended. */
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
      run.reason ? h("span", { class: "muted small" }, run.reason) : null)));
}
const refreshRuns = debounced(() => loadRuns().catch(() => {}), 200);

function closePanel() {
  const panel = state.panel;
  if (!panel) return;
  state.panel = null;
  clearInterval(panel.presence);
  $("[data-testid=task-panel]").hidden = true;
  if (state.key) {
    request("DELETE", `/tasks/${panel.taskId}/presence?deviceId=${encodeURIComponent(state.deviceId)}`).catch(() => {});
  }
}

$("[data-action=close-panel]").addEventListener("click", closePanel);
document.addEventListener("keydown", (e) => { if (e.key === "Escape") closePanel(); });

/** The tab as one of its user's `browser` devices, registered once per key: presence is marked
 * from registered devices only (a registration the same as before records nothing). */
let registration = { key: null, done: null };
function registerTab() {
  if (registration.key !== state.key) {
    const key = state.key;
    const done = request("POST", "/devices", { deviceId: state.deviceId, kind: "browser" })
      .catch((error) => { if (registration.key === key) registration.key = null; throw error; });
    registration = { key, done };
  }
  return registration.done;
}

function markPresence() {
  if (!state.panel) return;
  const panel = state.panel;
  registerTab()
    .then(() => state.panel === panel && request("POST", `/tasks/${panel.taskId}/presence`, { deviceId: state.deviceId }))
    .catch(() => {});
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
    h("span", { class: "timeline-dot" }),
    h("div", { class: "timeline-body" },
      h("div", { class: "timeline-line" },
        h("span", { class: `event-type ${kind}` }, event.type),
        h("span", { class: "timeline-actor", "data-field": "actor" }, event.meta && event.meta.actor ? event.meta.actor : "—"),
        h("time", { datetime: event.recordedAt, title: event.recordedAt }, clock(event.recordedAt)),
        h("span", { class: "position mono" }, `#${event.position}`)),
      detail ? h("div", { class: "timeline-detail" }, detail) : null));
  // History arrives in order; a live event may overtake a page still loading, so keep the list sorted.
  item.dataset.position = event.position;
  let before = null;
  for (let el = list.lastElementChild; el && Number(el.dataset.position) > event.position; el = el.previousElementSibling) before = el;
  list.insertBefore(item, before);
  const count = list.childElementCount;
  $("[data-field=event-count]").textContent = `${count} event${count === 1 ? "" : "s"}`;
}

function renderPanel() {
  const panel = state.panel;
  const task = panel && state.tasks.get(panel.taskId);
  if (!task) return;
  const drawer = $("[data-testid=task-panel]");
  drawer.dataset.status = task.status;
  const badge = $("[data-field=status]", drawer);
  badge.textContent = statusLabel(task.status);
  badge.dataset.status = task.status;
  $("[data-field=title]", drawer).textContent = taskName(task);
  const agent = state.agents.get(task.agentId);
  const facts = [
    ["Task", task.id], ["Type", task.type], ["Agent", agent ? `${agent.name} (${agent.kind})` : task.agentId || "—"],
    ["Created", `${new Date(task.createdAt).toLocaleString()} by ${task.createdBy}`],
    ["Started", task.startedAt ? new Date(task.startedAt).toLocaleString() : "—"],
    ["Finished", task.completedAt ? new Date(task.completedAt).toLocaleString() : "—"],
    ["Runs", String(task.runs)], ["Priority", String(task.priority)], ["Version", String(task.version)],
    ...(task.queuePosition ? [["In queue", `#${task.queuePosition}`]] : []),
    ["Watching", task.watchers.length ? task.watchers.map(deviceLabel).join(", ") : "—"],
  ];
  if (task.error) facts.push(["Error", task.error]);
  if (task.status === "awaiting_input" && task.inputPrompt) facts.push(["Asks", task.inputPrompt]);
  $("[data-field=facts]", drawer).replaceChildren(...facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  $("[data-field=content]", drawer)?.remove();
  $("[data-field=facts]", drawer).after(h("p", { class: "task-content", "data-field": "content" }, task.content));
  $("[data-field=run]", drawer).textContent = task.runId ? `run ${shortId(task.runId)}` : "no run yet";
  // Rebuilt only when what they offer changes: a re-render for another event keeps what was typed.
  const actions = $("[data-field=actions]", drawer);
  const offer = [task.id, task.status, task.priority, task.agentId].join("|");
  if (actions.dataset.offer !== offer) {
    actions.dataset.offer = offer;
    actions.replaceChildren(...actionsFor(task));
  }
  $("[data-field=message-form]", drawer).hidden = !ACTIVE.has(task.status);
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
  const agentId = () => task.agentId || $("[data-testid=agent-select]").value || undefined; // read at the click
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
  if (task.status === "review") {
    const feedback = h("input", { placeholder: "Feedback (optional)", class: "grow", "aria-label": "Feedback" });
    buttons.push(feedback);
    add("Approve", "success", () => post("Approve", "/review", { decision: "approve", feedback: feedback.value || null })());
    add("Reject", "danger", () => post("Reject", "/review", { decision: "reject", feedback: feedback.value || null })());
  }
  if (["pending", "queued", "running", "awaiting_input"].includes(task.status)) add("Cancel", "danger", post("Cancel", "/cancel", {}));
  if (["failed", "cancelled"].includes(task.status)) add("Retry", "secondary", post("Retry", "/retry"));
  if (!ACTIVE.has(task.status)) {
    add("Archive", "ghost", () => act("Archive", async () => {
      await api("DELETE", `/tasks/${task.id}`);
      closePanel();
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

$("[data-testid=create-form]").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const run = event.submitter && event.submitter.value === "run";
  const error = $("[data-testid=create-error]");
  error.textContent = "";
  const fields = form.elements;
  const body = {
    type: fields.type.value,
    content: fields.content.value,
    priority: Number(fields.priority.value) || 5,
    requiresApproval: fields.requiresApproval.checked,
  };
  if (fields.title.value.trim()) body.title = fields.title.value.trim();
  if (fields.agentId.value) body.agentId = fields.agentId.value;
  if (fields.metadata.value.trim()) {
    try {
      body.metadata = JSON.parse(fields.metadata.value);
    } catch {
      error.textContent = "Metadata must be a JSON object.";
      return;
    }
  }
  for (const b of form.querySelectorAll("button")) b.disabled = true;
  try {
    let task = await api("POST", "/tasks", body);
    state.tasks.set(task.id, task);
    if (run) task = await api("POST", `/tasks/${task.id}/run`, body.agentId ? { agentId: body.agentId } : undefined);
    state.tasks.set(task.id, task);
    renderBoard();
    fields.title.value = "";
    fields.content.value = "";
    toast(run ? "Task created and running." : "Task created.", "success");
    openPanel(task.id);
  } catch (e) {
    error.textContent = e.message;
  } finally {
    for (const b of form.querySelectorAll("button")) b.disabled = false;
  }
});

// --- boot -------------------------------------------------------------------------------------

if (state.key) start();
else showSignIn();
