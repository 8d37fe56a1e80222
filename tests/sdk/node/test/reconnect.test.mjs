// Engine restart on the same port: the SDK reconnects on its own and replays its
// registrations (spec §1.6, §1.7, §3.2, §4.8).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { startEngine, diagnose, portBindable, waitPortFree } from '../lib/engine.mjs';
import {
  WorkerPool, barrier, waitCallable, deferred, withTimeout, rejectionOf, pollUntil,
} from '../lib/workers.mjs';

const pool = new WorkerPool();
const engines = [];
let W;
let X;

after(async () => {
  await pool.shutdownAll();
  for (const e of engines) {
    await e.stop();
    e.cleanup();
  }
});

test('worker re-registers after an engine restart on the same port and is callable again', { timeout: 45000 }, diagnose(() => ({ engines, workers: [W, X] }), async () => {
  const e1 = await startEngine();
  engines.push(e1);
  W = pool.add(e1.url, 'node-survivor');
  let calls = 0;
  W.registerFunction('recon::echo', async (data) => {
    calls += 1;
    return { from: W.__name, echo: data.msg };
  });
  const probe = pool.add(e1.url, 'node-probe-1');
  await barrier(W, probe);
  assert.deepEqual(
    await probe.trigger({ function_id: 'recon::echo', payload: { msg: 'before' } }),
    { from: W.__name, echo: 'before' },
  );
  await probe.shutdown();
  const firstWorkerId = W.workerId;

  await e1.stop(); // SIGTERM; SIGKILL after 5 s (checked separately below)
  // The old process may release its listener a few ms after exiting (checked separately
  // below); this test is about the SDK reconnecting, so wait for the port here.
  await waitPortFree(e1.port, 5000);

  const e2 = await startEngine({ port: e1.port, streamPort: e1.streamPort });
  engines.push(e2);

  X = pool.add(e2.url, 'node-fresh-caller');
  const r = await waitCallable(X, 'recon::echo', { payload: { msg: 'after' }, timeoutMs: 15000 });
  assert.deepEqual(r, { from: W.__name, echo: 'after' });
  assert.ok(calls >= 2);
  assert.equal(typeof W.workerId, 'string');
  assert.notEqual(W.workerId, firstWorkerId, 'new engine should hand out a new worker id');

  // The reconnected worker can call out as well.
  X.registerFunction('recon::back', async (d) => d.v * 3);
  await barrier(X, W);
  assert.equal(await W.trigger({ function_id: 'recon::back', payload: { v: 5 } }), 15);
}));

test('engine exits promptly on SIGTERM while workers are connected', { timeout: 20000 }, diagnose(() => ({ engines: engines.slice(-1) }), async () => {
  const e = await startEngine();
  engines.push(e);
  const w1 = pool.add(e.url, 'node-sigterm-1');
  const w2 = pool.add(e.url, 'node-sigterm-2');
  w1.registerFunction('sigterm::f', async () => 1);
  await barrier(w1, w2);
  const t0 = Date.now();
  const res = await e.stop({ graceMs: 5000 });
  assert.equal(res.forced, false, `engine still running ${Date.now() - t0} ms after SIGTERM (had to SIGKILL)`);
}));

test('listening port is released by the time the engine process has exited (immediate restart works)', { timeout: 30000 }, diagnose(() => ({ engines: engines.slice(-1) }), async () => {
  const problems = [];
  for (let i = 0; i < 3; i += 1) {
    const e = await startEngine();
    engines.push(e);
    const w = pool.add(e.url, `node-port-${i}`);
    w.registerFunction(`port::f${i}`, async () => i);
    await barrier(w, w);
    await e.stop();
    const immediately = await portBindable(e.port);
    if (!immediately) {
      const waited = await waitPortFree(e.port, 5000);
      problems.push(`cycle ${i}: port ${e.port} still in LISTEN after the process exited; free ${waited} ms later`);
    }
    await w.shutdown();
  }
  assert.deepEqual(problems, []);
}));

test('reattach: a worker that reconnects while its old socket is still open replaces it (spec §3.2)', { timeout: 30000 }, diagnose(() => ({ engines: engines.slice(-1), workers: [W, X] }), async () => {
  const e = await startEngine();
  engines.push(e);
  W = pool.add(e.url, 'node-reattacher');
  X = pool.add(e.url, 'node-reattach-caller');
  const hangStarted = deferred();
  W.registerFunction('reat::echo', async (d) => ({ echo: d.v, by: W.workerId }));
  W.registerFunction('reat::hang', async () => {
    hangStarted.resolve();
    return new Promise(() => {});
  });
  await barrier(W, X);
  const oldId = W.workerId;
  assert.equal(typeof oldId, 'string');

  const pending = rejectionOf(X.trigger({ function_id: 'reat::hang', payload: {} }));
  await withTimeout(hangStarted.promise, 5000, 'hanging handler to start on the old socket');

  // Simulate a half-open old connection: the SDK forgets its socket without closing it
  // and dials again; the new socket starts with `reattach` (previous id + token).
  const old = W.ws;
  old.removeAllListeners('message');
  old.removeAllListeners('close');
  const oldClosed = new Promise((resolve) => old.once('close', () => resolve(true)));
  W.stopHeartbeat();
  W.ws = undefined;
  W.connect();

  const err = await withTimeout(pending, 8000, 'call in flight on the retired connection to settle');
  assert.equal(err.code, 'invocation_stopped', `got ${err.code}: ${err.message}`);
  await withTimeout(oldClosed, 8000, 'engine to close the retired socket');

  const r = await waitCallable(X, 'reat::echo', { payload: { v: 9 }, timeoutMs: 8000 });
  assert.equal(r.echo, 9);
  assert.notEqual(r.by, oldId, 'answer should come over the new connection');
  const mine = await pollUntil(async () => {
    const res = await X.trigger({ function_id: 'engine::workers::list', payload: {}, timeoutMs: 3000 });
    const rows = res.workers.filter((w) => w.name === W.__name);
    return rows.length === 1 && rows[0].id !== oldId ? rows : null;
  }, { timeoutMs: 5000, what: 'exactly one (new) workers::list entry for the reattached worker' });
  assert.equal(mine[0].id, W.workerId);
}));
