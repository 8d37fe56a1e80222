// A real browser as an RBAC worker: headless Chromium (Debian's `chromium`, driven by
// playwright-core) loads a plain page served here on loopback. The page speaks the worker
// protocol with the browser's own WebSocket to the RBAC listener (authenticated by a query
// token), calls a function a Node SDK worker provides, is refused one it does not expose,
// serves a function the Node worker calls, and shows live updates of a stream group that the
// Node worker writes (subscriber port, stream protocol).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { readFileSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { registerWorker } from 'iii-sdk';
import { startEngine, freePort } from '../../sdk/node/lib/engine.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ARTIFACTS = path.resolve(HERE, '../../../target/browser-artifacts');
const PAGE = readFileSync(path.join(HERE, '../page/index.html'));
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const T = { timeout: 60000 };

if (!process.env.RINGCAST_TEST_VERBOSE) console.debug = () => {};

let engine;
let rbacUrl;
let server;
let pageUrl;
let browser;
let node;

before(async () => {
  const rbacPort = await freePort();
  rbacUrl = `ws://127.0.0.1:${rbacPort}`;
  engine = await startEngine({
    extraWorkersYaml: [
      '  - name: iii-worker-manager',
      '    config:',
      '      host: 127.0.0.1',
      `      port: ${rbacPort}`,
      '      rbac:',
      '        auth_function_id: app::auth',
      '        expose_functions:',
      '          - match("api::*")',
    ].join('\n'),
  });

  node = registerWorker(engine.url, { workerName: 'node-provider', otel: { enabled: false }, enableMetricsReporting: false });
  node.registerFunction('app::auth', async (input) => {
    if (input.query_params?.token?.[0] !== 'browser-ok') throw new Error('unknown token');
    return { context: { page: 'index' } };
  });
  node.registerFunction('api::greet', async (data) => `hello ${data.name}`);
  node.registerFunction('internal::secret', async () => 'the secret');
  // Registrations applied once a call to the last one answers.
  for (let i = 0; ; i += 1) {
    try {
      await node.trigger({ function_id: 'internal::secret', payload: {}, timeoutMs: 2000 });
      break;
    } catch (e) {
      if (i > 50) throw e;
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  server = http.createServer((req, res) => {
    if (req.method === 'GET' && (req.url === '/' || req.url.startsWith('/index.html'))) {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      res.end(PAGE);
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  pageUrl = `http://127.0.0.1:${server.address().port}/index.html`;

  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true });
  mkdirSync(ARTIFACTS, { recursive: true });
});

after(async () => {
  await browser?.close();
  server?.close();
  await node?.shutdown();
  if (engine) {
    await engine.stop();
    engine.cleanup();
  }
});

function urlFor(token) {
  const q = new URLSearchParams({ rbac: rbacUrl, stream: engine.streamUrl, token });
  return `${pageUrl}?${q}`;
}

async function text(page, selector) {
  return (await page.locator(selector).textContent())?.trim();
}

test('a browser page works as an RBAC worker and shows a live stream', T, async () => {
  const page = await browser.newPage();
  const consoleLines = [];
  page.on('console', (m) => consoleLines.push(m.text()));
  try {
    await page.goto(urlFor('browser-ok'));
    await page.waitForFunction(() => document.querySelector('#worker').dataset.state === 'ok', null, { timeout: 10000 });
    assert.match(await text(page, '#worker'), /^registered [0-9a-f-]{36}$/);

    // The exposed function answered; the unexposed one was refused.
    await page.waitForFunction(() => document.querySelector('#greet').dataset.state, null, { timeout: 10000 });
    assert.equal(await text(page, '#greet'), 'hello browser');
    await page.waitForFunction(() => document.querySelector('#secret').dataset.state, null, { timeout: 10000 });
    assert.equal(await text(page, '#secret'), 'FORBIDDEN');
    assert.equal(await page.locator('#secret').getAttribute('data-state'), 'refused');

    // The Node worker calls the page's own function through the engine.
    let answer;
    for (let i = 0; ; i += 1) {
      try {
        answer = await node.trigger({ function_id: 'ui::notify', payload: { message: 'hi from node' }, timeoutMs: 2000 });
        break;
      } catch (e) {
        if (i > 50) throw e; // the page's registerfunction may not be applied yet
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    assert.deepEqual(answer, { shown: true });
    assert.equal(await text(page, '#notified'), 'hi from node');

    // Live stream: the page joined scores/room-1; the Node worker writes, the page shows it.
    await page.waitForFunction(() => document.querySelector('#stream').dataset.state === 'ok', null, { timeout: 10000 });
    const set = (player, score) => node.trigger({
      function_id: 'stream::set',
      payload: { stream_name: 'scores', group_id: 'room-1', item_id: player, data: { player, score } },
    });
    await set('alice', 10);
    await set('bob', 7);
    await set('alice', 12);
    await page.waitForFunction(
      () => [...document.querySelectorAll('#scores li')].map((li) => li.textContent).join(',') === 'alice: 12,bob: 7',
      null,
      { timeout: 10000 },
    );
    await node.trigger({ function_id: 'stream::delete', payload: { stream_name: 'scores', group_id: 'room-1', item_id: 'bob' } });
    await page.waitForFunction(() => document.querySelectorAll('#scores li').length === 1, null, { timeout: 10000 });
    assert.equal(await text(page, '#scores'), 'alice: 12');
    await page.screenshot({ path: path.join(ARTIFACTS, 'rbac-browser-worker.png'), fullPage: true });
  } catch (e) {
    await page.screenshot({ path: path.join(ARTIFACTS, 'rbac-browser-worker-failed.png'), fullPage: true }).catch(() => {});
    e.message += `\n--- page console ---\n${consoleLines.join('\n')}\n--- engine ---\n${engine.logTail(3000)}`;
    throw e;
  } finally {
    await page.close();
  }
});

test('a browser with a bad token sees AUTH_ERROR and a 1008 close', T, async () => {
  const page = await browser.newPage();
  try {
    await page.goto(urlFor('stolen'));
    await page.waitForFunction(() => document.querySelector('#worker').dataset.closed, null, { timeout: 10000 });
    const shown = await text(page, '#worker');
    assert.match(shown, /^AUTH_ERROR: unknown token \| closed 1008 authentication failed$/, shown);
    assert.equal(await text(page, '#greet'), '…', 'nothing was called');
    await page.screenshot({ path: path.join(ARTIFACTS, 'rbac-browser-refused.png'), fullPage: true });
  } finally {
    await page.close();
  }
});
