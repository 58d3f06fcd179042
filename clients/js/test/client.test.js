// The JavaScript client against a real Herald server.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { HeraldClient, HeraldError, Roster } from '../herald.js';
import { mint, nextEvent, startRedis, startServer } from './server.js';

const clients = [];
function client(server, user, options = {}) {
  const c = new HeraldClient(server.url, {
    token: () => mint(user),
    reconnect: { initialDelay: 50, maxDelay: 500 },
    ...options,
  });
  clients.push(c);
  return c;
}

function closeAll() {
  while (clients.length) clients.pop().close();
}

describe('messaging', () => {
  let server;
  before(async () => {
    server = await startServer();
  });
  after(async () => {
    closeAll();
    await server.stop();
  });

  test('connects with message auth and reports its states', async () => {
    const alice = client(server, 'alice');
    const states = [];
    alice.on('state', ({ state }) => states.push(state));
    const welcome = await alice.connect();
    assert.equal(welcome.user, 'alice');
    assert.deepEqual(states, ['connecting', 'open']);
    assert.equal(alice.state, 'open');
  });

  test('direct messages arrive with the authenticated sender and the ack lists who was online', async () => {
    const carol = client(server, 'carol');
    const bob = client(server, 'bob');
    await Promise.all([carol.connect(), bob.connect()]);
    const received = nextEvent(bob, 'message');
    const ack = await carol.send(['bob', 'nobody'], { text: 'hi' });
    assert.deepEqual(ack.online, ['bob']);
    assert.deepEqual(ack.offline, ['nobody']);
    const message = await received;
    assert.equal(message.from, 'carol');
    assert.deepEqual(message.content, { text: 'hi' });
    assert.equal(message.id, ack.id);
  });

  test('rooms: join, presence events, publish, members, leave', async () => {
    const ann = client(server, 'ann');
    const ben = client(server, 'ben');
    await Promise.all([ann.connect(), ben.connect()]);
    await ann.join('lobby');
    const roster = new Roster(await ann.members('lobby'));
    const diffs = [];
    ann.on('presence', (diff) => diffs.push(diff));
    const joined = nextEvent(ann, 'presence', (diff) => diff.joined?.includes('ben'));
    const ack = await ben.join('lobby');
    assert.equal(ack.count, 2);
    assert.equal((await joined).count, 2);
    for (const diff of diffs.splice(0)) roster.apply(diff);
    assert.deepEqual([...roster.users].sort(), ['ann', 'ben']);
    assert.equal(roster.count, 2);

    const got = nextEvent(ben, 'message');
    await ann.publish('lobby', 'hello room', { echo: false });
    const message = await got;
    assert.equal(message.room, 'lobby');
    assert.equal(message.content, 'hello room');

    const members = await ann.members('lobby');
    assert.deepEqual(members.users, ['ann', 'ben']);
    const page = await ann.membersPage('lobby', { limit: 1 });
    assert.deepEqual([page.users, page.next], [['ann'], 'ann']);
    const rest = await ann.membersPage('lobby', { after: page.next });
    assert.deepEqual([rest.users, rest.next], [['ben'], undefined]);
    const left = nextEvent(ann, 'presence', (diff) => diff.left?.includes('ben'));
    await ben.leave('lobby');
    assert.equal((await left).count, 1);
    for (const diff of diffs.splice(0)) roster.apply(diff);
    assert.deepEqual([...roster.users], ['ann']);
  });

  test('binary content travels as bytes', async () => {
    const a = client(server, 'bin-a');
    const b = client(server, 'bin-b');
    await Promise.all([a.connect(), b.connect()]);
    const got = nextEvent(b, 'message');
    await a.send('bin-b', new Uint8Array([0, 1, 254, 255]));
    const message = await got;
    assert.equal(message.binary, true);
    assert.deepEqual([...message.content], [0, 1, 254, 255]);
  });

  test('server errors reject the request with their code', async () => {
    const a = client(server, 'err-a');
    await a.connect();
    await assert.rejects(a.publish('never-joined', 1), (error) => {
      assert.ok(error instanceof HeraldError);
      assert.equal(error.code, 'not_member');
      return true;
    });
    await assert.rejects(a.broadcast('x'), { code: 'forbidden' });
  });
});

