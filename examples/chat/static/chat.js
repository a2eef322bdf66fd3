// The example chat page: plain DOM code on top of splitchat's browser client (no build step).
import { SplitchatClient, makeNonce } from "/splitchat/splitchat.js";

const TYPING_TTL_MS = 10_000; // a TYPING_START shows for ~10 s unless renewed
const TYPING_THROTTLE_MS = 8_000; // send at most one typing command per 8 s while typing
const HISTORY_PAGE = 100;
// Messages typed but not yet answered, per channel. Bounded: past this the composer keeps the
// text and says so, instead of growing a queue the rate limit would take minutes to drain.
const MAX_OUTBOX_PER_CHANNEL = 50;

const $ = (selector) => document.querySelector(selector);
const chat = {
  client: null,
  user: null,
  channels: [],
  current: null,
  messages: new Map(), // channel id -> Map(message id -> message)
  pending: new Map(), // nonce -> {message, failed}: optimistic copy, not yet confirmed by the server
  outbox: new Map(), // channel id -> {nonces: [...], busy}: sends waiting their turn, oldest first
  typing: new Map(), // channel id -> Map(user id -> {name, expires})
  presence: new Map(), // channel id -> Map(user id -> user)
  lastTypingSent: 0,
  stateLog: [], // every connection state, in order (shown in the header; read by tests)
};
window.chat = chat; // for debugging and the end-to-end tests

function byId(a, b) {
  const x = BigInt(a.id);
  const y = BigInt(b.id);
  return x < y ? -1 : x > y ? 1 : 0;
}

function channelMessages(channelId) {
  if (!chat.messages.has(channelId)) chat.messages.set(channelId, new Map());
  return chat.messages.get(channelId);
}

function upsertMessage(message) {
  channelMessages(message.channel_id).set(message.id, message);
  if (message.nonce && chat.pending.has(message.nonce)) chat.pending.delete(message.nonce);
  const typers = chat.typing.get(message.channel_id);
  if (typers) typers.delete(message.author.id);
}

// ---- rendering -----------------------------------------------------------------------------------

function messageElement(message, { pending = false, failed = null } = {}) {
  const row = document.createElement("div");
  row.className = "message" + (pending ? " pending" : "") + (failed ? " failed" : "");
  if (message.id) row.dataset.id = message.id;
  if (message.nonce) row.dataset.nonce = message.nonce;
  const author = document.createElement("span");
  author.className = "author";
  author.textContent = message.author.name;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = message.content; // textContent: user input never becomes HTML
  row.append(author, content);
  if (message.edited_timestamp) {
    const edited = document.createElement("span");
    edited.className = "edited";
    edited.textContent = "(edited)";
    row.append(edited);
  }
  if (failed) {
    const why = document.createElement("span");
    why.className = "error";
    why.textContent = ` — not sent: ${failed}`;
    const retry = document.createElement("button");
    retry.className = "retry";
    retry.textContent = "retry";
    retry.onclick = () => retrySend(message.nonce);
    const dismiss = document.createElement("button");
    dismiss.className = "dismiss";
    dismiss.textContent = "dismiss";
    dismiss.onclick = () => dismissSend(message.nonce);
    row.append(why, retry, dismiss);
  }
  if (!pending && message.id && chat.user && message.author.id === chat.user.id) {
    const edit = document.createElement("button");
    edit.className = "edit";
    edit.textContent = "edit";
    edit.onclick = () => editMessage(message);
    const remove = document.createElement("button");
    remove.className = "delete";
    remove.textContent = "delete";
    remove.onclick = () => deleteMessage(message);
    row.append(edit, remove);
  }
  return row;
}

