// The Socket.IO peer of `socketio-server.js`, several processes as one service: rooms and
// broadcasts go through Redis with `@socket.io/redis-adapter` (pub/sub, one publisher and one
// subscriber connection per process, `redis` 4). A message published on one process reaches the
// members of its room on every process.
//
// Usage: HERALD_AUTH_SECRET=… REDIS_URL=redis://127.0.0.1:6379 node socketio-redis-server.js [port] [host]
'use strict';

const { createClient } = require('redis');
const { createAdapter } = require('@socket.io/redis-adapter');
const { settingsFromArgs, start } = require('./socketio-server.js');

async function main() {
  const settings = settingsFromArgs('socketio-redis-server');
  const url = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
  const pubClient = createClient({ url });
  const subClient = pubClient.duplicate();
  for (const client of [pubClient, subClient]) {
    client.on('error', (error) => console.error(`socketio-redis-server: redis ${url}: ${error.message}`));
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);
  start({
    ...settings,
    adapter: createAdapter(pubClient, subClient),
    onStop: async () => {
      await Promise.allSettled([pubClient.quit(), subClient.quit()]);
    },
  });
}

main().catch((error) => {
  console.error(`socketio-redis-server: ${error.message}`);
  process.exit(1);
});