describe('resilience', () => {
  after(closeAll);

  test('a server restart: reconnects with backoff, rejoins its rooms, sends what was queued offline', async () => {
    let server = await startServer();
    const address = server.address;
    const alice = client(server, 'alice');
    const bob = client(server, 'bob');
    await Promise.all([alice.connect(), bob.connect()]);
    await alice.join('room');
    await bob.join('room');

    const reconnecting = nextEvent(alice, 'state', ({ state }) => state === 'reconnecting');
    await server.stop();
    await reconnecting;
    // Made while the server is down: queued, sent after the reconnect and the rejoin.
    const queued = alice.publish('room', 'sent while offline');
    // Listening before the restart: Bob gets the message live, or, when Alice is back first,
    // replayed right behind the ack of his rejoin.
    const aliceBack = nextEvent(alice, 'state', ({ state }) => state === 'open');
    const bobBack = nextEvent(bob, 'rejoined', ({ room }) => room === 'room');
    const got = nextEvent(bob, 'message', (m) => m.content === 'sent while offline');

    server = await startServer({ listen: address });
    try {
      // Awaited together, so the first to fail is the one reported.
      const [ack, message] = await Promise.all([queued, got, aliceBack, bobBack]);
      assert.equal(message.id, ack.id);
      const members = await bob.members('room');
      assert.deepEqual(members.users, ['alice', 'bob']);
    } finally {
      closeAll();
      await server.stop();
    }
  });

  test('joins and leaves made offline: one join per room after the reconnect, none for a room left', async () => {
    let server = await startServer();
    const address = server.address;
    const frames = [];
    class Recording extends WebSocket {
      send(data) {
        if (typeof data === 'string') frames.push(JSON.parse(data));
        super.send(data);
      }
    }
    const alice = client(server, 'alice', { WebSocket: Recording });
    const errors = [];
    alice.on('error', (error) => errors.push(error));
    const rejoined = [];
    alice.on('rejoined', ({ room }) => rejoined.push(room));
    await alice.connect();
    await alice.join('kept');
    await alice.join('gone');

    const reconnecting = nextEvent(alice, 'state', ({ state }) => state === 'reconnecting');
    await server.stop();
    await reconnecting;
    const offline = frames.length;
    const joins = {
      kept: alice.join('kept', { since: 0 }), // already joined: the rejoin answers it
      fresh: alice.join('fresh'),
      since: alice.join('since', { since: 0 }),
      twice: alice.join('since', { since: 0 }),
    };
    const left = alice.leave('gone');
    // A join left before it went out: rejected at once (observed here, before it settles).
    const brief = assert.rejects(alice.join('brief'), { code: 'cancelled' });
    const briefLeft = alice.leave('brief');
    const back = nextEvent(alice, 'state', ({ state }) => state === 'open');

    server = await startServer({ listen: address });
    try {
      await back;
      const acks = Object.fromEntries(
        await Promise.all(Object.entries(joins).map(async ([name, join]) => [name, await join])),
      );
      assert.equal(acks.kept.room, 'kept');
      assert.equal(acks.fresh.count, 1);
      assert.equal(acks.since.recovered, true);
      assert.equal(acks.twice.room, 'since');
      assert.equal((await left).room, 'gone');
      await brief;
      assert.equal((await briefLeft).room, 'brief');

      const sent = frames.slice(offline);
      const joined = sent.filter((f) => f.type === 'join').map((f) => f.room);
      assert.deepEqual(joined.sort(), ['fresh', 'kept', 'since'], 'one join per room, none for a room left');
      assert.deepEqual(
        sent.filter((f) => f.type === 'leave'),
        [],
        'nothing to leave on a new connection',
      );
      assert.deepEqual(rejoined, ['kept'], "'rejoined' only for the room joined before");
      assert.deepEqual(errors, []);

      const bob = client(server, 'bob');
      await bob.connect();
      assert.deepEqual((await bob.members('kept')).users, ['alice']);
      assert.deepEqual((await bob.members('since')).users, ['alice']);
      assert.deepEqual((await bob.members('gone')).users, []);
      assert.deepEqual((await bob.members('brief')).users, []);
    } finally {
      closeAll();
      await server.stop();
    }
  });

  test('the app-level heartbeat detects a dead link and reconnects once it is back', async () => {
    const server = await startServer();
    try {
      const alice = client(server, 'alice', { heartbeat: { interval: 200, timeout: 200 } });
      await alice.connect();
      await server.pause(); // the TCP connection stays up, but nothing answers
      const dead = nextEvent(alice, 'state', ({ state }) => state === 'reconnecting');
      await dead;
      server.resume();
      await nextEvent(alice, 'state', ({ state }) => state === 'open');
      assert.equal((await alice.ping()).type, 'pong');
    } finally {
      server.resume();
      closeAll();
      await server.stop();
    }
  });

  test('a publish and a send cut off by a dead link are retried with their ids and stored once', async () => {
    const server = await startServer();
    try {
      const bob = client(server, 'bob');
      await bob.connect();
      const alice = client(server, 'alice', { heartbeat: { interval: 200, timeout: 200 } });
      await alice.connect();
      await alice.join('retries');
      await server.pause(); // the frames below reach the server's socket, their acks cannot come back
      const published = alice.publish('retries', 'once');
      const sent = alice.send('bob', 'once too');
      await nextEvent(alice, 'state', ({ state }) => state === 'reconnecting');
      server.resume();
      const [ack, direct] = await Promise.all([published, sent]);
      const page = await alice.history({ room: 'retries' });
      assert.deepEqual(page.messages.map((m) => m.id), [ack.id]);
      const conversation = await alice.history({ with: 'bob' });
      assert.deepEqual(conversation.messages.map((m) => m.id), [direct.id]);
    } finally {
      server.resume();
      closeAll();
      await server.stop();
    }
  });

  test('a token function is asked again on refresh notices and the connection outlives the first token', async () => {
    const server = await startServer({ env: { HERALD_AUTH_REFRESH_NOTICE: '1s' } });
    try {
      let calls = 0;
      const alice = new HeraldClient(server.url, {
        token: () => {
          calls += 1;
          return mint('alice', { ttl: calls === 1 ? 2 : 3600 });
        },
      });
      clients.push(alice);
      await alice.connect();
      const firstExpiry = Date.now() + 2000;
      const states = [];
      alice.on('state', ({ state }) => states.push(state));
      await new Promise((resolve) => setTimeout(resolve, firstExpiry - Date.now() + 1200));
      assert.equal(calls, 2, 'refreshed once');
      assert.deepEqual(states, [], 'never disconnected');
      assert.equal((await alice.ping()).type, 'pong');
    } finally {
      closeAll();
      await server.stop();
    }
  });

  test('requests time out instead of hanging', async () => {
    const server = await startServer();
    try {
      const alice = client(server, 'alice', { requestTimeout: 200, heartbeat: { interval: 60000 } });
      await alice.connect();
      await server.pause();
      await assert.rejects(alice.ping(), { code: 'timeout' });
    } finally {
      server.resume();
      closeAll();
      await server.stop();
    }
  });
});

