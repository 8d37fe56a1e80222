// HTTP-invoked functions (spec §2.4, §8): a worker registers a function with the SDK's
// HttpInvocationConfig, as the SDK docs show, and the engine calls the URL for each invocation.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { createHmac } from 'node:crypto';
import { startEngine, diagnose } from '../lib/engine.mjs';
import { WorkerPool, barrier, waitCallable, rejectionOf } from '../lib/workers.mjs';

const SECRET = 'node-hmac-secret';
const TOKEN = 'node-bearer-token';
// The engine reads secrets from its own environment, by the names the registration gives.
process.env.RINGCAST_NODE_HMAC_SECRET = SECRET;
process.env.RINGCAST_NODE_BEARER = TOKEN;

let engine;
let server;
let base;
const requests = [];
const pool = new WorkerPool();
let owner;
let caller;
const ctx = () => ({ engines: [engine], workers: [owner, caller] });
const T = { timeout: 30000 };

before(async () => {
  // The "external" function: verifies the signature or token the engine sends.
  server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      requests.push({ url: req.url, headers: req.headers, body: body.toString('utf8') });
      const json = (status, value) => {
        res.writeHead(status, { 'content-type': 'application/json' });
        res.end(JSON.stringify(value));
      };
      if (req.url === '/signed') {
        const ts = req.headers['x-iii-timestamp'];
        const expected = `sha256=${createHmac('sha256', SECRET).update(`${ts}:${body.toString('base64')}`).digest('hex')}`;
        if (req.headers['x-iii-signature'] !== expected) return json(401, { error: { code: 'bad_signature', message: 'signature mismatch' } });
        const input = JSON.parse(body.toString('utf8'));
        return json(200, { sum: input.a + input.b });
      }
      if (req.url === '/token') {
        if (req.headers.authorization !== `Bearer ${TOKEN}`) return json(401, { error: { code: 'bad_token', message: 'no' } });
        return json(200, { ok: true });
      }
      return json(503, { error: { code: 'unavailable', message: 'try later' } });
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${server.address().port}`;

  engine = await startEngine();
  owner = pool.add(engine.url, 'node-http-owner');
  caller = pool.add(engine.url, 'node-http-caller');
  owner.registerFunction('external::add', {
    url: `${base}/signed`,
    method: 'POST',
    timeout_ms: 5000,
    auth: { type: 'hmac', secret_key: 'RINGCAST_NODE_HMAC_SECRET' },
  }, { description: 'Adds two numbers over HTTP' });
  owner.registerFunction('external::token', {
    url: `${base}/token`,
    auth: { type: 'bearer', token_key: 'RINGCAST_NODE_BEARER' },
  }, { description: 'Bearer-protected endpoint' });
  owner.registerFunction('external::down', { url: `${base}/down` }, { description: 'Always 503' });
  await barrier(owner, caller);
});

after(async () => {
  await pool.shutdownAll();
  if (engine) {
    await engine.stop();
    engine.cleanup();
  }
  server?.close();
});

test('an HTTP function registered with HttpInvocationConfig answers through its URL, signed', T, diagnose(ctx, async () => {
  const r = await waitCallable(caller, 'external::add', { payload: { a: 2, b: 40 } });
  assert.deepEqual(r, { sum: 42 });
  const seen = requests.find((q) => q.url === '/signed');
  assert.equal(seen.headers['x-iii-function-path'], 'external::add');
  assert.equal(seen.headers['content-type'], 'application/json');
  assert.equal(JSON.parse(seen.body).a, 2);
}));

test('bearer auth reads the token from the engine environment', T, diagnose(ctx, async () => {
  const r = await caller.trigger({ function_id: 'external::token', payload: {} });
  assert.deepEqual(r, { ok: true });
}));

test('a non-2xx answer with an error body reaches the caller as its code', T, diagnose(ctx, async () => {
  const err = await rejectionOf(caller.trigger({ function_id: 'external::down', payload: {} }));
  assert.equal(err.code, 'unavailable');
  assert.match(err.message, /try later/);
}));
