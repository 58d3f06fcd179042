// A Socket.IO 4.8 server with rooms: the JWT comes in the handshake's `auth.token`, each socket
// joins a room named after its user (for direct messages), `join` takes an acknowledgement,
// `publish` reaches every other member of a room and `send` every connection of the listed
// users. The transport is WebSocket only, as the load tool speaks no long-polling.
// `socketio-redis-server.js` runs the same server with the Redis adapter, through `start`.
//
// Usage: HERALD_AUTH_SECRET=… node socketio-server.js [port] [host]
'use strict';

const http = require('node:http');
const { Server } = require('socket.io');
const jwt = require('jsonwebtoken');

// Where to listen and with which secret, from the command line and the environment; exits with
// a message when the secret is missing.
function settingsFromArgs(name) {
  const secret = process.env.HERALD_AUTH_SECRET;
  if (!secret) {
    console.error(`${name}: set HERALD_AUTH_SECRET (the HS256 secret the tokens are signed with)`);
    process.exit(2);
  }
  return {
    name,
    port: Number(process.argv[2] || process.env.PORT || 8082),
    host: process.argv[3] || process.env.HOST || '127.0.0.1',
    secret,
  };
}

const userRoom = (user) => `user:${user}`;

// Starts the server. `adapter`, when given, is installed before the first connection (the
// Redis adapter shares rooms between processes); `onStop` runs after the server closed, before
// the process exits.
function start({ name, port, host, secret, adapter, onStop = async () => {} }) {
  const server = http.createServer();
  const io = new Server(server, {
    transports: ['websocket'],
    serveClient: false,
    maxHttpBufferSize: 64 * 1024,
  });
  if (adapter) io.adapter(adapter);

  io.use((socket, next) => {
    const token = socket.handshake.auth?.token ?? socket.handshake.query?.token;
    try {
      const claims = jwt.verify(token || '', secret, { algorithms: ['HS256'] });
      if (typeof claims.sub !== 'string' || claims.sub === '') throw new Error('no sub');
      socket.data.user = claims.sub;
      next();
    } catch {
      next(new Error('unauthorized'));
    }
  });

  io.on('connection', (socket) => {
    const user = socket.data.user;
    socket.join(userRoom(user));
    socket.on('join', (room, ack) => {
      if (typeof room !== 'string' || room === '' || room.startsWith('user:')) {
        if (typeof ack === 'function') ack({ error: '"room" must be a non-empty string' });
        return;
      }
      socket.join(room);
      if (typeof ack === 'function') ack({ room });
    });
    socket.on('leave', (room, ack) => {
      socket.leave(room);
      if (typeof ack === 'function') ack({ room });
    });
    socket.on('publish', (request) => {
      if (!request || !socket.rooms.has(request.room)) return;
      socket.to(request.room).emit('message', { from: user, room: request.room, content: request.content });
    });
    socket.on('send', (request) => {
      if (!request || !Array.isArray(request.to)) return;
      socket.to(request.to.map(userRoom)).emit('message', { from: user, content: request.content });
    });
  });

  server.listen({ port, host, backlog: 4096 }, () => {
    console.log(`${name} listening on ws://${host}:${server.address().port}/socket.io/ (pid ${process.pid})`);
  });

  function stop() {
    io.close(() => {
      onStop().finally(() => process.exit(0));
    });
  }
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  return io;
}

module.exports = { settingsFromArgs, start };

if (require.main === module) {
  start(settingsFromArgs('socketio-server'));
}
