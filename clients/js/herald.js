// Herald JavaScript client: one dependency-free ES module for browsers and Node >= 20.
//
// What it does for the application:
// - authenticates with the first message (the token never appears in a URL), asks the token
//   function for a fresh token on the server's refresh notice and on every reconnect;
// - reconnects with exponential backoff and full jitter, so a restarted server is not hit by
//   every client at once; gives up only on close codes the protocol marks final (44xx);
// - detects a dead link with an application-level ping (browsers cannot send Ping frames);
// - rejoins every room with the last offset it saw and that offset's epoch, so the server
//   replays exactly what was missed, or says `recovered: false` when the room's stream was
//   recreated; acknowledges the inbox; drops duplicate message ids (at-least-once delivery);
// - queues requests made while offline and sends them once connected again; a join or leave
//   made offline changes the set of rooms the reconnect joins instead, so each room is joined
//   once and a room left offline is not joined again.
//
// The wire protocol is documented in docs/protocol.md.

const DEFAULTS = {
  reconnect: { initialDelay: 250, maxDelay: 15000, factor: 2 },
  heartbeat: { interval: 20000, timeout: 10000 },
  requestTimeout: 10000,
  maxQueued: 1000,
  dedupeWindow: 2000,
};

/** Close codes after which reconnecting would not help (see docs/protocol.md): 44xx, and
 * 1008 (policy violation), since the same client would be closed again. */
const isFinal = (code) => (code >= 4400 && code < 4500) || code === 1008;

/** An error answered by the server, or a request that could not complete. */
/**
 * A room's members as a client follows them: build it from `members(room)` right after the
 * join, then `apply` every 'presence' event of the room received since the join, in order
 * (those that arrived before the `members` answer too). `users` is null once the room is too
 * big for the server to list (the diffs then carry only the count).
 */
export class Roster {
  constructor(members) {
    this.users = new Set(members.users);
    this.count = members.count;
  }

  apply(diff) {
    this.count = diff.count;
    if (!diff.joined || !diff.left) {
      this.users = null;
      return;
    }
    if (!this.users) return;
    for (const user of diff.joined) this.users.add(user);
    for (const user of diff.left) this.users.delete(user);
  }
}

export class HeraldError extends Error {
  constructor(code, message, ref) {
    super(message);
    this.name = 'HeraldError';
    this.code = code;
    this.ref = ref;
  }
}

export class HeraldClient {
  /**
   * @param {string | string[]} url  ws:// or wss:// URL of the server's /ws endpoint, or the
   *   URLs of several nodes of one cluster: each reconnect attempt tries the next one.
   * @param {object} options  see herald.d.ts.
   */
  constructor(url, options = {}) {
    if (!options.token) throw new TypeError('options.token (a string or a function) is required');
    this.urls = Array.isArray(url) ? [...url] : [url];
    if (this.urls.length === 0) throw new TypeError('url: give at least one URL');
    this.urlIndex = 0;
    this.options = {
      ...DEFAULTS,
      ...options,
      reconnect: { ...DEFAULTS.reconnect, ...options.reconnect },
      heartbeat: { ...DEFAULTS.heartbeat, ...options.heartbeat },
    };
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (!this.WebSocket) throw new TypeError('no WebSocket implementation: pass options.WebSocket');
    this.state = 'closed';
    this.welcome = null;
    this.listeners = new Map();
    this.pending = new Map(); // request id -> { resolve, reject, timer }
    this.queue = []; // { id, frame } waiting for the connection
    // room -> { offset, epoch, fresh, joining, waiters }: the last offset seen (null before the
    // join's ack) and the epoch of the stream it belongs to (null until learned: an empty room has
    // none yet); `fresh` until a join of it has been sent (a join() made offline, whose since and
    // epoch go out as given); `joining` while a join of it is in flight on this connection;
    // `waiters`: ids of join() calls that the answer to the next join of the room settles.
    // Invariant: at most one join per room in flight, so the server never sees a second one.
    this.rooms = new Map();
    this.learningEpoch = new Set(); // rooms with an epoch lookup in flight
    this.seenIds = new Set();
    this.inboxOffset = null; // highest inbox offset received
    this.inboxAcked = null;
    this.nextId = 1;
    // Request ids are unique to this client (not only to its connection): a retried publish or
    // send is recognised by the server by its user and id, so two clients of one user must not
    // share ids.
    this.idPrefix = Math.random().toString(36).slice(2, 10);
    this.attempt = 0;
    this.socket = null;
    this.timers = {};
    this.stopped = true;
  }

