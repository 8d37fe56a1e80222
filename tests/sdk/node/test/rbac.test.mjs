// RBAC listener (spec §1.3) with the published Node SDK as the untrusted client: a trusted SDK
// worker on the main port hosts the auth function, the hook and the exposed functions; other SDK
// workers connect to the second `iii-worker-manager` entry (the RBAC port).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { InvocationError } from 'iii-sdk';
import { startEngine, diagnose, freePort } from '../lib/engine.mjs';
import {
  WorkerPool, barrier, deferred, withTimeout, rejectionOf, pollUntil,
} from '../lib/workers.mjs';

let engine;
let rbacUrl;
const pool = new WorkerPool();
let trusted;
const authCalls = [];
const hookCalls = [];
const ctx = () => ({ engines: [engine], workers: pool.workers });
const T = { timeout: 30000 };

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
      '        on_function_registration_function_id: app::on-function',
      '        expose_functions:',
      '          - match("api::*")',
      '          - match("engine::functions::list")',
      '          - metadata:',
      '              public: true',
    ].join('\n'),
  });
  trusted = pool.add(engine.url, 'trusted');
  trusted.registerFunction('app::auth', async (input) => {
    authCalls.push(input);
    const token = input.headers?.authorization?.replace(/^Bearer\s+/i, '') ?? input.query_params?.token?.[0];
    if (token !== 'good' && token !== 'tenant') throw new Error('bad credentials');
    return {
      context: { user: 'ada', token },
      forbidden_functions: ['api::admin'],
      ...(token === 'tenant' ? { function_registration_prefix: 'tenant-1' } : {}),
    };
  });
  trusted.registerFunction('app::on-function', async (input) => {
    hookCalls.push(input);
    if (input.function_id.startsWith('evil::')) throw new Error('not on my engine');
    return { metadata: { ...(input.metadata ?? {}), registered_by: input.context.user } };
  });
  trusted.registerFunction('api::echo', async (data) => ({ echoed: data.value }));
  trusted.registerFunction('api::admin', async () => 'admin');
  trusted.registerFunction('internal::secret', async () => 'secret');
  trusted.registerFunction('tools::shared', async () => 'shared', { metadata: { public: true } });
  await barrier(trusted);
});

after(async () => {
  await pool.shutdownAll();
  if (engine) {
    await engine.stop();
    engine.cleanup();
  }
});

test('an authenticated SDK worker on the RBAC port calls exposed functions only', T, diagnose(ctx, async () => {
  const browser = pool.add(rbacUrl, 'rbac-node', { headers: { authorization: 'Bearer good' } });
  const r = await withTimeout(browser.trigger({ function_id: 'api::echo', payload: { value: 42 } }), 10000, 'api::echo');
  assert.deepEqual(r, { echoed: 42 });
  assert.equal(await browser.trigger({ function_id: 'tools::shared', payload: {} }), 'shared');
  const auth = authCalls.find((c) => c.headers?.authorization === 'Bearer good');
  assert.ok(auth, 'the auth function saw the Authorization header');
  assert.equal(auth.ip_address, '127.0.0.1');

  for (const [id, hint] of [['internal::secret', 'expose_functions'], ['api::admin', 'forbidden_functions']]) {
    const err = await rejectionOf(browser.trigger({ function_id: id, payload: {}, timeoutMs: 5000 }));
    assert.ok(err instanceof InvocationError, `expected InvocationError, got ${err}`);
    assert.equal(err.code, 'FORBIDDEN', `got ${err.code}: ${err.message}`);
    assert.match(err.message, new RegExp(hint));
  }

  // engine::functions::list is exposed, and lists only what this session may call.
  const listed = await browser.trigger({ function_id: 'engine::functions::list', payload: {} });
  const ids = listed.functions.map((f) => f.function_id).sort();
  assert.deepEqual(ids, ['api::echo', 'tools::shared']);

  // The SDK's own engine::workers::register went through: the engine knows the worker's name.
  await pollUntil(async () => {
    const workers = await trusted.trigger({ function_id: 'engine::workers::list', payload: {} });
    return workers.workers.some((w) => w.name === browser.__name);
  }, { what: 'the RBAC worker to appear under its name' });
}));

test('a refused SDK worker never gets registered and its calls do not run', T, diagnose(ctx, async () => {
  const before = authCalls.length;
  const intruder = pool.add(rbacUrl, 'rbac-intruder', { headers: { authorization: 'Bearer wrong' } });
  await pollUntil(async () => authCalls.slice(before).some((c) => c.headers?.authorization === 'Bearer wrong'), {
    what: 'the auth function to be asked about the intruder',
  });
  const err = await rejectionOf(intruder.trigger({ function_id: 'api::echo', payload: { value: 1 }, timeoutMs: 1500 }));
  assert.equal(err.code, 'TIMEOUT', `got ${err.code}: ${err.message}`);
  await pollUntil(() => engine.log.includes('worker refused by the auth function: bad credentials'), {
    what: 'the refusal in the engine log',
  });
  const workers = await trusted.trigger({ function_id: 'engine::workers::list', payload: {} });
  assert.ok(!workers.workers.some((w) => w.name === intruder.__name), 'the intruder is not a worker');
}));

test('functions registered through the RBAC port pass the hook and get the session prefix', T, diagnose(ctx, async () => {
  const browser = pool.add(rbacUrl, 'rbac-tenant', { headers: { authorization: 'Bearer tenant' } });
  const called = deferred();
  browser.registerFunction('ui::hello', async (data) => { called.resolve(data); return `hello ${data.who}`; }, { metadata: { v: 1 } });
  browser.registerFunction('evil::steal', async () => 'stolen');
  // The engine holds it as tenant-1::ui::hello; the SDK's handler still runs under its own id.
  const r = await pollUntil(async () => trusted.trigger({ function_id: 'tenant-1::ui::hello', payload: { who: 'trusted' }, timeoutMs: 2000 }), {
    what: 'tenant-1::ui::hello to become callable',
  });
  assert.equal(r, 'hello trusted');
  assert.equal((await withTimeout(called.promise, 1000, 'the handler')).who, 'trusted');
  const info = await trusted.trigger({ function_id: 'engine::functions::info', payload: { function_id: 'tenant-1::ui::hello' } });
  assert.deepEqual(info.metadata, { v: 1, registered_by: 'ada' });
  const hook = hookCalls.find((c) => c.function_id === 'ui::hello');
  assert.deepEqual(hook.context, { user: 'ada', token: 'tenant' });
  // The hook denied the other one.
  await pollUntil(() => hookCalls.some((c) => c.function_id === 'evil::steal'), { what: 'the hook call for evil::steal' });
  const err = await rejectionOf(trusted.trigger({ function_id: 'tenant-1::evil::steal', payload: {}, timeoutMs: 5000 }));
  assert.equal(err.code, 'function_not_found', `got ${err.code}: ${err.message}`);
}));
