// Wire-level checks with a raw `ws` client next to SDK workers (spec §1.4, §1.5, §3.14, §4.5).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { startEngine, diagnose } from '../lib/engine.mjs';
import { WorkerPool, barrier, deferred, withTimeout } from '../lib/workers.mjs';
import { RawClient } from '../lib/raw.mjs';

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

let engine;
const pool = new WorkerPool();
const raws = [];
let B;
const ctx = () => ({ engines: [engine], workers: [B], raws });
const T = { timeout: 30000 };

async function raw(label) {
  const r = new RawClient(engine.url, label);
  raws.push(r);
  await r.connect();
  return r;
}

before(async () => {
  engine = await startEngine();
  B = pool.add(engine.url, 'node-raw-peer');
  await barrier(B, B);
});

after(async () => {
  for (const r of raws) r.close();
  await pool.shutdownAll();
  if (engine) {
    await engine.stop();
    engine.cleanup();
  }
});

test('first frame is a text workerregistered with UUID worker_id and reattach_token', T, diagnose(ctx, async () => {
  const r = await raw('first-frame');
  const first = await r.waitFor(() => true, 5000, 'first frame');
  assert.equal(first.__binary, false, 'engine must send text frames');
  assert.equal(first.type, 'workerregistered');
  assert.match(first.worker_id, UUID_RE);
  assert.match(first.reattach_token, UUID_RE);
  assert.equal(r.frames.indexOf(first), 0);
}));

test('WebSocket ping is answered with a pong carrying the same payload', T, diagnose(ctx, async () => {
  const r = await raw('ws-ping');
  const payload = Buffer.from(`p-${randomUUID()}`);
  const pong = new Promise((resolve) => r.ws.once('pong', resolve));
  r.ws.ping(payload);
  const got = await withTimeout(pong, 3000, 'pong');
  assert.equal(got.toString(), payload.toString());
}));

test('JSON {"type":"ping"} is answered with {"type":"pong"}; junk frames are ignored', T, diagnose(ctx, async () => {
  const r = await raw('json-ping');
  r.ws.send('not json at all');
  r.send({ type: 'nosuchmessagetype', x: 1 });
  r.send({ type: 'ping' });
  await r.waitFor((m) => m.type === 'pong', 3000, 'pong frame');
  // Connection still usable afterwards.
  const res = await r.call('nobody::here', {});
  assert.equal(res.error?.code, 'function_not_found');
  assert.equal(res.function_id, 'nobody::here');
}));

test('void invocation produces no invocationresult for the caller', T, diagnose(ctx, async () => {
  const ran = deferred();
  B.registerFunction('rawpeer::sink', async (d) => {
    if (d?.kind === 'void') ran.resolve(d);
    return { kind: d?.kind };
  });
  await barrier(B, B);
  const r = await raw('void-caller');
  r.announce(`raw-void-${process.pid}`);
  r.send({ type: 'invokefunction', function_id: 'rawpeer::sink', data: { kind: 'void' }, action: { type: 'void' } });
  const d = await withTimeout(ran.promise, 5000, 'void handler on B');
  assert.equal(typeof d._caller_worker_id, 'string', 'void calls also get _caller_worker_id');
  // B has answered the engine for the void call by now; a sync call afterwards must be
  // the only invocationresult the raw caller ever sees.
  const res = await r.call('rawpeer::sink', { kind: 'sync' });
  assert.deepEqual(res.result, { kind: 'sync' });
  const results = r.frames.filter((m) => m.type === 'invocationresult');
  assert.equal(results.length, 1, `unexpected results: ${JSON.stringify(results)}`);
}));

test('raw worker: registerfunction + invocationresult round trip, ids echoed', T, diagnose(ctx, async () => {
  const r = await raw('raw-owner');
  const fid = `rawowner::double::${process.pid}`;
  r.send({ type: 'registerfunction', id: fid, description: 'doubles' });
  r.announce(`raw-owner-${process.pid}`);
  // Serve invocations from the raw socket.
  r.ws.on('message', (buf) => {
    const m = JSON.parse(buf.toString());
    if (m.type === 'invokefunction' && m.function_id === fid) {
      r.send({ type: 'invocationresult', invocation_id: m.invocation_id, function_id: fid, result: m.data.v * 2 });
    }
  });
  let out;
  const deadline = Date.now() + 8000;
  for (;;) {
    try {
      out = await B.trigger({ function_id: fid, payload: { v: 21 }, timeoutMs: 2000 });
      break;
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await new Promise((res) => setTimeout(res, 50));
    }
  }
  assert.equal(out, 42);
  const inv = r.frames.find((m) => m.type === 'invokefunction' && m.function_id === fid);
  assert.match(inv.invocation_id, UUID_RE);
  assert.equal(inv.data._caller_worker_id, B.workerId);
}));
