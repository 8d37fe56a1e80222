// Function registration and invocation between SDK workers (spec §3.4, §3.6, §3.7, §4).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { TriggerAction, InvocationError } from 'iii-sdk';
import { startEngine, diagnose } from '../lib/engine.mjs';
import {
  WorkerPool, barrier, deferred, withTimeout, rejectionOf,
} from '../lib/workers.mjs';

let engine;
const pool = new WorkerPool();
let A;
let B;
const ctx = () => ({ engines: [engine], workers: [A, B] });
const T = { timeout: 30000 };

before(async () => {
  engine = await startEngine();
  A = pool.add(engine.url, 'node-a');
  B = pool.add(engine.url, 'node-b');

  B.registerFunction('math::add', async (data) => data.a + data.b);
  A.registerFunction('a::greet', async (data) => `hello ${data.name} from A`);
  A.registerFunction('a::self_echo', async (data) => ({ echoed: data.value, by: 'A' }));

  // Both workers' registrations applied (each probed from the other worker).
  await barrier(B, A);
  await barrier(A, B);
});

after(async () => {
  await pool.shutdownAll();
  if (engine) {
    await engine.stop();
    engine.cleanup();
  }
});

test('worker A calls math::add registered by worker B and gets the result', T, diagnose(ctx, async () => {
  const r = await A.trigger({ function_id: 'math::add', payload: { a: 2, b: 3 } });
  assert.equal(r, 5);
  const r2 = await A.trigger({ function_id: 'math::add', payload: { a: -10.5, b: 0.25 } });
  assert.equal(r2, -10.25);
}));

test('worker B calls a function registered by worker A', T, diagnose(ctx, async () => {
  const r = await B.trigger({ function_id: 'a::greet', payload: { name: 'B' } });
  assert.equal(r, 'hello B from A');
}));

test('a worker calls its own function through the engine', T, diagnose(ctx, async () => {
  const r = await A.trigger({ function_id: 'a::self_echo', payload: { value: [1, 'two', { three: 3 }] } });
  assert.deepEqual(r, { echoed: [1, 'two', { three: 3 }], by: 'A' });
}));

test('handler sees _caller_worker_id of the calling worker (spec §4.1 6.1)', T, diagnose(ctx, async () => {
  const seen = deferred();
  B.registerFunction('b::whoami', async (data) => {
    seen.resolve(data);
    return data._caller_worker_id ?? null;
  });
  await barrier(B, A);
  const r = await A.trigger({ function_id: 'b::whoami', payload: { x: 1 } });
  const data = await seen.promise;
  assert.equal(data.x, 1);
  assert.equal(typeof A.workerId, 'string', 'SDK A should have received workerregistered.worker_id');
  assert.equal(data._caller_worker_id, A.workerId);
  assert.equal(r, A.workerId);
}));

test('void call (TriggerAction.Void): handler runs, caller resolves immediately with undefined', T, diagnose(ctx, async () => {
  const ran = deferred();
  let calls = 0;
  B.registerFunction('b::void_sink', async (data, metadata) => {
    calls += 1;
    ran.resolve({ data, metadata });
    return { ignored: true };
  });
  await barrier(B, A);

  const token = randomUUID();
  const t0 = Date.now();
  const r = await A.trigger({
    function_id: 'b::void_sink',
    payload: { token },
    action: TriggerAction.Void(),
  });
  assert.equal(r, undefined);
  assert.ok(Date.now() - t0 < 500, 'void trigger should resolve without waiting for the handler');

  const got = await withTimeout(ran.promise, 5000, 'void handler to run on B');
  assert.equal(got.data.token, token);
  // A sync call afterwards still works and the void handler ran exactly once.
  const echo = await A.trigger({ function_id: 'math::add', payload: { a: 1, b: 1 } });
  assert.equal(echo, 2);
  assert.equal(calls, 1);
}));

test('calling an unknown function rejects with function_not_found', T, diagnose(ctx, async () => {
  const t0 = Date.now();
  const err = await rejectionOf(A.trigger({
    function_id: 'nobody::has_this', payload: { q: 1 }, timeoutMs: 10000,
  }));
  assert.ok(err instanceof InvocationError, `expected InvocationError, got ${err}`);
  assert.equal(err.code, 'function_not_found', `got ${err.code}: ${err.message}`);
  assert.ok(Date.now() - t0 < 5000, 'rejection should be immediate, not an SDK timeout');
}));

