// Herald chat page: rooms, direct messages, presence and history on the Herald JS client.
// Plain ES module, no framework: the state lives in `conversations`, and `render*` functions
// redraw the part of the page that changed.

import { HeraldClient } from '/herald.js';

const $ = (id) => document.getElementById(id);
const HISTORY_PAGE = 50;
const DEFAULT_ROOMS = ['lobby'];

/** key ('#room' or '@user') -> { kind, name, messages, ids, unread, count, more, oldest } */
const conversations = new Map();
let client = null;
let me = null;
let active = null;
let members = [];
/** user -> online, for the direct-message list. */
const online = new Map();
/**
 * Presence of the people you talk to stays live: it is asked again whenever one of them joins
 * or leaves a room you share, when a conversation opens, after a reconnect, and every
 * PRESENCE_POLL for partners who share no room with you.
 */
const PRESENCE_POLL = 15000;
/**
 * A `left` is sent before the server drops the connection from presence: when an answer right
 * after a `left` still says online, ask once more after this delay.
 */
const PRESENCE_RECHECK = 1000;

// ---- sign-in ------------------------------------------------------------------------------

const saved = () => JSON.parse(sessionStorage.getItem('herald.signin') ?? 'null');

async function devToken(name) {
  const response = await fetch('/dev/token', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ user: name }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error ?? `sign-in failed (${response.status})`);
  return body.token;
}

$('signin-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const name = $('name').value.trim();
  const token = $('token').value.trim();
  $('signin-error').textContent = '';
  try {
    if (token) {
      sessionStorage.setItem('herald.signin', JSON.stringify({ token }));
    } else if (name) {
      await devToken(name); // fails early with a clear message if dev login is off
      sessionStorage.setItem('herald.signin', JSON.stringify({ name }));
    } else {
      throw new Error('enter a name (development login) or paste a token');
    }
    start();
  } catch (error) {
    $('signin-error').textContent = error.message;
  }
});

$('signout').addEventListener('click', () => {
  sessionStorage.removeItem('herald.signin');
  client?.close();
  location.reload();
});

// ---- connection ---------------------------------------------------------------------------

function start() {
  const signin = saved();
  if (!signin) {
    $('signin').hidden = false;
    $('chat').hidden = true;
    return;
  }
  $('signin').hidden = true;
  $('chat').hidden = false;
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  client = new HeraldClient(`${scheme}://${location.host}/ws`, {
    // A development sign-in gets a fresh token on every connect and refresh.
    token: signin.token ? () => signin.token : () => devToken(signin.name),
  });
  client.on('state', ({ state }) => {
    renderConnection(state);
    if (state === 'open') refreshOnline();
  });
  client.on('welcome', (welcome) => {
    me = welcome.user;
    $('me-name').textContent = me;
  });
  client.on('message', onMessage);
  client.on('presence', onPresence);
  client.on('rejoined', ({ room, recovered }) => {
    if (recovered === false) notice(`#${room}`, 'some messages could not be recovered');
  });
  client.on('error', (error) => console.warn('herald:', error));
  client
    .connect()
    .then(async () => {
      const rooms = JSON.parse(localStorage.getItem(`herald.rooms.${me}`) ?? 'null') ?? DEFAULT_ROOMS;
      for (const room of rooms) await joinRoom(room, { activate: room === rooms[0] });
    })
    .catch((error) => {
      sessionStorage.removeItem('herald.signin');
      $('signin-error').textContent = error.message;
      $('signin').hidden = false;
      $('chat').hidden = true;
    });
  setInterval(() => refreshOnline(), PRESENCE_POLL);
}

function renderConnection(state) {
  const indicator = $('connection');
  indicator.dataset.state = state;
  indicator.textContent = { open: 'connected', reconnecting: 'reconnecting…', connecting: 'connecting…', closed: 'offline' }[state];
}

// ---- conversations ------------------------------------------------------------------------

function conversation(key) {
  if (!conversations.has(key)) {
    conversations.set(key, {
      kind: key[0] === '#' ? 'room' : 'direct',
      name: key.slice(1),
      messages: [],
      ids: new Set(),
      unread: 0,
      count: null,
      more: true,
      oldest: null,
      loaded: false,
    });
  }
  return conversations.get(key);
}

function saveRooms() {
  const rooms = [...conversations.values()].filter((c) => c.kind === 'room').map((c) => c.name);
  localStorage.setItem(`herald.rooms.${me}`, JSON.stringify(rooms));
}