describe('recovery from a recreated stream', () => {
  after(closeAll);

  // The server restarts with a fresh data folder, so the room's stream starts again at offset 1
  // with a new epoch, and gets more messages than Alice had seen before she is back. Her old
  // offset then points into the new stream: without the epoch the server would replay only what
  // lies above it, and she would silently miss the new messages below it.
  const cases = {
    'a room that had messages when joined': 2,
    'a room that was empty when joined': 0,
  };
  for (const [name, before] of Object.entries(cases)) {
    test(`${name}: the rejoin is told recovered:false or gets every new message`, async () => {
      let server = await startServer();
      const address = server.address;
      let offline = false;
      const alice = client(server, 'alice', {
        token: () => {
          if (offline) throw new Error('held back until the new stream has passed her offset');
          return mint('alice');
        },
      });
      const bob = client(server, 'bob');
      await Promise.all([alice.connect(), bob.connect()]);
      await bob.join('room');
      for (let n = 1; n <= before; n += 1) await bob.publish('room', `old ${n}`);
      await alice.join('room');
      const seenOld = nextEvent(alice, 'message', (m) => m.content === 'old last');
      for (let n = before + 1; n <= before + 2; n += 1) await bob.publish('room', `old ${n}`);
      await bob.publish('room', 'old last');
      await seenOld;
      // Give an epoch lookup the client may make a moment to be answered.
      assert.equal((await alice.ping()).type, 'pong');

      offline = true;
      const away = nextEvent(alice, 'state', ({ state }) => state === 'reconnecting');
      await server.stop();
      await away;
      server = await startServer({ listen: address });
      try {
        const newBob = client(server, 'bob');
        await newBob.connect();
        await newBob.join('room');
        const fresh = [];
        for (let n = 1; n <= before + 6; n += 1) {
          fresh.push(`new ${n}`);
          await newBob.publish('room', `new ${n}`);
        }
        const received = [];
        alice.on('message', (m) => received.push(m.content));
        const rejoined = nextEvent(alice, 'rejoined', ({ room }) => room === 'room');
        offline = false;
        const { recovered } = await rejoined;
        const end = nextEvent(alice, 'message', (m) => m.content === 'end');
        await newBob.publish('room', 'end');
        await end;
        const missing = fresh.filter((content) => !received.includes(content));
        assert.ok(
          recovered === false || missing.length === 0,
          `recovered: ${recovered}, yet missed ${missing.join(', ')}`,
        );
        // The client knew the old stream's epoch (from the join's ack, or looked up once the
        // first message came), so the server could tell the streams apart.
        assert.equal(recovered, false, 'the recreated stream is reported');
        assert.deepEqual(missing, [], 'the page holds the new messages');
      } finally {
        closeAll();
        await server.stop();
      }
    });
  }
});

