// Owner disconnect while an invocation is in flight (spec §4.6): callers get invocation_stopped.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { fork } from 'node:child_process';
import path from 'node:path';
import { InvocationError } from 'iii-sdk';
import { startEngine, diagnose, SUITE_DIR } from '../lib/engine.mjs';
import {
  WorkerPool, barrier, deferred, withTimeout, rejectionOf, waitCallable, uniqueName, pollUntil,
} from '../lib/workers.mjs';

let engine;
const pool = new WorkerPool();
let A;
let B;
let lastChild;
const childDiag = () => (lastChild ? [{ label: `child worker pid ${lastChild.pid} output`, frameLog: lastChild.output.split('\n') }] : []);
const T = { timeout: 30000 };

before(async () => {
  engine = await startEngine();
  A = pool.add(engine.url, 'node-caller');
  await barrier(A, A);
});

after(async () => {
  await pool.shutdownAll();
  if (engine) {
    await engine.stop();
    engine.cleanup();
  }
});

function forkHangWorker(url, name, hangId, readyId) {
  const child = fork(path.join(SUITE_DIR, 'fixtures', 'hang-worker.mjs'), [url, name, hangId, readyId], {
    stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
  });
  child.output = '';
  child.stdout.on('data', (d) => { child.output += d; });
  child.stderr.on('data', (d) => { child.output += d; });
  child.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  child.waitMessage = (type) => new Promise((resolve) => {
    const onMsg = (m) => {
      if (m?.type === type) {
        child.off('message', onMsg);
        resolve(m);
      }
    };
    child.on('message', onMsg);
  });
  return child;
}

test('owner process killed mid-call: caller rejects with invocation_stopped promptly', T, diagnose(() => ({ engines: [engine], workers: [A], raws: childDiag() }), async () => {
  const name = uniqueName('node-hang-child');
  const hangId = `hang::${name}`;
  const readyId = `ready::${name}`;
  const child = forkHangWorker(engine.url, name, hangId, readyId);
  lastChild = child;
  try {
    await waitCallable(A, readyId);
    const invoked = child.waitMessage('invoked');
    const call = A.trigger({ function_id: hangId, payload: { n: 1 } }); // SDK default 30 s timeout
    const settled = rejectionOf(call);
    await withTimeout(invoked, 5000, 'the hanging handler to start in the child worker');

    child.kill('SIGKILL');
    const t0 = Date.now();
    await withTimeout(child.exited, 5000, 'child exit');
    const err = await withTimeout(settled, 5000, 'the pending call to settle after the owner died');
    const elapsed = Date.now() - t0;
    assert.ok(err instanceof InvocationError, `expected InvocationError, got ${err}`);
    assert.equal(err.code, 'invocation_stopped', `got ${err.code}: ${err.message}`);
    assert.ok(elapsed < 5000, `settled after ${elapsed} ms`);

    // No failover: the dead owner's function is gone (spec §4.6).
    await pollUntil(async () => {
      const e = await rejectionOf(A.trigger({ function_id: hangId, payload: {}, timeoutMs: 2000 }));
      return e.code === 'function_not_found';
    }, { timeoutMs: 5000, what: `${hangId} to be unregistered after owner death` });
  } finally {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
}));

test('owner calls shutdown() mid-call: caller rejects with invocation_stopped promptly', T, diagnose(() => ({ engines: [engine], workers: [A, B] }), async () => {
  B = pool.add(engine.url, 'node-hang-inproc');
  const invoked = deferred();
  B.registerFunction('hang::inproc', async () => {
    invoked.resolve();
    return new Promise(() => {}); // never settles
  });
  await barrier(B, A);

  const settled = rejectionOf(A.trigger({ function_id: 'hang::inproc', payload: {} }));
  await withTimeout(invoked.promise, 5000, 'the hanging handler to start');
  const t0 = Date.now();
  await B.shutdown();
  const err = await withTimeout(settled, 5000, 'the pending call to settle after the owner shut down');
  const elapsed = Date.now() - t0;
  assert.ok(err instanceof InvocationError, `expected InvocationError, got ${err}`);
  assert.equal(err.code, 'invocation_stopped', `got ${err.code}: ${err.message}`);
  assert.ok(elapsed < 5000, `settled after ${elapsed} ms`);
}));

test('caller disconnects mid-call: owner keeps working and the engine stays healthy', T, diagnose(() => ({ engines: [engine], workers: [A] }), async () => {
  const owner = pool.add(engine.url, 'node-slow-owner');
  const caller = pool.add(engine.url, 'node-leaving-caller');
  const started = deferred();
  const release = deferred();
  owner.registerFunction('slow::op', async (data) => {
    started.resolve();
    await release.promise;
    return data.v;
  });
  await barrier(owner, A);
  const pending = rejectionOf(caller.trigger({ function_id: 'slow::op', payload: { v: 1 } }));
  await withTimeout(started.promise, 5000, 'slow handler to start');
  await caller.shutdown();
  const err = await pending; // the SDK rejects locally on shutdown
  assert.match(String(err?.message), /shutting down/);
  release.resolve(); // owner now answers an invocation whose caller is gone
  // The engine must drop that late result silently and keep serving.
  const r = await A.trigger({ function_id: 'slow::op', payload: { v: 2 }, timeoutMs: 5000 });
  assert.equal(r, 2);
}));