function renderMessages() {
  const box = $("#messages");
  const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  const rows = [...channelMessages(chat.current).values()].sort(byId).map((m) => messageElement(m));
  for (const item of chat.pending.values()) {
    if (item.message.channel_id === chat.current) {
      rows.push(messageElement(item.message, { pending: !item.failed, failed: item.failed }));
    }
  }
  box.replaceChildren(...rows);
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function renderTyping() {
  const now = Date.now();
  const typers = chat.typing.get(chat.current) || new Map();
  const names = [];
  for (const [userId, entry] of typers) {
    if (entry.expires <= now) typers.delete(userId);
    else names.push(entry.name);
  }
  $("#typing").textContent = names.length
    ? `${names.join(", ")} ${names.length === 1 ? "is" : "are"} typing…`
    : "";
}
setInterval(renderTyping, 1000);

function renderPresence() {
  const members = chat.presence.get(chat.current) || new Map();
  $("#presence").replaceChildren(
    ...[...members.values()].map((user) => {
      const li = document.createElement("li");
      li.dataset.userId = user.id;
      li.textContent = user.name || user.id;
      return li;
    }),
  );
}

function renderChannels() {
  $("#channels").replaceChildren(
    ...chat.channels.map((channel) => {
      const li = document.createElement("li");
      li.dataset.channelId = channel.id;
      li.textContent = `# ${channel.name}`;
      if (channel.id === chat.current) li.className = "active";
      li.onclick = () => selectChannel(channel.id);
      return li;
    }),
  );
  const current = chat.channels.find((c) => c.id === chat.current);
  $("#channel-title").textContent = current ? `# ${current.name}` : "";
}

function renderAll() {
  renderChannels();
  renderMessages();
  renderTyping();
  renderPresence();
}

const STATE_LABELS = {
  connecting: "Connecting…",
  ready: "Connected",
  reconnecting: "Reconnecting…",
  resumed: "Resumed",
  closed: "Disconnected",
};

function showConnection(state) {
  const el = $("#connection");
  el.dataset.state = state;
  el.textContent = STATE_LABELS[state] || state;
}

let noticeTimer = null;
function showNotice(text, seconds = 3) {
  const el = $("#rate-limit");
  el.hidden = false;
  el.textContent = text;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => (el.hidden = true), Math.max(1000, seconds * 1000));
}

function showRateLimit(retryAfter) {
  showNotice(`You are sending too fast; retrying in ${retryAfter.toFixed(1)} s.`, retryAfter);
}

// ---- data loading --------------------------------------------------------------------------------

async function loadHistory(channelId) {
  const page = await chat.client.request("GET", `/api/channels/${channelId}/messages?limit=${HISTORY_PAGE}`);
  const map = channelMessages(channelId);
  for (const message of page) map.set(message.id, message);
  if (channelId === chat.current) renderMessages();
}

async function loadPresence(channelId) {
  const members = await chat.client.request("GET", `/api/channels/${channelId}/presence`);
  chat.presence.set(channelId, new Map(members.map((user) => [user.id, user])));
  if (channelId === chat.current) renderPresence();
}

async function resync() {
  // After a fresh IDENTIFY (the session could not be resumed) events may have been missed:
  // refetch what the page shows. Messages are keyed by id, so overlaps merge without duplicates.
  await Promise.all(chat.channels.map((c) => loadHistory(c.id)));
  await loadPresence(chat.current);
}

function selectChannel(channelId) {
  chat.current = channelId;
  renderAll();
  loadPresence(channelId).catch(console.error);
}

// ---- actions ---------------------------------------------------------------------------------------

// Sending is a per-channel queue with one request in flight: the next message waits for the
// previous one's final answer, rate-limit retries included. Sending them concurrently let each
// 429'd request sleep its own retry_after, so a later message could win the race and be stored
// first (for everyone: the server's order is the order requests arrive), and several requests
// retrying into the same exhausted bucket ran out of retries. One at a time, the wait after a
// 429 is the bucket's real reset time and the stored order is the typed order.

function outboxOf(channelId) {
  if (!chat.outbox.has(channelId)) chat.outbox.set(channelId, { nonces: [], busy: false });
  return chat.outbox.get(channelId);
}

function sendMessage(content) {
  const box = outboxOf(chat.current);
  if (box.nonces.length >= MAX_OUTBOX_PER_CHANNEL) return false;
  const nonce = makeNonce();
  const message = { id: null, nonce, channel_id: chat.current, author: chat.user, content };
  chat.pending.set(nonce, { message, failed: null });
  renderMessages();
  enqueueSend(message.channel_id, nonce);
  return true;
}

function enqueueSend(channelId, nonce) {
  const box = outboxOf(channelId);
  box.nonces.push(nonce);
  if (!box.busy) drainOutbox(channelId, box);
}

async function drainOutbox(channelId, box) {
  box.busy = true;
  try {
    while (box.nonces.length) {
      const item = chat.pending.get(box.nonces.shift());
      // Dismissed, or already confirmed by its MESSAGE_CREATE: nothing to send.
      if (item && !item.failed) await deliver(item);
    }
  } finally {
    box.busy = false;
  }
}

async function deliver(item) {
  const { message } = item;
  try {
    // The same nonce goes in the body (echoed on the message for reconciliation) and as the
    // Idempotency-Key of every retry, so a retried send creates one message.
    const created = await chat.client.send(
      `/api/channels/${message.channel_id}/messages`,
      { content: message.content, nonce: message.nonce },
      { nonce: message.nonce },
    );
    upsertMessage(created);
  } catch (err) {
    // A failure does not hold the queue: later messages go on, this one waits for the user.
    if (chat.pending.get(message.nonce) === item) item.failed = err.message || "error";
  }
  if (message.channel_id === chat.current) renderMessages();
}