describe('backoff', () => {
  test('delays grow exponentially with full jitter and stay under the cap', async () => {
    class Unreachable {
      constructor() {
        setTimeout(() => this.onclose?.({ code: 1006, reason: '' }), 0);
      }
      close() {}
    }
    const attempts = [];
    const c = new HeraldClient('ws://unused', {
      token: 'x',
      WebSocket: Unreachable,
      reconnect: { initialDelay: 10, maxDelay: 80, factor: 2 },
    });
    let last = Date.now();
    c.on('state', ({ state }) => {
      if (state !== 'reconnecting') return;
      const now = Date.now();
      attempts.push(now - last);
      last = now;
    });
    c.connect().catch(() => {});
    await new Promise((resolve) => setTimeout(resolve, 600));
    c.close();
    assert.ok(attempts.length >= 5, `kept retrying (${attempts.length})`);
    // Full jitter: every wait is at most the cap (plus scheduling slack).
    assert.ok(attempts.every((wait) => wait <= 80 + 50), attempts.join(','));
  });
});

describe('failed connection attempts', () => {
  // How each WebSocket reports a connection that could not be established: browsers set CLOSED
  // and fire error then close; Node 20's (undici 6) fires error alone and stays CONNECTING.
  const failures = {
    'error then close (browsers)': (socket) => {
      socket.readyState = 3;
      socket.onerror?.({});
      socket.onclose?.({ code: 1006, reason: '' });
    },
    'error alone, still CONNECTING (Node 20)': (socket) => {
      socket.onerror?.({});
    },
  };
  for (const [name, fail] of Object.entries(failures)) {
    test(`${name}: every attempt ends once and the client retries`, async () => {
      let sockets = 0;
      class Failing {
        constructor() {
          sockets += 1;
          this.readyState = 0;
          setTimeout(() => fail(this), 0);
        }
        close() {}
      }
      const retries = [];
      const c = new HeraldClient('ws://unused', {
        token: 'x',
        WebSocket: Failing,
        reconnect: { initialDelay: 10, maxDelay: 20 },
      });
      c.on('state', ({ state, code }) => {
        if (state === 'reconnecting') retries.push(code);
      });
      c.connect().catch(() => {});
      await new Promise((resolve) => setTimeout(resolve, 300));
      c.close();
      assert.ok(sockets >= 3, `kept retrying (${sockets} attempts)`);
      // One retry scheduled per failed attempt: none lost, none doubled.
      const counts = `${retries.length} retries, ${sockets} attempts`;
      assert.ok(retries.length === sockets || retries.length === sockets - 1, counts);
      assert.ok(retries.every((code) => code === 1006), retries.join(','));
    });
  }
});

