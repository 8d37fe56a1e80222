// Built-in engine functions called through the SDK (spec §6.3).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startEngine, diagnose } from '../lib/engine.mjs';
import { WorkerPool, barrier, pollUntil } from '../lib/workers.mjs';

let engine;
const pool = new WorkerPool();
let W;
const ctx = () => ({ engines: [engine], workers: [W] });
const T = { timeout: 30000 };

before(async () => {
  engine = await startEngine();
  W = pool.add(engine.url, 'node-introspect', { workerDescription: 'introspection test worker' });
  W.registerFunction('intro::probe', async () => 'probe', { description: 'a probe function' });
  await barrier(W, W);
});

after(async () => {
  await pool.shutdownAll();
  if (engine) {
    await engine.stop();
    engine.cleanup();
  }
});

test('engine::functions::list contains the registered function', T, diagnose(ctx, async () => {
  const res = await W.trigger({ function_id: 'engine::functions::list', payload: {}, timeoutMs: 5000 });
  assert.ok(res && Array.isArray(res.functions), `unexpected result ${JSON.stringify(res)?.slice(0, 500)}`);
  const entry = res.functions.find((f) => f.function_id === 'intro::probe');
  assert.ok(entry, `intro::probe missing from ${JSON.stringify(res.functions.map((f) => f.function_id))}`);
  assert.equal(entry.description, 'a probe function');
}));

test('engine::workers::list contains the worker', T, diagnose(ctx, async () => {
  // Metadata (engine::workers::register) is the last frame 0.22.1 sends after connecting.
  const entry = await pollUntil(async () => {
    const res = await W.trigger({ function_id: 'engine::workers::list', payload: {}, timeoutMs: 5000 });
    assert.ok(res && Array.isArray(res.workers), `unexpected result ${JSON.stringify(res)?.slice(0, 500)}`);
    return res.workers.find((w) => w.name === W.__name);
  }, { timeoutMs: 5000, what: `worker ${W.__name} in engine::workers::list` });
  assert.equal(entry.id, W.workerId);
  assert.equal(entry.runtime, 'node');
  assert.equal(entry.description, 'introspection test worker');
}));
