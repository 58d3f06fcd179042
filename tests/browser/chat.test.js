// End-to-end: two people chat through the real page in headless Chromium against the real
// server. Screenshots go to test-artifacts/browser/ (not committed).

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

import { HeraldClient } from '../../clients/js/herald.js';
import { mint, startServer } from '../../clients/js/test/server.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const artifacts = path.join(root, 'test-artifacts/browser');
mkdirSync(artifacts, { recursive: true });
const dataDir = mkdtempSync(path.join(tmpdir(), 'herald-browser-'));
const serverEnv = {
  HERALD_AUTH_DEV_LOGIN: 'true',
  HERALD_STATIC_DIR: path.join(root, 'web'),
  HERALD_STORE_PATH: dataDir,
};
const UI_TIMEOUT = 15000;

let server;
let browser;

before(async () => {
  server = await startServer({ env: serverEnv });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

/** Opens the page in a fresh context and signs in with the development login. */
async function signIn(name, { width = 1200, height = 800 } = {}) {
  const context = await browser.newContext({ viewport: { width, height } });
  const page = await context.newPage();
  page.setDefaultTimeout(UI_TIMEOUT);
  page.on('pageerror', (error) => console.error(`[${name}] page error:`, error));
  await page.goto(`http://${server.address}/`);
  await page.fill('#name', name);
  await page.click('#signin-form button[type=submit]');
  await page.waitForSelector('#connection[data-state="open"]', { state: 'attached' });
  await page.waitForSelector('#rooms li[aria-current="true"]', { state: 'attached' });
  return { context, page };
}

async function say(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

async function seesMessage(page, text) {
  await page.locator('.message .body', { hasText: text }).first().waitFor();
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(artifacts, `${name}.png`), fullPage: true });
}

test('two users chat in a room and by direct message', async () => {
  const alice = await signIn('alice');
  const bob = await signIn('bob');

  await say(alice.page, 'hello lobby');
  await seesMessage(bob.page, 'hello lobby');
  await seesMessage(alice.page, 'hello lobby');
  // Presence: alice sees bob among the members, with the count.
  await alice.page.locator('#members li', { hasText: 'bob' }).waitFor();
  assert.match(await alice.page.textContent('#member-count'), /2/);

  // Direct message from the member list.
  await alice.page.locator('#members li', { hasText: 'bob' }).click();
  await alice.page.waitForSelector('#title:text("bob")');
  await say(alice.page, 'psst, bob');
  await seesMessage(alice.page, 'psst, bob');
  const fromAlice = bob.page.locator('#directs li', { hasText: 'alice' });
  await fromAlice.locator('.badge').waitFor();
  await fromAlice.click();
  await seesMessage(bob.page, 'psst, bob');
  await shot(alice.page, 'alice-direct');
  await shot(bob.page, 'bob-direct');

  await alice.context.close();
  await bob.context.close();
});

test('the online dot of a direct-message partner follows them leaving and coming back', async () => {
  // Well under the page's 15 s presence poll: only presence kept live passes in time.
  const LIVE = { state: 'attached', timeout: 3000 };
  const alice = await signIn('heidi');
  const bob = await signIn('ivan');
  await alice.page.locator('#members li', { hasText: 'ivan' }).click();
  await alice.page.waitForSelector('#title:text("ivan")');
  await say(alice.page, 'still there?');
  await seesMessage(alice.page, 'still there?');
  const partner = '#directs li:has-text("ivan")';
  await alice.page.waitForSelector(`${partner} .dot.online`, LIVE);

  await bob.context.close();
  await alice.page.waitForSelector(`${partner} .dot:not(.online)`, LIVE);
  await alice.page.waitForSelector('#subtitle:text("offline")', LIVE);
  await shot(alice.page, 'heidi-partner-offline');

  const back = await signIn('ivan');
  await alice.page.waitForSelector(`${partner} .dot.online`, LIVE);
  await alice.page.waitForSelector('#subtitle:text("online")', LIVE);
  await alice.context.close();
  await back.context.close();
});

test('a user who closed the page finds what was sent meanwhile', async () => {
  const alice = await signIn('carol');
  const bob = await signIn('dave');
  await bob.context.close();

  await alice.page.locator('#join-room').fill('lobby');
  await say(alice.page, 'room news while dave is away');
  // A direct message to dave while he has no connection at all.
  const sender = new HeraldClient(server.url, { token: mint('carol') });
  await sender.connect();
  const ack = await sender.send('dave', { text: 'dm while you were away' });
  assert.deepEqual(ack.offline, ['dave']);
  sender.close();

  const back = await signIn('dave');
  await seesMessage(back.page, 'room news while dave is away');
  const fromCarol = back.page.locator('#directs li', { hasText: 'carol' });
  await fromCarol.click();
  await seesMessage(back.page, 'dm while you were away');
  await shot(back.page, 'dave-returns');
  await alice.context.close();
  await back.context.close();
});

test('a server restart mid-conversation: both pages reconnect and recover', async () => {
  const alice = await signIn('erin');
  const bob = await signIn('frank', { width: 390, height: 844 });
  await say(alice.page, 'before the restart');
  await seesMessage(bob.page, 'before the restart');

  const address = server.address;
  await server.stop();
  await alice.page.waitForSelector('#connection[data-state="reconnecting"]', { state: 'attached' });
  await bob.page.waitForSelector('#connection[data-state="reconnecting"]', { state: 'attached' });
  await shot(bob.page, 'frank-reconnecting-phone');

  server = await startServer({ listen: address, env: serverEnv });
  // Published as soon as the server is back, possibly before the pages have rejoined: they
  // get it live or replayed from their last offset, exactly once either way.
  const other = new HeraldClient(server.url, { token: mint('grace') });
  await other.connect();
  await other.join('lobby');
  await other.publish('lobby', { text: 'published during the reconnect' });
  other.close();

  for (const { page } of [alice, bob]) {
    await page.waitForSelector('#connection[data-state="open"]', { state: 'attached' });
    await seesMessage(page, 'published during the reconnect');
    assert.equal(await page.locator('.message .body', { hasText: 'published during the reconnect' }).count(), 1);
  }
  await say(bob.page, 'after the restart');
  await seesMessage(alice.page, 'after the restart');
  await shot(alice.page, 'erin-after-restart');
  await shot(bob.page, 'frank-after-restart-phone');
  await alice.context.close();
  await bob.context.close();
});