test('a throwing handler rejects the caller with invocation_failed and the message', T, diagnose(ctx, async () => {
  const msg = 'kaboom 42 – "quoted" \\ back\\slash ✓';
  B.registerFunction('b::throws', async () => {
    throw new Error(msg);
  });
  await barrier(B, A);
  const err = await rejectionOf(A.trigger({ function_id: 'b::throws', payload: {}, timeoutMs: 10000 }));
  assert.ok(err instanceof InvocationError, `expected InvocationError, got ${err}`);
  assert.equal(err.code, 'invocation_failed', `got ${err.code}: ${err.message}`);
  assert.equal(err.message, `invocation_failed: ${msg}`);
  assert.equal(typeof err.stacktrace, 'string', 'stacktrace should pass through');
  assert.ok(err.stacktrace.includes(msg), 'stacktrace should contain the error message');
}));

test('call without payload (data key omitted by the SDK) still reaches the handler (spec §3.6 SHOULD)', T, diagnose(ctx, async () => {
  const seen = deferred();
  B.registerFunction('b::no_payload', async (data) => {
    seen.resolve(data);
    return 'ok';
  });
  await barrier(B, A);
  const r = await A.trigger({ function_id: 'b::no_payload', timeoutMs: 5000 });
  assert.equal(r, 'ok');
  const data = await seen.promise;
  assert.ok(data === null || data === undefined, `handler got ${JSON.stringify(data)}`);
}));

test('call metadata is delivered to the handler as its second argument', T, diagnose(ctx, async () => {
  const seen = deferred();
  B.registerFunction('b::meta', async (data, metadata) => {
    seen.resolve({ data, metadata });
    return 'm';
  });
  await barrier(B, A);
  const r = await A.trigger({ function_id: 'b::meta', payload: { p: 1 }, metadata: { tenant: 'acme', n: 2 } });
  assert.equal(r, 'm');
  const got = await seen.promise;
  assert.deepEqual(got.metadata, { tenant: 'acme', n: 2 });
  assert.equal(got.data.p, 1);
  assert.equal(got.data.tenant, undefined, 'metadata must not be merged into data');
}));

test('enqueue without a queue worker: a receipt or enqueue_error, never a hang (spec §4.5)', T, diagnose(ctx, async () => {
  const t0 = Date.now();
  let outcome;
  try {
    outcome = { ok: await A.trigger({
      function_id: 'math::add', payload: { a: 1, b: 2 }, action: TriggerAction.Enqueue({ queue: 'q1' }), timeoutMs: 5000,
    }) };
  } catch (err) {
    outcome = { err };
  }
  if (outcome.err) {
    assert.equal(outcome.err.code, 'enqueue_error', `got ${outcome.err.code}: ${outcome.err.message}`);
    assert.ok(Date.now() - t0 < 4000, 'enqueue_error should be immediate');
  } else {
    assert.equal(typeof outcome.ok?.messageReceiptId, 'string', `unexpected enqueue result ${JSON.stringify(outcome.ok)}`);
  }
}));

function makeBlob(bytes) {
  // Deterministic ASCII with characters that need JSON escaping sprinkled in.
  const alphabet = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "\\/\n\t{}[]:,';
  const out = new Array(bytes);
  let x = 0x12345678;
  for (let i = 0; i < bytes; i += 1) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    out[i] = alphabet[(x >>> 16) % alphabet.length];
  }
  return out.join('');
}

test('1 MiB string payload round-trips in data and in the result', T, diagnose(ctx, async () => {
  const blob = makeBlob(1024 * 1024);
  const unicode = 'héllo wörld € 😀 中文';
  let receivedOk = null;
  B.registerFunction('b::big_echo', async (data) => {
    receivedOk = data.blob === blob && data.unicode === unicode;
    return { blob: data.blob, len: data.blob.length, unicode: data.unicode };
  });
  await barrier(B, A);
  const r = await A.trigger({ function_id: 'b::big_echo', payload: { blob, unicode }, timeoutMs: 20000 });
  assert.equal(receivedOk, true, 'handler on B should receive the exact 1 MiB string');
  assert.equal(r.len, blob.length);
  assert.equal(r.unicode, unicode);
  assert.ok(r.blob === blob, 'result string differs from the sent string');
}));

test('500 concurrent calls all resolve with correct, distinct results', T, diagnose(ctx, async () => {
  let active = 0;
  let maxActive = 0;
  B.registerFunction('math::square', async (data) => {
    active += 1;
    maxActive = Math.max(maxActive, active);
    await new Promise((r) => setImmediate(r));
    active -= 1;
    return { i: data.i, sq: data.i * data.i, token: data.token };
  });
  await barrier(B, A);
  const N = 500;
  const tokens = Array.from({ length: N }, () => randomUUID());
  const results = await Promise.all(tokens.map((token, i) => A.trigger({
    function_id: 'math::square', payload: { i, token }, timeoutMs: 20000,
  })));
  assert.equal(results.length, N);
  const seen = new Set();
  results.forEach((r, i) => {
    assert.deepEqual(r, { i, sq: i * i, token: tokens[i] }, `result #${i}`);
    seen.add(r.token);
  });
  assert.equal(seen.size, N);
}));
