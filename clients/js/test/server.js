// Test harness: runs the real `herald` binary on an ephemeral port and mints tokens for it, and
// a real redis-server for the tests of several nodes.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { once } from 'node:events';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const HERALD_BIN = process.env.HERALD_BIN ?? path.join(root, 'target/debug/herald');
export const SECRET = 'js-test-secret-0123456789';

/** Starts herald; `listen` reuses an address (for restarts), `env` adds HERALD_* settings.
 * Each server stores its messages in a fresh temporary folder (`HERALD_STORE_PATH`). */
export async function startServer({ listen = '127.0.0.1:0', env = {} } = {}) {
  const data = mkdtempSync(path.join(tmpdir(), 'herald-js-'));
  const child = spawn(HERALD_BIN, ['serve', '--listen', listen, '--log-format', 'json'], {
    env: {
      ...process.env,
      HERALD_AUTH_SECRET: SECRET,
      HERALD_STORE_PATH: data,
      RUST_LOG: 'info',
      ...env,
    },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  child.once('exit', () => rmSync(data, { recursive: true, force: true }));
  const lines = createInterface({ input: child.stderr });
  if (process.env.DEBUG_HERALD) lines.on('line', (l) => console.log('herald:', l.slice(0, 300)));
  const address = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('herald did not start within 10 s')), 10000);
    child.once('exit', (code) => reject(new Error(`herald exited with ${code}`)));
    lines.on('line', (line) => {
      try {
        const entry = JSON.parse(line);
        if (entry.address) {
          clearTimeout(timer);
          resolve(entry.address);
        }
      } catch {
        // not a log line
      }
    });
  });
  return {
    address,
    url: `ws://${address}/ws`,
    /** SIGTERM and wait for the exit: the graceful shutdown. */
    async stop() {
      if (exited(child)) return;
      child.kill('SIGTERM');
      await once(child, 'exit');
    },
    /** SIGKILL: the node dies without a word to its clients or to Redis. */
    async kill() {
      if (exited(child)) return;
      child.kill('SIGKILL');
      await once(child, 'exit');
    },
    /** SIGSTOP, resolving once the process is stopped: kill() only queues the signal, and a
     * server thread already running could still answer a request sent right after it. */
    async pause() {
      child.kill('SIGSTOP');
      while (readFileSync(`/proc/${child.pid}/stat`, 'utf8').split(') ')[1]?.[0] !== 'T') {
        await new Promise((resolve) => setTimeout(resolve, 1));
      }
    },
    resume() {
      child.kill('SIGCONT');
    },
  };
}

const base64url = (value) => Buffer.from(value).toString('base64url');

/** An HS256 JWT for the test secret. */
export function mint(user, { ttl = 3600, admin = false, rooms } = {}) {
  const header = base64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const claims = { sub: user, exp: Math.floor(Date.now() / 1000) + ttl };
  if (admin) claims.admin = true;
  if (rooms) claims.rooms = rooms;
  const payload = base64url(JSON.stringify(claims));
  const signature = createHmac('sha256', SECRET).update(`${header}.${payload}`).digest('base64url');
  return `${header}.${payload}.${signature}`;
}

/** Resolves with the first event of `name` that satisfies `accept`, or rejects after a timeout. */
export function nextEvent(client, name, accept = () => true, timeout = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${name} event within ${timeout} ms`));
    }, timeout);
    const off = client.on(name, (payload) => {
      if (!accept(payload)) return;
      clearTimeout(timer);
      off();
      resolve(payload);
    });
  });
}

/**
 * A real redis-server on a free port, or null (after a loud notice) when it is not installed,
 * unless HERALD_REQUIRE_REDIS=1 (CI), which makes its absence an error.
 */
export async function startRedis() {
  const found = process.env.PATH.split(path.delimiter).some((dir) =>
    existsSync(path.join(dir, 'redis-server')),
  );
  if (!found) {
    if (process.env.HERALD_REQUIRE_REDIS === '1') {
      throw new Error('redis-server is not installed and HERALD_REQUIRE_REDIS=1');
    }
    console.error('\n*** NOTICE: redis-server is not installed: the Redis tests are SKIPPED ***\n');
    return null;
  }
  const port = await freePort();
  const child = spawn(
    'redis-server',
    ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const lines = createInterface({ input: child.stdout });
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('redis-server did not start')), 10000);
    child.once('exit', (code) => reject(new Error(`redis-server exited with ${code}`)));
    lines.on('line', (line) => {
      if (line.includes('Ready to accept connections')) {
        clearTimeout(timer);
        resolve();
      }
    });
  });
  return {
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      if (exited(child)) return;
      child.kill('SIGKILL');
      await once(child, 'exit');
    },
  };
}

/** Whether a child process has ended, by exiting or by a signal. */
const exited = (child) => child.exitCode !== null || child.signalCode !== null;

function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}
