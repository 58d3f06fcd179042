// A Node.js `ws` server in the design of a typical tutorial chat server: the token names the
// user at the handshake, rooms and users live in memory, and a direct message `{content, to}`
// reaches every connection of each listed user as `{from, content}`. It is the baseline Herald
// is measured against, so it does the same work per message as Herald (JWT at the handshake,
// one encoding per message shared by every recipient) and nothing more.
//
// Usage: HERALD_AUTH_SECRET=… node ws-server.js [port] [host]
'use strict';

const http = require('node:http');
const { WebSocketServer } = require('ws');
const jwt = require('jsonwebtoken');

const port = Number(process.argv[2] || process.env.PORT || 8081);
const host = process.argv[3] || process.env.HOST || '127.0.0.1';
const secret = process.env.HERALD_AUTH_SECRET;
if (!secret) {
  console.error('ws-server: set HERALD_AUTH_SECRET (the HS256 secret the tokens are signed with)');
  process.exit(2);
}
const HEARTBEAT_MS = 25_000;

/** user id -> Set of sockets */
const users = new Map();
/** room name -> Set of sockets */
const rooms = new Map();

function addTo(map, key, socket) {
  let set = map.get(key);
  if (!set) {
    set = new Set();
    map.set(key, set);
  }
  set.add(socket);
}

function removeFrom(map, key, socket) {
  const set = map.get(key);
  if (!set) return;
  set.delete(socket);
  if (set.size === 0) map.delete(key);
}

function reply(socket, object) {
  socket.send(JSON.stringify(object));
}

function onMessage(socket, data) {
  let request;
  try {
    request = JSON.parse(data);
  } catch {
    return reply(socket, { type: 'error', message: 'frame is not JSON' });
  }
  if (request === null || typeof request !== 'object') {
    return reply(socket, { type: 'error', message: 'frame is not a JSON object' });
  }
  switch (request.type) {
    case 'join':
      if (typeof request.room !== 'string' || request.room === '') {
        return reply(socket, { type: 'error', message: '"room" must be a non-empty string' });
      }
      addTo(rooms, request.room, socket);
      socket.rooms.add(request.room);
      return reply(socket, { type: 'joined', room: request.room });
    case 'leave':
      removeFrom(rooms, request.room, socket);
      socket.rooms.delete(request.room);
      return reply(socket, { type: 'left', room: request.room });
    case 'publish': {
      const members = rooms.get(request.room);
      if (!members || !socket.rooms.has(request.room)) {
        return reply(socket, { type: 'error', message: 'join the room first' });
      }
      const text = JSON.stringify({ from: socket.user, room: request.room, content: request.content });
      for (const member of members) {
        if (member !== socket) member.send(text);
      }
      return undefined;
    }
    default: {
      // The tutorial's direct message: {content, to: [user ids]}.
      if (!Array.isArray(request.to)) {
        return reply(socket, { type: 'error', message: '"to" must be an array of user ids' });
      }
      const text = JSON.stringify({ from: socket.user, content: request.content });
      for (const user of request.to) {
        const sockets = users.get(user);
        if (!sockets) continue;
        for (const recipient of sockets) recipient.send(text);
      }
      return undefined;
    }
  }
}

const wss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024 });

wss.on('connection', (socket, request, user) => {
  socket.user = user;
  socket.rooms = new Set();
  socket.alive = true;
  addTo(users, user, socket);
  socket.on('message', (data) => onMessage(socket, data));
  socket.on('pong', () => {
    socket.alive = true;
  });
  socket.on('close', () => {
    removeFrom(users, user, socket);
    for (const room of socket.rooms) removeFrom(rooms, room, socket);
  });
  reply(socket, { type: 'welcome', user });
});

// Each socket must answer one Ping per interval; a silent one is dropped.
const heartbeat = setInterval(() => {
  for (const socket of wss.clients) {
    if (!socket.alive) {
      socket.terminate();
      continue;
    }
    socket.alive = false;
    socket.ping();
  }
}, HEARTBEAT_MS);

const server = http.createServer((request, response) => {
  response.writeHead(426, { 'content-type': 'text/plain' });
  response.end('WebSocket only\n');
});

server.on('upgrade', (request, socket, head) => {
  const token = new URL(request.url, 'http://localhost').searchParams.get('token');
  let claims;
  try {
    claims = jwt.verify(token || '', secret, { algorithms: ['HS256'] });
  } catch (error) {
    socket.end(`HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n`);
    return;
  }
  if (typeof claims.sub !== 'string' || claims.sub === '') {
    socket.end(`HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n`);
    return;
  }
  wss.handleUpgrade(request, socket, head, (ws) => wss.emit('connection', ws, request, claims.sub));
});

server.listen({ port, host, backlog: 4096 }, () => {
  console.log(`ws-server listening on ws://${host}:${server.address().port}/ (pid ${process.pid})`);
});

function stop() {
  clearInterval(heartbeat);
  for (const socket of wss.clients) socket.terminate();
  server.close(() => process.exit(0));
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