async function joinRoom(room, { activate = true } = {}) {
  const conv = conversation(`#${room}`);
  const ack = await client.join(room);
  conv.count = ack.count;
  saveRooms();
  renderLists();
  if (activate) await open(`#${room}`);
}

async function open(key) {
  active = key;
  const conv = conversation(key);
  conv.unread = 0;
  $('chat').dataset.view = 'conversation';
  $('title').textContent = conv.kind === 'room' ? `#${conv.name}` : conv.name;
  $('text').disabled = false;
  $('composer').querySelector('button').disabled = false;
  if (conv.kind === 'direct') refreshOnline([conv.name]);
  if (!conv.loaded) {
    conv.loaded = true;
    await loadOlder(conv);
  }
  renderLists();
  renderMessages({ toBottom: true });
  await renderMembers();
  $('text').focus();
}

async function loadOlder(conv) {
  if (!conv.more) return;
  const query = conv.kind === 'room' ? { room: conv.name } : { with: conv.name };
  const page = await client.history({ ...query, limit: HISTORY_PAGE, ...(conv.oldest != null ? { before: conv.oldest } : {}) });
  conv.more = page.more;
  const older = page.messages.filter((m) => !conv.ids.has(m.id));
  for (const m of older) conv.ids.add(m.id);
  conv.messages = [...older, ...conv.messages];
  if (page.messages.length) conv.oldest = page.messages[0].offset;
}

function keyFor(message) {
  if (message.room != null) return `#${message.room}`;
  if (message.to) {
    const other = message.from === me ? message.to.find((u) => u !== me) ?? me : message.from;
    return `@${other}`;
  }
  return '#broadcast';
}

function onMessage(message) {
  const key = keyFor(message);
  const conv = conversation(key);
  if (conv.ids.has(message.id)) return;
  conv.ids.add(message.id);
  conv.messages.push(message);
  if (key !== active) conv.unread += 1;
  renderLists();
  if (key === active) renderMessages({ toBottom: true });
}

// One `presence_diff` per room and window; in a big room it carries only the count.
function onPresence(diff) {
  const conv = conversation(`#${diff.room}`);
  conv.count = diff.count;
  for (const user of diff.joined ?? []) {
    notice(`#${diff.room}`, `${user} joined`);
    // Joining proves they are online.
    if (user !== me && conversations.has(`@${user}`)) setOnline(user, true);
  }
  const partnersLeft = [];
  for (const user of diff.left ?? []) {
    notice(`#${diff.room}`, `${user} left`);
    if (user !== me && conversations.has(`@${user}`)) partnersLeft.push(user);
  }
  // Leaving a room may or may not mean they went offline: ask.
  if (partnersLeft.length) refreshOnline(partnersLeft, { recheck: true });
  renderLists();
  if (active === `#${diff.room}`) renderMembers();
}

function notice(key, text) {
  const conv = conversation(key);
  conv.messages.push({ notice: text, id: `notice-${Date.now()}-${Math.random()}` });
  if (key === active) renderMessages({ toBottom: true });
}

function directPartners() {
  return [...conversations.values()].filter((c) => c.kind === 'direct').map((c) => c.name);
}

function setOnline(user, isOnline) {
  if (online.get(user) === isOnline) return;
  online.set(user, isOnline);
  renderLists();
  if (active === `@${user}`) renderMembers();
}

async function refreshOnline(users = directPartners(), { recheck = false } = {}) {
  if (!users.length || client?.state !== 'open') return;
  try {
    const answer = await client.request({ type: 'presence', users });
    for (const [user, isOnline] of Object.entries(answer.online)) setOnline(user, isOnline);
    const stillOnline = users.filter((user) => answer.online[user]);
    if (recheck && stillOnline.length) setTimeout(() => refreshOnline(stillOnline), PRESENCE_RECHECK);
  } catch (error) {
    console.warn('presence:', error);
  }
}

// ---- rendering ----------------------------------------------------------------------------

function item(label, { current, badge, trailing, dot }) {
  const li = document.createElement('li');
  if (dot !== undefined) {
    const d = document.createElement('span');
    d.className = `dot${dot ? ' online' : ''}`;
    d.title = dot ? 'online' : 'offline';
    li.append(d);
  }
  const name = document.createElement('span');
  name.className = 'name';
  name.textContent = label;
  li.append(name);
  if (trailing != null) {
    const t = document.createElement('span');
    t.className = 'count';
    t.textContent = trailing;
    li.append(t);
  }
  if (badge) {
    const b = document.createElement('span');
    b.className = 'badge';
    b.textContent = badge;
    b.setAttribute('aria-label', `${badge} unread`);
    li.append(b);
  }
  if (current) li.setAttribute('aria-current', 'true');
  return li;
}