  // ---- events ----------------------------------------------------------------------------

  /** Registers a listener; returns a function that removes it. */
  on(event, listener) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(listener);
    return () => this.off(event, listener);
  }

  off(event, listener) {
    this.listeners.get(event)?.delete(listener);
  }

  emit(event, payload) {
    for (const listener of this.listeners.get(event) ?? []) {
      try {
        listener(payload);
      } catch (error) {
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }

  setState(state, detail = {}) {
    if (this.state === state) return;
    this.state = state;
    this.emit('state', { state, ...detail });
  }

  // ---- lifecycle -------------------------------------------------------------------------

  /** Opens the connection; resolves with the welcome once authenticated. */
  connect() {
    this.stopped = false;
    if (this.state === 'open') return Promise.resolve(this.welcome);
    const opened = new Promise((resolve, reject) => {
      const offOpen = this.on('welcome', (welcome) => {
        offOpen();
        offClosed();
        resolve(welcome);
      });
      const offClosed = this.on('state', ({ state, code, reason }) => {
        if (state !== 'closed') return;
        offOpen();
        offClosed();
        reject(new HeraldError('closed', `connection closed (${code}): ${reason}`));
      });
    });
    if (this.state === 'closed') this.open();
    return opened;
  }

  /** Closes for good: no reconnect; queued and pending requests are rejected. */
  close() {
    this.stopped = true;
    this.clearTimers();
    if (this.socket) {
      try {
        this.socket.close(1000, 'client closed');
      } catch {
        // already closing
      }
    }
    this.failPending(new HeraldError('closed', 'client closed'));
    this.queue = [];
    this.setState('closed', { code: 1000, reason: 'client closed' });
  }

  async open() {
    this.setState(this.attempt === 0 ? 'connecting' : 'reconnecting', { attempt: this.attempt });
    let token;
    try {
      token = await this.token();
    } catch (error) {
      this.emit('error', new HeraldError('token', `token function failed: ${error.message}`));
      this.scheduleReconnect();
      return;
    }
    if (this.stopped) return;
    let socket;
    try {
      socket = new this.WebSocket(this.socketUrl());
    } catch (error) {
      this.emit('error', error);
      this.scheduleReconnect();
      return;
    }
    socket.binaryType = 'arraybuffer';
    this.socket = socket;
    socket.onopen = () => {
      this.touch();
      this.sendFrame(JSON.stringify({ type: 'auth', token }));
    };
    socket.onmessage = (event) => {
      if (socket !== this.socket) return;
      this.touch();
      this.onFrame(event.data);
    };
    socket.onclose = (event) => {
      if (socket !== this.socket) return;
      this.onClose(event.code, event.reason);
    };
    socket.onerror = () => {
      if (socket !== this.socket || socket.readyState !== 0) return;
      // An error while still CONNECTING: the connection could not be established. Browsers set
      // CLOSED before the error and a close event follows, but Node 20's WebSocket (undici 6)
      // fires no close event and stays CONNECTING (nodejs/undici#3546), which left the client
      // waiting forever. The attempt ends here; undici has already dropped its socket, and
      // calling close() would only fire another error.
      this.onClose(1006, 'connection failed');
    };
  }

  /** The node this client is using (or will try next), one of the URLs it was given. */
  get url() {
    return this.urls[this.urlIndex];
  }

  /** The URL to open: with the device id as the `device` query parameter when one is set. */
  socketUrl() {
    const { device } = this.options;
    if (!device) return this.url;
    const url = new URL(this.url);
    url.searchParams.set('device', device);
    return url.toString();
  }

  async token() {
    const { token } = this.options;
    return typeof token === 'function' ? await token() : token;
  }

  onClose(code, reason) {
    this.socket = null;
    for (const position of this.rooms.values()) position.joining = false;
    this.welcome = null;
    this.clearTimers();
    // Stored publishes and direct messages in flight may have been stored: they are sent again
    // after the reconnect with the same id, and the server answers a retry with the first
    // attempt's ack instead of storing it twice. Other requests in flight may or may not have
    // been carried out; their callers decide. Queued ones were never sent and wait for the next
    // connection.
    this.requeueRetries();
    this.failPending(new HeraldError('disconnected', `connection lost (${code}) before an answer`), {
      onlySent: true,
    });
    if (this.stopped) return;
    if (isFinal(code)) {
      this.stopped = true;
      this.failPending(new HeraldError('closed', `closed by the server (${code}): ${reason}`));
      this.queue = [];
      this.setState('closed', { code, reason });
      return;
    }
    this.scheduleReconnect(code, reason);
  }

  scheduleReconnect(code, reason) {
    if (this.stopped) return;
    this.attempt += 1;
    // With several nodes, the next attempt goes to the next one: the node that dropped the
    // connection may be gone, and every node of a cluster serves the same rooms and inboxes.
    this.urlIndex = (this.urlIndex + 1) % this.urls.length;
    // Emitted for every attempt (not only on a change of state), with its number.
    this.state = 'reconnecting';
    this.emit('state', { state: 'reconnecting', attempt: this.attempt, code, reason });
    const { initialDelay, maxDelay, factor } = this.options.reconnect;
    const ceiling = Math.min(maxDelay, initialDelay * factor ** (this.attempt - 1));
    // Full jitter: a random delay up to the ceiling spreads a crowd of clients evenly.
    const delay = Math.random() * ceiling;
    this.timers.reconnect = setTimeout(() => this.open(), delay);
  }

  clearTimers() {
    for (const timer of Object.values(this.timers)) {
      clearTimeout(timer);
      clearInterval(timer);
    }
    this.timers = {};
  }

  // ---- liveness --------------------------------------------------------------------------

  touch() {
    this.lastSeen = Date.now();
  }

  startHeartbeat() {
    const { interval, timeout } = this.options.heartbeat;
    clearInterval(this.timers.heartbeat);
    this.timers.heartbeat = setInterval(() => {
      if (Date.now() - this.lastSeen > interval + timeout) {
        // Nothing at all for too long, not even the pong: the link is dead.
        this.socket?.close(4000, 'heartbeat timeout');
        if (this.socket) this.onClose(4000, 'heartbeat timeout');
        return;
      }
      this.sendFrame(JSON.stringify({ type: 'ping' }));
    }, interval);
  }

  // ---- incoming --------------------------------------------------------------------------

  onFrame(data) {
    if (typeof data !== 'string') {
      this.onBinary(new Uint8Array(data));
      return;
    }
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      this.emit('error', new HeraldError('protocol', 'server sent invalid JSON'));
      return;
    }
    switch (event.type) {
      case 'welcome':
        this.onWelcome(event);
        break;
      case 'message':
        this.onMessage(event);
        break;
      case 'presence_diff':
        this.emit('presence', event);
        break;
      case 'refresh':
        this.refreshToken();
        break;
      case 'error':
        if (event.ref && this.settle(event.ref, null, event)) break;
        this.emit('error', new HeraldError(event.code, event.message, event.ref));
        break;
      default:
        // ack, members, history, pong: answers to requests.
        if (event.ref) this.settle(event.ref, event, null);
    }
  }

  onBinary(bytes) {
    if (bytes.length < 4) return;
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const headerLength = view.getUint32(0);
    if (4 + headerLength > bytes.length) return;
    const header = JSON.parse(new TextDecoder().decode(bytes.subarray(4, 4 + headerLength)));
    this.onMessage({ ...header, content: bytes.slice(4 + headerLength), binary: true });
  }

  onWelcome(welcome) {
    this.attempt = 0;
    this.welcome = welcome;
    this.startHeartbeat();
    // Open, but tell no one yet: rejoins go out first, then what was queued offline, so that a
    // publish queued (or made by a 'state' listener) finds its room joined. The server handles
    // one connection's frames in order.
    this.state = 'open';
    for (const room of this.rooms.keys()) this.sendJoin(room);
    const queued = this.queue;
    this.queue = [];
    for (const { id, frame } of queued) {
      const waiting = this.pending.get(id);
      if (waiting && this.sendFrame(frame)) waiting.sent = true;
    }
    this.emit('state', { state: 'open', welcome });
    this.emit('welcome', welcome);
  }

  onMessage(message) {
    // Offsets first, duplicates included: a replay after `since: 0` or `recovered: false` is
    // mostly messages already seen, and the position must still move past them.
    if (message.offset != null) {
      if (message.room != null) {
        const position = this.rooms.get(message.room);
        if (position) {
          if (position.offset == null || message.offset > position.offset) position.offset = message.offset;
          if (position.epoch == null) this.learnEpoch(message.room);
        }
      } else if (message.to) {
        this.noteInbox(message.offset);
      }
    }
    if (message.id) {
      if (this.seenIds.has(message.id)) return;
      this.seenIds.add(message.id);
      if (this.seenIds.size > this.options.dedupeWindow) {
        this.seenIds.delete(this.seenIds.values().next().value);
      }
    }
    this.emit('message', message);
  }

  /**
   * Sends the one join of a tracked room: a rejoin from the last offset seen, with its epoch, or
   * for a room first joined offline (`fresh`) the app's join. Settles the join() calls waiting.
   */
  sendJoin(room) {
    const position = this.rooms.get(room);
    const rejoin = !position.fresh;
    const join = { type: 'join', room };
    if (position.offset != null) {
      // An offset whose epoch was never learned cannot be told from an offset of a recreated
      // stream, so a rejoin does not trust it: since 0 asks for the whole room (the server
      // answers recovered:false beyond store.max_recovery) and the dedupe drops what was seen.
      if (rejoin && position.epoch == null) position.offset = 0;
      join.since = position.offset;
      if (position.epoch != null) join.epoch = position.epoch;
    }
    position.fresh = false;
    position.joining = true;
    const waiters = () => position.waiters.splice(0);
    // 'rejoined' goes out as its ack is read, before the replayed messages behind it: they
    // often arrive in the same read, and a promise callback would run only after them.
    const onAnswer = (ack) => {
      position.joining = false;
      this.noteJoined(room, ack);
      if (rejoin) this.emit('rejoined', { room, recovered: ack.recovered ?? null, ack });
      for (const id of waiters()) this.settle(id, { ...ack, ref: id }, null);
    };
    this.request(join, { queue: false, onAnswer }).catch((error) => {
      position.joining = false;
      // Lost with the connection: the waiters stay for the next connection's join.
      if (error.code === 'disconnected' || error.code === 'offline') {
        if (rejoin) this.emit('error', error);
        return;
      }
      // Refused (forbidden, limit_exceeded): a room never joined is not tried again.
      if (!rejoin && this.rooms.get(room) === position) this.rooms.delete(room);
      const ids = waiters();
      for (const id of ids) this.settle(id, null, error);
      if (ids.length === 0) this.emit('error', error);
    });
  }

  /**
   * Takes a room's position from the ack of a join (first join or rejoin). Runs as the ack is
   * read, before the replayed messages behind it, which move the offset on from there.
   */
  noteJoined(room, ack) {
    const position = this.rooms.get(room);
    if (!position) return; // left meanwhile
    if (ack.recovered === false) {
      // The old offset means nothing in this stream: the page and the live messages that
      // follow count from its start.
      position.offset = 0;
      position.epoch = ack.epoch ?? null;
    } else if (ack.recovered === true) {
      position.epoch = ack.epoch ?? position.epoch;
    } else {
      if (position.offset == null) position.offset = ack.offset ?? null;
      this.noteEpoch(room, ack.epoch);
    }
  }

  /** An epoch read on this connection: the one of the stream its offsets of `room` come from. */
  noteEpoch(room, epoch) {
    const position = this.rooms.get(room);
    if (position && position.epoch == null && epoch != null) position.epoch = epoch;
  }

  /**
   * A room joined while empty has no epoch in its join ack, and messages carry none: one
   * history entry tells it, so that the next rejoin can send `since` with its epoch.
   */
  learnEpoch(room) {
    if (this.learningEpoch.has(room) || this.state !== 'open') return;
    this.learningEpoch.add(room);
    this.request({ type: 'history', room, limit: 1 }, { queue: false })
      .then((page) => this.noteEpoch(room, page.epoch))
      .catch(() => {}) // the next message asks again; until then a rejoin uses since 0
      .finally(() => this.learningEpoch.delete(room));
  }

  noteInbox(offset) {
    if (this.inboxOffset == null || offset > this.inboxOffset) this.inboxOffset = offset;
    // One ack per burst: the highest offset is enough ("delivered up to").
    if (this.timers.inbox) return;
    this.timers.inbox = setTimeout(() => {
      delete this.timers.inbox;
      if (this.inboxOffset !== this.inboxAcked && this.state === 'open') {
        this.inboxAcked = this.inboxOffset;
        this.sendFrame(JSON.stringify({ type: 'ack', inbox: this.inboxOffset }));
      }
    }, 50);
  }

  async refreshToken() {
    try {
      const token = await this.token();
      await this.request({ type: 'refresh', token }, { queue: false });
    } catch (error) {
      this.emit('error', error);
    }
  }

  // ---- requests --------------------------------------------------------------------------

  settle(ref, answer, error) {
    const waiting = this.pending.get(ref);
    if (!waiting) return false;
    this.pending.delete(ref);
    clearTimeout(waiting.timer);
    if (error) {
      waiting.reject(new HeraldError(error.code, error.message, ref));
    } else {
      waiting.onAnswer?.(answer);
      waiting.resolve(answer);
    }
    return true;
  }

  /** Puts the sent requests that can be retried back at the head of the queue, in order. */
  requeueRetries() {
    const retries = [];
    for (const [id, waiting] of this.pending) {
      if (!waiting.sent || !waiting.retry) continue;
      waiting.sent = false;
      retries.push({ id, frame: waiting.retry });
    }
    this.queue = [...retries, ...this.queue];
  }

  /** Rejects the requests already sent (`onlySent`) or all of them. */
  failPending(error, { onlySent = false } = {}) {
    for (const [id, waiting] of this.pending) {
      if (onlySent && !waiting.sent) continue;
      clearTimeout(waiting.timer);
      waiting.reject(error);
      this.pending.delete(id);
    }
  }

  sendFrame(frame) {
    if (!this.socket || this.socket.readyState !== 1) return false;
    this.socket.send(frame);
    return true;
  }

  /**
   * Sends a request and resolves with the server's answer (ack, members, history, pong).
   * While offline the request waits in a bounded queue unless `queue` is false. `onAnswer` runs
   * with the answer as soon as it is read, before the frames that follow it.
   */
  request(body, { queue = true, binary = null, onAnswer = null } = {}) {
    const { id, promise } = this.expect(body.type, onAnswer);
    const waiting = this.pending.get(id);
    const frame = binary ? encodeBinary({ ...body, id }, binary) : JSON.stringify({ ...body, id });
    const stored = body.type === 'send' || (body.type === 'publish' && body.persist !== false);
    if (stored) waiting.retry = frame;
    if (this.state === 'open' && this.sendFrame(frame)) {
      waiting.sent = true;
    } else if (!queue) {
      this.settle(id, null, { code: 'offline', message: 'not connected' });
    } else if (this.queue.length >= this.options.maxQueued) {
      this.settle(id, null, { code: 'queue_full', message: 'too many requests queued while offline' });
    } else {
      this.queue.push({ id, frame });
    }
    return promise;
  }

  /**
   * A pending answer under a new id, rejected with `timeout` after requestTimeout. Settled by the
   * answer to the request sent with that id, or, for a join() folded into its room's join, by
   * the answer to that join.
   */
  expect(type, onAnswer = null) {
    const id = `${this.idPrefix}-${this.nextId++}`;
    const promise = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        this.queue = this.queue.filter((entry) => entry.id !== id);
        reject(new HeraldError('timeout', `no answer to ${type} within ${this.options.requestTimeout} ms`, id));
      }, this.options.requestTimeout);
      this.pending.set(id, { resolve, reject, timer, sent: false, onAnswer });
    });
    return { id, promise };
  }

  /** A direct message to one or more users (every connection of each). */
  send(to, content) {
    const users = Array.isArray(to) ? to : [to];
    return this.withContent({ type: 'send', to: users }, content);
  }

  /**
   * Joins a room; later reconnects rejoin it from the last offset seen, with its epoch.
   * `since` (and the `epoch` it belongs to) asks for the messages after it, as a rejoin does.
   * Made offline, or while a join of the room is in flight, it sends nothing of its own: it
   * resolves with the answer to the room's one join (on reconnect, the rejoin, whose own
   * position then wins over `since`).
   */
  join(room, { since, epoch } = {}) {
    let position = this.rooms.get(room);
    if (position && this.state === 'open' && !position.joining) {
      // Joined on this connection: the server answers with the current count (and refuses
      // `since`, which applies to a new join only).
      const body = { type: 'join', room };
      if (since != null) body.since = since;
      if (since != null && epoch != null) body.epoch = epoch;
      return this.request(body, { onAnswer: (ack) => this.noteJoined(room, ack) });
    }
    if (!position) {
      const offset = since ?? null;
      position = { offset, epoch: since != null ? (epoch ?? null) : null, fresh: true, joining: false, waiters: [] };
      this.rooms.set(room, position);
    }
    const { id, promise } = this.expect('join');
    position.waiters.push(id);
    if (this.state === 'open' && !position.joining) this.sendJoin(room);
    return promise;
  }

  /**
   * Leaves a room; reconnects no longer rejoin it. Made offline, for a room the client had
   * joined (or was to join), it sends nothing: the server dropped the old connection's rooms
   * with it. It then resolves at once, with an ack without `count`, and rejects the join() calls
   * still waiting for the room with `cancelled`.
   */
  leave(room) {
    const position = this.rooms.get(room);
    this.rooms.delete(room);
    if (position && this.state !== 'open') {
      for (const id of position.waiters.splice(0)) {
        this.settle(id, null, { code: 'cancelled', message: `left room ${room} before it was joined` });
      }
      return Promise.resolve({ type: 'ack', ref: `${this.idPrefix}-${this.nextId++}`, room });
    }
    return this.request({ type: 'leave', room });
  }

  async publish(room, content, { echo = true, persist = true } = {}) {
    const ack = await this.withContent({ type: 'publish', room, echo, persist }, content);
    this.noteEpoch(room, ack.epoch);
    return ack;
  }

  broadcast(content) {
    return this.withContent({ type: 'broadcast' }, content);
  }

  /** Every user in the room, following the pages of `members` to the last. */
  async members(room) {
    const all = await this.membersPage(room);
    while (all.next != null) {
      const page = await this.membersPage(room, { after: all.next });
      all.users.push(...page.users);
      all.count = page.count;
      all.next = page.next;
    }
    return all;
  }

  /** One page of the room's users: those after `after`, at most `limit` (server default 1000). */
  membersPage(room, { after, limit } = {}) {
    const body = { type: 'members', room };
    if (after != null) body.after = after;
    if (limit != null) body.limit = limit;
    return this.request(body);
  }

  /** One page of history: `{room}` or `{with: user}`, optional `before` offset and `limit`. */
  async history({ room, with: user, before, limit } = {}) {
    const body = { type: 'history' };
    if (room != null) body.room = room;
    if (user != null) body.with = user;
    if (before != null) body.before = before;
    if (limit != null) body.limit = limit;
    const page = await this.request(body);
    if (room != null) this.noteEpoch(room, page.epoch);
    return page;
  }

  ping() {
    return this.request({ type: 'ping' });
  }

  withContent(body, content) {
    if (content instanceof ArrayBuffer || ArrayBuffer.isView(content)) {
      return this.request(body, { binary: toBytes(content) });
    }
    return this.request({ ...body, content });
  }
}

function toBytes(content) {
  if (content instanceof ArrayBuffer) return new Uint8Array(content);
  return new Uint8Array(content.buffer, content.byteOffset, content.byteLength);
}

/** A binary frame: u32 big-endian header length, the JSON header, then the payload. */
function encodeBinary(header, payload) {
  const headerBytes = new TextEncoder().encode(JSON.stringify(header));
  const frame = new Uint8Array(4 + headerBytes.length + payload.length);
  new DataView(frame.buffer).setUint32(0, headerBytes.length);
  frame.set(headerBytes, 4);
  frame.set(payload, 4 + headerBytes.length);
  return frame;
}