function retrySend(nonce) {
  const item = chat.pending.get(nonce);
  if (!item || !item.failed) return;
  if (outboxOf(item.message.channel_id).nonces.length >= MAX_OUTBOX_PER_CHANNEL) return;
  // Same nonce: if the failed attempt did reach the server, the retry gets the original answer
  // instead of a second message. It goes to the back of the queue (and of the pending list), as
  // it is now sent after whatever was typed meanwhile.
  item.failed = null;
  chat.pending.delete(nonce);
  chat.pending.set(nonce, item);
  renderMessages();
  enqueueSend(item.message.channel_id, nonce);
}

function dismissSend(nonce) {
  const item = chat.pending.get(nonce);
  if (!item || !item.failed) return;
  chat.pending.delete(nonce);
  renderMessages();
}

async function editMessage(message) {
  const content = window.prompt("Edit message", message.content);
  if (!content || content === message.content) return;
  const updated = await chat.client.request("PATCH", `/api/channels/${message.channel_id}/messages/${message.id}`, {
    body: { content },
  });
  upsertMessage(updated);
  renderMessages();
}

async function deleteMessage(message) {
  await chat.client.request("DELETE", `/api/channels/${message.channel_id}/messages/${message.id}`);
  channelMessages(message.channel_id).delete(message.id);
  renderMessages();
}

function sendTyping() {
  const now = Date.now();
  if (now - chat.lastTypingSent < TYPING_THROTTLE_MS) return;
  chat.lastTypingSent = now;
  chat.client.request("POST", `/api/channels/${chat.current}/typing`, { retries: 0 }).catch(() => {});
}

// ---- wiring ----------------------------------------------------------------------------------------

function wireGateway(client) {
  client.onState((state) => {
    chat.stateLog.push(state);
    showConnection(state);
  });
  client.onRateLimited((info) => showRateLimit(info.retryAfter));
  client.on("READY", () => {
    resync().catch(console.error);
  });
  client.on("MESSAGE_CREATE", (message) => {
    upsertMessage(message);
    if (message.channel_id === chat.current) {
      renderMessages();
      renderTyping();
    }
  });
  client.on("MESSAGE_UPDATE", (message) => {
    upsertMessage(message);
    if (message.channel_id === chat.current) renderMessages();
  });
  client.on("MESSAGE_DELETE", ({ id, channel_id }) => {
    channelMessages(channel_id).delete(id);
    if (channel_id === chat.current) renderMessages();
  });
  client.on("TYPING_START", ({ channel_id, user_id, user }) => {
    if (chat.user && user_id === chat.user.id) return;
    if (!chat.typing.has(channel_id)) chat.typing.set(channel_id, new Map());
    chat.typing.get(channel_id).set(user_id, { name: (user && user.name) || user_id, expires: Date.now() + TYPING_TTL_MS });
    if (channel_id === chat.current) renderTyping();
  });
  client.on("PRESENCE_UPDATE", ({ channel, user, status }) => {
    if (!chat.presence.has(channel)) chat.presence.set(channel, new Map());
    const members = chat.presence.get(channel);
    if (status === "online") members.set(user.id, user);
    else members.delete(user.id);
    if (channel === chat.current) renderPresence();
  });
}

async function start(token, user) {
  chat.user = user;
  $("#me").textContent = user.name;
  $("#login-view").hidden = true;
  $("#chat-view").hidden = false;
  chat.client = new SplitchatClient({ token, backoff: { base: 250, cap: 5000 } });
  chat.channels = await chat.client.request("GET", "/api/channels");
  chat.current = chat.channels.length ? chat.channels[0].id : null;
  for (const channel of chat.channels) chat.client.subscriptions.add(channel.id);
  chat.client.onResync = () => {}; // READY (first or after re-IDENTIFY) already triggers resync()
  wireGateway(chat.client);
  renderAll();
  chat.client.connect();
}

$("#login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = $("#name").value.trim();
  const response = await fetch("/api/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name }),
  });
  const body = await response.json();
  if (!response.ok) {
    $("#login-error").textContent = body.message || "login failed";
    return;
  }
  await start(body.token, body.user);
});

$("#composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("#content");
  const content = input.value;
  if (!content.trim() || !chat.current) return;
  if (sendMessage(content)) {
    input.value = "";
  } else {
    showNotice("Too many messages waiting to be sent; try again in a moment.");
  }
});

$("#content").addEventListener("input", () => {
  if (chat.client && chat.current) sendTyping();
});