function renderLists() {
  const rooms = $('rooms');
  const directs = $('directs');
  rooms.replaceChildren();
  directs.replaceChildren();
  for (const [key, conv] of conversations) {
    if (key === '#broadcast' && !conv.messages.length) continue;
    const li =
      conv.kind === 'room'
        ? item(`#${conv.name}`, { current: key === active, badge: conv.unread, trailing: conv.count != null ? `${conv.count} online` : null })
        : item(conv.name, { current: key === active, badge: conv.unread, dot: online.get(conv.name) ?? false });
    li.dataset.key = key;
    li.addEventListener('click', () => open(key));
    (conv.kind === 'room' ? rooms : directs).append(li);
  }
}

function renderMessages({ toBottom = false, keepFrom = null } = {}) {
  const list = $('messages');
  const conv = conversations.get(active);
  const fragments = (conv?.messages ?? []).map((m) => {
    const div = document.createElement('div');
    if (m.notice) {
      div.className = 'notice';
      div.textContent = m.notice;
      return div;
    }
    div.className = `message${m.from === me ? ' mine' : ''}`;
    div.dataset.id = m.id;
    const meta = document.createElement('div');
    meta.className = 'meta';
    meta.textContent = `${m.from} · ${new Date(m.ts).toLocaleTimeString()}`;
    const body = document.createElement('div');
    body.className = 'body';
    body.textContent = typeof m.content === 'string' ? m.content : m.content?.text ?? JSON.stringify(m.content);
    div.append(meta, body);
    return div;
  });
  list.replaceChildren(...fragments);
  if (toBottom) list.scrollTop = list.scrollHeight;
  else if (keepFrom != null) list.scrollTop = list.scrollHeight - keepFrom;
}

async function renderMembers() {
  const conv = conversations.get(active);
  const panel = $('members');
  if (!conv || conv.kind !== 'room') {
    panel.replaceChildren();
    $('member-count').textContent = '';
    $('subtitle').textContent = conv ? (online.get(conv.name) ? 'online' : 'offline') : '';
    return;
  }
  let answer;
  try {
    answer = await client.members(conv.name);
  } catch (error) {
    // Lost with the connection: the list is drawn again at the next presence event in the
    // room or when the room is opened again.
    console.warn('members:', error);
    return;
  }
  members = answer.users;
  $('member-count').textContent = `(${answer.count})`;
  $('subtitle').textContent = `${answer.count} online`;
  panel.replaceChildren(
    ...members.map((user) => {
      const li = item(user === me ? `${user} (you)` : user, { dot: true });
      if (user !== me) {
        li.title = `message ${user}`;
        li.addEventListener('click', () => {
          online.set(user, true);
          open(`@${user}`);
        });
      }
      return li;
    }),
  );
}

// ---- interactions -------------------------------------------------------------------------

$('composer').addEventListener('submit', async (event) => {
  event.preventDefault();
  const text = $('text').value.trim();
  if (!text || !active) return;
  $('text').value = '';
  const conv = conversations.get(active);
  try {
    if (conv.kind === 'room') await client.publish(conv.name, { text });
    else {
      const ack = await client.send(conv.name, { text });
      // Our own sending connection gets the ack, not a copy: show the message ourselves.
      onMessage({ id: ack.id, from: me, to: [conv.name], content: { text }, ts: Date.now() });
    }
  } catch (error) {
    notice(active, `not sent: ${error.message}`);
  }
});

$('join-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const room = $('join-room').value.trim();
  if (!room) return;
  $('join-room').value = '';
  try {
    await joinRoom(room);
  } catch (error) {
    alert(`cannot join ${room}: ${error.message}`);
  }
});

$('messages').addEventListener('scroll', async () => {
  const list = $('messages');
  const conv = conversations.get(active);
  if (list.scrollTop > 40 || !conv?.more || conv.loadingOlder) return;
  conv.loadingOlder = true;
  const fromBottom = list.scrollHeight - list.scrollTop;
  try {
    await loadOlder(conv);
    renderMessages({ keepFrom: fromBottom });
  } finally {
    conv.loadingOlder = false;
  }
});

$('back').addEventListener('click', () => {
  $('chat').dataset.view = 'list';
  active = null;
  renderLists();
});

$('chat').dataset.view = 'list';
start();