describe('rejoin order', () => {
  test("'rejoined' comes before the replayed messages that arrive in the same read", async () => {
    // A scripted server: answers auth and joins, and answers a rejoin with its ack and the
    // missed message in one burst, as a real server's frames often arrive.
    const sockets = [];
    class Scripted {
      constructor() {
        this.readyState = 0;
        sockets.push(this);
        setTimeout(() => {
          this.readyState = 1;
          this.onopen?.({});
        }, 0);
      }
      deliver(...frames) {
        for (const frame of frames) this.onmessage?.({ data: JSON.stringify(frame) });
      }
      send(text) {
        const request = JSON.parse(text);
        if (request.type === 'auth') {
          this.deliver({ type: 'welcome', conn: 'c', user: 'u', node: 'n', heartbeat: 25 });
        } else if (request.type === 'join' && request.since == null) {
          this.deliver({ type: 'ack', ref: request.id, room: 'r', count: 1, offset: 0 });
        } else if (request.type === 'join') {
          this.deliver(
            { type: 'ack', ref: request.id, room: 'r', count: 2, offset: 1, recovered: true },
            { type: 'message', id: 'm1', from: 'v', room: 'r', content: 'missed', ts: 1, offset: 1 },
          );
        }
      }
      close() {}
    }
    const c = new HeraldClient('ws://unused', {
      token: 'x',
      WebSocket: Scripted,
      reconnect: { initialDelay: 1, maxDelay: 1 },
    });
    await c.connect();
    await c.join('r');
    const order = [];
    c.on('rejoined', ({ recovered }) => order.push(`rejoined ${recovered}`));
    c.on('message', ({ content }) => order.push(content));
    const replayed = nextEvent(c, 'message');
    sockets[0].onclose({ code: 1001, reason: 'restart' });
    await replayed;
    c.close();
    assert.deepEqual(order, ['rejoined true', 'missed']);
  });
});

describe('several nodes', () => {
  test('with a list of URLs, a client whose node is unreachable tries the next one', async () => {
    const server = await startServer();
    try {
      // Nothing listens on port 9 of loopback: the first URL fails at once.
      const c = client({ url: ['ws://127.0.0.1:9/ws', server.url] }, 'lister');
      const welcome = await c.connect();
      assert.equal(welcome.user, 'lister');
      assert.equal(c.url, server.url);
    } finally {
      closeAll();
      await server.stop();
    }
  });

  test('a node killed with SIGKILL: its clients move to another node and recover exactly', async () => {
    const redis = await startRedis();
    if (!redis) return;
    const env = {
      HERALD_ENGINE_BACKEND: 'redis',
      HERALD_REDIS_URLS: redis.url,
      HERALD_REDIS_PRESENCE_TTL: '3s',
    };
    const nodes = [
      await startServer({ env: { ...env, HERALD_SERVER_NODE_ID: 'node0' } }),
      await startServer({ env: { ...env, HERALD_SERVER_NODE_ID: 'node1' } }),
    ];
    try {
      const reader = client({ url: [nodes[0].url, nodes[1].url] }, 'reader');
      // Only ever on node0: when it dies, the ghost is gone from the room for good.
      const ghost = client(nodes[0], 'ghost');
      const writer = client(nodes[1], 'writer');
      await Promise.all([reader.connect(), ghost.connect(), writer.connect()]);
      assert.equal(reader.welcome.node, 'node0');
      await reader.join('news');
      await ghost.join('news');
      await writer.join('news');
      const first = nextEvent(reader, 'message', (m) => m.content === 'before');
      await writer.publish('news', 'before');
      await first;

      // The dead node's presence entries expire (HERALD_REDIS_PRESENCE_TTL) and a surviving
      // node tells the room who left.
      const left = nextEvent(writer, 'presence', (diff) => diff.left?.includes('ghost'), 20000);
      const moved = nextEvent(reader, 'state', ({ state }) => state === 'open');
      await nodes[0].kill();
      // Published while the reader has no connection: it must come back through recovery.
      await writer.publish('news', 'while moving');
      const missed = nextEvent(reader, 'message', (m) => m.content === 'while moving');
      await moved;
      assert.equal(reader.welcome.node, 'node1');
      await missed;
      const diff = await left;
      assert.ok(!diff.left.includes('reader'), 'the reader is back in the room on node1');
    } finally {
      closeAll();
      for (const node of nodes) await node.stop();
      await redis.stop();
    }
  });
});
