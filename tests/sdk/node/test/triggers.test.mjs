// Custom trigger types provided by one worker and bound by another (spec §3.8, §3.10–3.12, §5).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { TriggerAction } from 'iii-sdk';
import { startEngine, diagnose } from '../lib/engine.mjs';
import {
  WorkerPool, barrier, deferred, withTimeout,
} from '../lib/workers.mjs';

let engine;
const pool = new WorkerPool();
let A; // binds triggers, owns the target functions
let B; // provider in the first test
let P; // late provider
let P1;
let P2;
const T = { timeout: 30000 };

before(async () => {
  engine = await startEngine();
  A = pool.add(engine.url, 'node-trigger-user');
  await barrier(A, A);
});

after(async () => {
  await pool.shutdownAll();
  if (engine) {
    await engine.stop();
    engine.cleanup();
  }
});

/** A provider handler object that records calls and exposes promises for them. */
function recordingProvider() {
  const registered = [];
  const unregistered = [];
  let onRegister = deferred();
  let onUnregister = deferred();
  return {
    registered,
    unregistered,
    nextRegister() { return onRegister.promise; },
    nextUnregister() { return onUnregister.promise; },
    handler: {
      registerTrigger: async (cfg) => {
        registered.push(cfg);
        const d = onRegister;
        onRegister = deferred();
        d.resolve(cfg);
      },
      unregisterTrigger: async (cfg) => {
        unregistered.push(cfg);
        const d = onUnregister;
        onUnregister = deferred();
        d.resolve(cfg);
      },
    },
  };
}

/** Target function on A whose invocations can be awaited. */
function awaitableFunction(worker, id) {
  const calls = [];
  let next = deferred();
  worker.registerFunction(id, async (data, metadata) => {
    calls.push({ data, metadata });
    const d = next;
    next = deferred();
    d.resolve({ data, metadata });
    return { ok: true };
  });
  return { calls, next: () => next.promise };
}

test('binding to a worker-provided trigger type reaches the provider, which fires the target', T, diagnose(() => ({ engines: [engine], workers: [A, B] }), async () => {
  B = pool.add(engine.url, 'node-trigger-provider');
  const typeId = `hook-${randomUUID().slice(0, 8)}`;
  const prov = recordingProvider();
  B.registerTriggerType({ id: typeId, description: 'test webhook trigger type' }, prov.handler);
  await barrier(B, A);

  const target = awaitableFunction(A, 'a::on_hook');
  await barrier(A, B);
  const firstRegister = prov.nextRegister();
  const config = { path: '/hooks/x', n: 1, nested: { list: [1, 2] } };
  const trig = A.registerTrigger({
    type: typeId, function_id: 'a::on_hook', config, metadata: { route: 'r1' },
  });

  const cfg = await withTimeout(firstRegister, 5000, `provider B to receive registertrigger for ${typeId}`);
  assert.equal(cfg.function_id, 'a::on_hook');
  assert.deepEqual(cfg.config, config);
  assert.equal(typeof cfg.id, 'string');
  assert.ok(cfg.id.length > 0);
  assert.deepEqual(cfg.metadata, { route: 'r1' });

  // The provider fires the binding itself with an ordinary call (as Appendix A shows).
  const fired = target.next();
  await B.trigger({
    function_id: cfg.function_id, payload: { event: 'push', n: 7 }, action: TriggerAction.Void(),
  });
  const got = await withTimeout(fired, 5000, 'A\'s target handler to receive the fired payload');
  assert.equal(got.data.event, 'push');
  assert.equal(got.data.n, 7);

  // Also a synchronous fire returns the target's result to the provider.
  const res = await B.trigger({ function_id: cfg.function_id, payload: { event: 'sync' }, timeoutMs: 5000 });
  assert.deepEqual(res, { ok: true });

  // Unregistering the binding tells the provider (spec §5.3).
  const unreg = prov.nextUnregister();
  trig.unregister();
  const u = await withTimeout(unreg, 5000, 'provider B to receive unregistertrigger');
  assert.equal(u.id, cfg.id);
}));

test('a trigger registered before its provider exists is parked and delivered once the provider registers', T, diagnose(() => ({ engines: [engine], workers: [A, P] }), async () => {
  const typeId = `parked-${randomUUID().slice(0, 8)}`;
  const target = awaitableFunction(A, 'a::on_parked');
  const config = { channel: 'parked', when: 'later' };
  A.registerTrigger({ type: typeId, function_id: 'a::on_parked', config });
  // A's registrations (function + trigger) are applied before the provider shows up.
  await barrier(A, A);

  P = pool.add(engine.url, 'node-late-provider');
  const prov = recordingProvider();
  const firstRegister = prov.nextRegister();
  P.registerTriggerType({ id: typeId, description: 'registered after the binding' }, prov.handler);

  const cfg = await withTimeout(firstRegister, 5000, `late provider to receive the parked binding for ${typeId}`);
  assert.equal(cfg.function_id, 'a::on_parked');
  assert.deepEqual(cfg.config, config);

  const fired = target.next();
  await P.trigger({ function_id: cfg.function_id, payload: { hello: 'parked' }, action: TriggerAction.Void() });
  const got = await withTimeout(fired, 5000, 'A\'s handler to receive the payload fired by the late provider');
  assert.equal(got.data.hello, 'parked');
  assert.equal(prov.registered.length, 1, 'binding should be delivered exactly once');
}));

test('provider disconnect parks its bindings; a new provider of the same type receives them', T, diagnose(() => ({ engines: [engine], workers: [A, P1, P2] }), async () => {
  const typeId = `handover-${randomUUID().slice(0, 8)}`;
  P1 = pool.add(engine.url, 'node-provider-1');
  const prov1 = recordingProvider();
  const reg1 = prov1.nextRegister();
  P1.registerTriggerType({ id: typeId, description: 'first provider' }, prov1.handler);
  await barrier(P1, A);

  const target = awaitableFunction(A, 'a::on_handover');
  A.registerTrigger({ type: typeId, function_id: 'a::on_handover', config: { k: 'v' } });
  const c1 = await withTimeout(reg1, 5000, 'first provider to receive the binding');

  await P1.shutdown();

  P2 = pool.add(engine.url, 'node-provider-2');
  const prov2 = recordingProvider();
  const reg2 = prov2.nextRegister();
  P2.registerTriggerType({ id: typeId, description: 'second provider' }, prov2.handler);
  const c2 = await withTimeout(reg2, 8000, 'second provider to receive the re-parked binding');
  assert.equal(c2.id, c1.id, 'same binding id is replayed');
  assert.equal(c2.function_id, 'a::on_handover');
  assert.deepEqual(c2.config, { k: 'v' });

  const fired = target.next();
  await P2.trigger({ function_id: c2.function_id, payload: { via: 'p2' }, action: TriggerAction.Void() });
  const got = await withTimeout(fired, 5000, 'target to be fired by the second provider');
  assert.equal(got.data.via, 'p2');
}));
