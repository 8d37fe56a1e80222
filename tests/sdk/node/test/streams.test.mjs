// iii-stream through the official SDK and a raw subscriber WebSocket (spec stream.md §1–§4).
import { test, before, after, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { startEngine, diagnose } from '../lib/engine.mjs';
import {
  WorkerPool, barrier, deferred, withTimeout, rejectionOf,
} from '../lib/workers.mjs';
import { StreamClient, upgradeStatus, assertFrame } from '../lib/stream.mjs';

const T = { timeout: 30000 };
const DOC_URL = 'https://iii.dev/docs/workers/iii-state#error-codes';

const pool = new WorkerPool();
const engines = [];
const clients = [];
let engF; // functions (--shards 2, nothing else touches its store)
let engW; // subscribers and stream triggers (--shards 2)
let F;
let W;

before(async () => {
  [engF, engW] = await Promise.all([startEngine({ shards: 2 }), startEngine({ shards: 2 })]);
  engines.push(engF, engW);
  F = pool.add(engF.url, 'node-stream-fn');
  W = pool.add(engW.url, 'node-stream-ws');
  await Promise.all([barrier(F, F), barrier(W, W)]);
});

after(async () => {
  for (const c of clients) c.terminate();
  await pool.shutdownAll();
  await Promise.all(engines.map(async (e) => { await e.stop(); e.cleanup(); }));
});

let testClients = []; // subscribers of the running test, for failure diagnostics
beforeEach(() => { testClients = []; });
const ctx = () => () => ({ engines, workers: pool.workers, raws: testClients });

function call(worker, fn, payload) {
  return worker.trigger({ function_id: `stream::${fn}`, payload, timeoutMs: 5000 });
}

async function subscriber(engine, label, { path = '/', protocols } = {}) {
  const c = new StreamClient(`${engine.streamUrl}${path}`, { label, protocols });
  clients.push(c);
  testClients.push(c);
  await c.connect();
  return c;
}

/** Records invocations of a function; `next(pred)` waits for a matching one. */
function recorder(worker, id, reply = () => ({ ok: true })) {
  const calls = [];
  const waiters = [];
  worker.registerFunction(id, async (data) => {
    calls.push(data);
    for (const w of [...waiters]) {
      if (w.pred(data)) { waiters.splice(waiters.indexOf(w), 1); w.d.resolve(data); }
    }
    return reply(data);
  });
  return {
    calls,
    next(pred = () => true, ms = 5000, what = `a call of ${id}`) {
      const hit = calls.find(pred);
      if (hit) return Promise.resolve(hit);
      const d = deferred();
      waiters.push({ pred, d });
      return withTimeout(d.promise, ms, `${what}; calls so far: ${JSON.stringify(calls).slice(-1500)}`);
    },
  };
}

// ---------------------------------------------------------------------------------------------
// 1. Stream functions through trigger()
// ---------------------------------------------------------------------------------------------

test('stream::set/get/delete/list/list_groups/list_all/send through trigger() (--shards 2)', T, diagnose(ctx(), async () => {
  const m1 = { id: 'm1', text: 'hi' };
  const m1b = { id: 'm1', text: 'edited' };
  const m1c = { id: 'm1', text: 'edited again' };
  const m2 = { id: 'm2', text: 'yo' };
  const m0 = { id: 'm0', text: 'last' };

  // set: create, then update (full overwrite).
  assert.deepEqual(
    await call(F, 'set', { stream_name: 'chat', group_id: 'room-1', item_id: 'm1', data: m1 }),
    { old_value: null, new_value: m1 },
  );
  assert.deepEqual(
    await call(F, 'set', { stream_name: 'chat', group_id: 'room-1', item_id: 'm1', data: m1b }),
    { old_value: m1, new_value: m1b },
  );
  await call(F, 'set', { stream_name: 'chat', group_id: 'room-1', item_id: 'm2', data: m2 });
  await call(F, 'set', { stream_name: 'chat', group_id: 'room-1', item_id: 'm0', data: m0 });
  // Overwriting keeps the item's position in the group.
  assert.deepEqual(
    await call(F, 'set', { stream_name: 'chat', group_id: 'room-1', item_id: 'm1', data: m1c }),
    { old_value: m1b, new_value: m1c },
  );
  // Any JSON value can be an item.
  assert.deepEqual(
    await call(F, 'set', { stream_name: 'chat', group_id: 'room-2', item_id: 'num', data: 42 }),
    { old_value: null, new_value: 42 },
  );
  // Stream names containing ':' (and a stream that is a prefix of another).
  await call(F, 'set', { stream_name: 'ns', group_id: 'a', item_id: 'x', data: { v: 1 } });
  await call(F, 'set', { stream_name: 'ns:feed', group_id: 'g1', item_id: 'y', data: { v: 2 } });

  // get: bare value; missing → null/undefined.
  assert.deepEqual(await call(F, 'get', { stream_name: 'chat', group_id: 'room-1', item_id: 'm1' }), m1c);
  assert.equal(await call(F, 'get', { stream_name: 'chat', group_id: 'room-2', item_id: 'num' }), 42);
  assert.deepEqual(await call(F, 'get', { stream_name: 'ns:feed', group_id: 'g1', item_id: 'y' }), { v: 2 });
  const missing = await call(F, 'get', { stream_name: 'chat', group_id: 'room-1', item_id: 'nope' });
  assert.ok(missing === null || missing === undefined, `get of a missing item gave ${JSON.stringify(missing)}`);

  // list: bare array of values in insertion order; missing group → [].
  assert.deepEqual(await call(F, 'list', { stream_name: 'chat', group_id: 'room-1' }), [m1c, m2, m0]);
  assert.deepEqual(await call(F, 'list', { stream_name: 'chat', group_id: 'no-such-group' }), []);

  // list_groups: bare array (order unspecified); no prefix bleed between 'ns' and 'ns:feed'.
  const groups = await call(F, 'list_groups', { stream_name: 'chat' });
  assert.ok(Array.isArray(groups), `list_groups gave ${JSON.stringify(groups)}`);
  assert.deepEqual([...groups].sort(), ['room-1', 'room-2']);
  assert.deepEqual(await call(F, 'list_groups', { stream_name: 'ns' }), ['a']);
  assert.deepEqual(await call(F, 'list_groups', { stream_name: 'ns:feed' }), ['g1']);
  assert.deepEqual(await call(F, 'list_groups', { stream_name: 'nothing-here' }), []);

  // delete: {old_value}; a second delete finds nothing.
  assert.deepEqual(await call(F, 'delete', { stream_name: 'chat', group_id: 'room-1', item_id: 'm2' }), { old_value: m2 });
  assert.deepEqual(await call(F, 'delete', { stream_name: 'chat', group_id: 'room-1', item_id: 'm2' }), { old_value: null });
  assert.deepEqual(await call(F, 'list', { stream_name: 'chat', group_id: 'room-1' }), [m1c, m0]);

  // Emptied groups disappear from list_groups / list_all (ringcast behaviour).
  assert.deepEqual(await call(F, 'delete', { stream_name: 'chat', group_id: 'room-2', item_id: 'num' }), { old_value: 42 });
  assert.deepEqual(await call(F, 'list_groups', { stream_name: 'chat' }), ['room-1']);

  // send: null result, stores nothing, creates no stream.
  const sent = await call(F, 'send', {
    stream_name: 'ephemeral', group_id: 'g', type: 'typing', data: { user: 'alice' },
  });
  assert.equal(sent ?? null, null, `send gave ${JSON.stringify(sent)}`);

  // list_all: sorted streams, sorted groups, count = number of streams.
  assert.deepEqual(await call(F, 'list_all', {}), {
    stream: [
      { id: 'chat', groups: ['room-1'] },
      { id: 'ns', groups: ['a'] },
      { id: 'ns:feed', groups: ['g1'] },
    ],
    count: 3,
  });
}));

test('stream::update: ops of §2.8, per-op errors, create on missing, float `by` is deserialization_error', T, diagnose(ctx(), async () => {
  const key = { stream_name: 'counters', group_id: 'g', item_id: 'c1' };
  await call(F, 'set', { ...key, data: { count: 1, name: 'c' } });
  const res = await call(F, 'update', {
    ...key,
    ops: [
      { type: 'increment', path: 'count', by: 1 },
      { type: 'set', path: '__proto__', value: 1 },
      { type: 'merge', path: ['meta', 'last'], value: { by: 'alice' } },
      { type: 'append', path: 'log', value: 'x' },
      { type: 'decrement', path: 'name', by: 2 },
    ],
  });
  const expectedNew = { count: 2, name: 'c', log: 'x', meta: { last: { by: 'alice' } } };
  assert.deepEqual(Object.keys(res).sort(), ['errors', 'new_value', 'old_value'], JSON.stringify(res));
  assert.deepEqual(res.old_value, { count: 1, name: 'c' });
  assert.deepEqual(res.new_value, expectedNew);
  assert.ok(Array.isArray(res.errors) && res.errors.length === 2, `errors: ${JSON.stringify(res.errors)}`);
  for (const e of res.errors) {
    assert.deepEqual(Object.keys(e).sort(), ['code', 'doc_url', 'message', 'op_index'], JSON.stringify(e));
    assert.equal(e.doc_url, DOC_URL);
    assert.equal(typeof e.message, 'string');
    assert.ok(e.message.length > 0);
  }
  assert.equal(res.errors[0].op_index, 1);
  assert.equal(res.errors[0].code, 'set.path.proto_polluted');
  assert.match(res.errors[0].message, /__proto__/);
  assert.equal(res.errors[1].op_index, 4);
  assert.equal(res.errors[1].code, 'decrement.not_number');
  assert.deepEqual(await call(F, 'get', key), expectedNew);

  // Without per-op errors the `errors` key is omitted; a missing item starts from {}.
  const created = await call(F, 'update', {
    stream_name: 'counters', group_id: 'g', item_id: 'c2', ops: [{ type: 'increment', path: 'n', by: 5 }],
  });
  assert.deepEqual(created, { old_value: null, new_value: { n: 5 } });

  // A float `by` fails the whole call and changes nothing.
  const err = await rejectionOf(call(F, 'update', { ...key, ops: [{ type: 'increment', path: 'count', by: 1.5 }] }));
  assert.equal(err.code, 'deserialization_error', `got ${err.code}: ${err.message}`);
  assert.deepEqual(await call(F, 'get', key), expectedNew);
}));

// ---------------------------------------------------------------------------------------------
// 2. Raw subscriber frames
// ---------------------------------------------------------------------------------------------

test('group subscriber: sync frame, then create/update/event/delete frames in order with exact shapes', T, diagnose(ctx(), async () => {
  const s = 'chat-ws';
  const g = `room-${randomUUID().slice(0, 8)}`;
  const a1 = { id: 'a1', text: 'first' };
  const a2 = { id: 'a2', text: 'second' };
  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'a1', data: a1 });
  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'a2', data: a2 });

  const c = await subscriber(engW, 'group-sub');
  const t0 = Date.now();
  c.join(s, g);
  const sync = await c.waitSync(s, g);
  assert.equal(c.frames[0], sync, 'the sync frame must be the first frame after the join');
  assertFrame(sync, { streamName: s, groupId: g, id: null, event: { type: 'sync', data: [a1, a2] } }, { notBefore: t0, what: 'sync' });

  const x1 = { id: 'x', text: 'new' };
  const x2 = { id: 'x', text: 'edited' };
  const t1 = Date.now();
  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'x', data: x1 });
  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'x', data: x2 });
  await call(W, 'send', { stream_name: s, group_id: g, type: 'typing', data: { user: 'alice' } });
  await call(W, 'send', { stream_name: s, group_id: g, type: 'poke', data: [1, 2], id: 'x' });
  await call(W, 'delete', { stream_name: s, group_id: g, item_id: 'x' });
  await call(W, 'delete', { stream_name: s, group_id: g, item_id: 'x' }); // nothing removed → no frame
  await call(W, 'update', { stream_name: s, group_id: g, item_id: 'u', ops: [{ type: 'set', path: 'k', value: 1 }] });
  await call(W, 'update', { stream_name: s, group_id: g, item_id: 'u', ops: [{ type: 'increment', path: 'k', by: 2 }] });
  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'end', data: 'end' });
  await c.waitFor((f) => f.id === 'end', 5000, 'the create frame of item "end"');

  const expected = [
    { id: 'x', event: { type: 'create', data: x1 } },
    { id: 'x', event: { type: 'update', data: x2 } },
    { id: null, event: { type: 'event', event: { type: 'typing', data: { user: 'alice' } } } },
    { id: 'x', event: { type: 'event', event: { type: 'poke', data: [1, 2] } } },
    { id: 'x', event: { type: 'delete', data: x2 } },
    { id: 'u', event: { type: 'create', data: { k: 1 } } },
    { id: 'u', event: { type: 'update', data: { k: 3 } } },
    { id: 'end', event: { type: 'create', data: 'end' } },
  ];
  const live = c.frames.slice(1);
  assert.equal(live.length, expected.length, `live frames: ${JSON.stringify(live)}`);
  let prevTs = sync.timestamp;
  live.forEach((f, i) => {
    assertFrame(f, { streamName: s, groupId: g, ...expected[i] }, { notBefore: t1, what: `live frame #${i}` });
    assert.ok(f.timestamp >= prevTs, `timestamps must not go backwards: ${JSON.stringify(live)}`);
    prevTs = f.timestamp;
  });
  assert.equal(c.binaryFrames, 0, 'frames must be text frames');
}));

test('item subscription receives only its item\'s frames; item sync carries the value or null', T, diagnose(ctx(), async () => {
  const s = 'items';
  const g = `g-${randomUUID().slice(0, 8)}`;
  const c = await subscriber(engW, 'item-sub');
  const t0 = Date.now();
  c.join(s, g, 'it1');
  const sync = await c.waitSync(s, g, 'it1');
  assertFrame(sync, { streamName: s, groupId: g, id: 'it1', event: { type: 'sync', data: null } }, { notBefore: t0, what: 'item sync' });

  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'other', data: { n: 0 } });
  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'it1', data: { n: 1 } });
  await call(W, 'send', { stream_name: s, group_id: g, type: 'to-group', data: 1 });
  await call(W, 'send', { stream_name: s, group_id: g, type: 'to-other', data: 2, id: 'other' });
  await call(W, 'send', { stream_name: s, group_id: g, type: 'to-it1', data: 3, id: 'it1' });
  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'other', data: { n: 10 } });
  await call(W, 'delete', { stream_name: s, group_id: g, item_id: 'it1' });
  await c.waitFor((f) => f.event?.type === 'delete', 5000, 'the delete frame of it1');

  const live = c.frames.slice(1);
  const expected = [
    { event: { type: 'create', data: { n: 1 } } },
    { event: { type: 'event', event: { type: 'to-it1', data: 3 } } },
    { event: { type: 'delete', data: { n: 1 } } },
  ];
  assert.equal(live.length, expected.length, `item subscriber got: ${JSON.stringify(live)}`);
  live.forEach((f, i) => assertFrame(f, { streamName: s, groupId: g, id: 'it1', ...expected[i] }, { what: `item frame #${i}` }));

  // Item sync of an existing item carries its bare value.
  c.join(s, g, 'other');
  const sync2 = await c.waitSync(s, g, 'other');
  assertFrame(sync2, { streamName: s, groupId: g, id: 'other', event: { type: 'sync', data: { n: 10 } } }, { what: 'item sync (existing)' });
}));

test('leave stops delivery to that subscription', T, diagnose(ctx(), async () => {
  const s = 'leaving';
  const g = `g-${randomUUID().slice(0, 8)}`;
  const c1 = await subscriber(engW, 'leaver');
  const c2 = await subscriber(engW, 'stayer');
  const sub1 = c1.join(s, g);
  c2.join(s, g);
  await Promise.all([c1.waitSync(s, g), c2.waitSync(s, g)]);

  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'before', data: 1 });
  await Promise.all([
    c1.waitFor((f) => f.id === 'before', 5000, 'frame for "before" (c1)'),
    c2.waitFor((f) => f.id === 'before', 5000, 'frame for "before" (c2)'),
  ]);

  c1.leave(sub1, s, g);
  // Frames of one socket are handled in order: once this item join's sync arrives, the
  // leave has been processed.
  c1.join(s, g, 'marker');
  await c1.waitSync(s, g, 'marker');

  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'after', data: 2 });
  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'marker', data: 3 });
  await c1.waitFor((f) => f.id === 'marker' && f.event?.type === 'create', 5000, 'create frame of the marker item (c1)');
  await c2.waitFor((f) => f.id === 'marker', 5000, 'create frame of the marker item (c2)');
  assert.ok(c2.frames.some((f) => f.id === 'after'), 'the remaining group subscriber must get "after"');
  const leaked = c1.frames.filter((f) => f.id === 'after');
  assert.deepEqual(leaked, [], 'no frame for "after" may reach the connection whose group subscription left');
}));

// ---------------------------------------------------------------------------------------------
// 3. `stream` triggers
// ---------------------------------------------------------------------------------------------

test('stream triggers fire with the frame payload; group/item filters; a false condition suppresses', T, diagnose(ctx(), async () => {
  const s = `trig-${randomUUID().slice(0, 8)}`;
  const all = recorder(W, 'strig::all');
  const g1 = recorder(W, 'strig::g1');
  const item = recorder(W, 'strig::item');
  const cond = recorder(W, 'strig::cond', () => true);
  const conditional = recorder(W, 'strig::conditional');
  const isAllowed = recorder(W, 'strig::is_allowed', (p) => p.id !== 'skip');
  W.registerTrigger({ type: 'stream', function_id: 'strig::all', config: { stream_name: s } });
  W.registerTrigger({ type: 'stream', function_id: 'strig::g1', config: { stream_name: s, group_id: 'g1' } });
  W.registerTrigger({ type: 'stream', function_id: 'strig::item', config: { stream_name: s, item_id: 'ok' } });
  W.registerTrigger({
    type: 'stream', function_id: 'strig::conditional',
    config: { stream_name: s, condition_function_id: 'strig::is_allowed' },
  });
  // Another stream's trigger must not fire for this stream.
  W.registerTrigger({ type: 'stream', function_id: 'strig::cond', config: { stream_name: `${s}-other` } });
  await barrier(W, W);

  const t0 = Date.now();
  await call(W, 'set', { stream_name: s, group_id: 'g1', item_id: 'skip', data: { v: 'skip' } });
  await call(W, 'set', { stream_name: s, group_id: 'g1', item_id: 'ok', data: { v: 1 } });
  await call(W, 'set', { stream_name: s, group_id: 'g2', item_id: 'other', data: { v: 2 } });
  await call(W, 'send', { stream_name: s, group_id: 'g2', type: 'ping', data: { p: true } });
  await call(W, 'set', { stream_name: s, group_id: 'g1', item_id: 'ok', data: { v: 3 } });

  // Exact payload = the outbound frame.
  const created = await all.next((p) => p.id === 'ok' && p.event?.type === 'create');
  assertFrame(created, { streamName: s, groupId: 'g1', id: 'ok', event: { type: 'create', data: { v: 1 } } }, { notBefore: t0, what: 'trigger payload (create)' });
  const updated = await all.next((p) => p.id === 'ok' && p.event?.type === 'update');
  assertFrame(updated, { streamName: s, groupId: 'g1', id: 'ok', event: { type: 'update', data: { v: 3 } } }, { notBefore: t0, what: 'trigger payload (update)' });
  const sent = await all.next((p) => p.event?.type === 'event');
  assertFrame(sent, { streamName: s, groupId: 'g2', id: null, event: { type: 'event', event: { type: 'ping', data: { p: true } } } }, { notBefore: t0, what: 'trigger payload (send)' });
  await all.next((p) => p.id === 'skip');
  await all.next((p) => p.id === 'other');

  // Conditional trigger: the condition sees the same payload; 'skip' is suppressed.
  await isAllowed.next((p) => p.id === 'skip', 5000, 'the condition to be asked about "skip"');
  const condSkip = isAllowed.calls.find((p) => p.id === 'skip');
  assertFrame(condSkip, { streamName: s, groupId: 'g1', id: 'skip', event: { type: 'create', data: { v: 'skip' } } }, { what: 'condition payload' });
  // Every expected invocation, awaited one by one (no ordering between events is assumed).
  await conditional.next((p) => p.id === 'ok' && p.event?.type === 'create');
  await conditional.next((p) => p.id === 'ok' && p.event?.type === 'update');
  await conditional.next((p) => p.id === 'other');
  await conditional.next((p) => p.event?.type === 'event');
  await g1.next((p) => p.id === 'skip');
  await g1.next((p) => p.id === 'ok' && p.event?.type === 'create');
  await g1.next((p) => p.id === 'ok' && p.event?.type === 'update');
  await item.next((p) => p.event?.type === 'create');
  await item.next((p) => p.event?.type === 'update');

  // Settle: one more event every trigger of this stream sees, and whose condition was asked.
  await call(W, 'set', { stream_name: s, group_id: 'g1', item_id: 'ok', data: { v: 'final' } });
  await Promise.all([
    all.next((p) => p.event?.data?.v === 'final'),
    g1.next((p) => p.event?.data?.v === 'final'),
    item.next((p) => p.event?.data?.v === 'final'),
    conditional.next((p) => p.event?.data?.v === 'final'),
  ]);
  assert.equal(all.calls.length, 6, `unfiltered trigger calls: ${JSON.stringify(all.calls)}`);
  assert.deepEqual(g1.calls.map((p) => p.id).sort(), ['ok', 'ok', 'ok', 'skip'], `group-filtered calls: ${JSON.stringify(g1.calls)}`);
  assert.ok(g1.calls.every((p) => p.groupId === 'g1'), `group filter leaked: ${JSON.stringify(g1.calls)}`);
  assert.ok(item.calls.every((p) => p.id === 'ok'), `item filter leaked: ${JSON.stringify(item.calls)}`);
  assert.equal(item.calls.length, 3, `item-filtered calls: ${JSON.stringify(item.calls)}`);
  assert.deepEqual(conditional.calls.filter((p) => p.id === 'skip'), [], 'condition returned false for "skip" but the handler ran');
  assert.equal(conditional.calls.length, 5, `conditional calls: ${JSON.stringify(conditional.calls)}`);
  assert.deepEqual(cond.calls, [], 'a trigger for another stream fired');
}));

// ---------------------------------------------------------------------------------------------
// 4. stream:join / stream:leave, auth
// ---------------------------------------------------------------------------------------------

let engA; // auth_function configured, join/leave triggers registered
let A;
let auth;
let joins;
let leaves;

async function authEngine() {
  if (engA) return;
  engA = await startEngine({ streamConfig: { auth_function: 'sauth::check' } });
  engines.push(engA);
  A = pool.add(engA.url, 'node-stream-auth');
  auth = recorder(A, 'sauth::check', (input) => (
    input?.query_params?.token?.[0] === 'abc' ? { context: { userId: 'u1' } } : { note: 'no context' }
  ));
  joins = recorder(A, 'sjoin::on_join', (p) => (p.group_id === 'forbidden' ? { unauthorized: true } : { ok: true }));
  leaves = recorder(A, 'sjoin::on_leave');
  A.registerTrigger({ type: 'stream:join', function_id: 'sjoin::on_join', config: {} });
  A.registerTrigger({ type: 'stream:leave', function_id: 'sjoin::on_leave', config: {} });
  await barrier(A, A);
}

const U1 = { userId: 'u1' };

test('auth function input; stream:join payload with context; unauthorized join; stream:leave on leave', T, diagnose(ctx(), async () => {
  await authEngine();
  const n0 = auth.calls.length;
  // Auth input (§1.2), seen before the upgrade completes.
  const c1 = await subscriber(engA, 'auth-sub', { path: '/?token=abc', protocols: ['Authorization', 'tok'] });
  assert.equal(c1.ws.protocol, 'Authorization');
  assert.equal(auth.calls.length, n0 + 1, `auth calls: ${JSON.stringify(auth.calls)}`);
  const input = auth.calls[n0];
  assert.deepEqual(Object.keys(input).sort(), ['addr', 'headers', 'path', 'query_params']);
  assert.equal(input.path, '/');
  assert.deepEqual(input.query_params, { token: ['abc'] });
  assert.match(input.addr, /^127\.0\.0\.1:\d+$/);
  assert.equal(input.headers.upgrade?.toLowerCase(), 'websocket');
  assert.equal(input.headers['sec-websocket-version'], '13');
  assert.equal(input.headers.host, `127.0.0.1:${engA.streamPort}`);
  // As offered by the client (`ws` joins the protocols with ',').
  assert.match(input.headers['sec-websocket-protocol'] ?? '', /^Authorization,\s*tok$/);

  const s = 'room';
  const sub1 = c1.join(s, 'g');
  await c1.waitSync(s, 'g');
  assert.deepEqual(
    await joins.next((p) => p.subscription_id === sub1),
    { subscription_id: sub1, stream_name: s, group_id: 'g', id: null, context: U1 },
  );
  const sub2 = c1.join(s, 'g', 'i1');
  await c1.waitSync(s, 'g', 'i1');
  assert.deepEqual(
    await joins.next((p) => p.subscription_id === sub2),
    { subscription_id: sub2, stream_name: s, group_id: 'g', id: 'i1', context: U1 },
  );

  // Rejected join: an `unauthorized` frame, no sync, socket stays open.
  const t0 = Date.now();
  c1.join(s, 'forbidden');
  const unauth = await c1.waitFor((f) => f.event?.type === 'unauthorized', 5000, 'unauthorized frame');
  assertFrame(unauth, { streamName: s, groupId: 'forbidden', id: null, event: { type: 'unauthorized' } }, { notBefore: t0, what: 'unauthorized' });
  c1.join(s, 'g2');
  await c1.waitSync(s, 'g2');
  assert.deepEqual(c1.frames.filter((f) => f.groupId === 'forbidden' && f.event?.type !== 'unauthorized'), [],
    'no frame other than `unauthorized` may follow a refused join');
  assert.ok(c1.open, 'the socket must stay open after `unauthorized`');
  // The refused subscription receives nothing.
  await call(A, 'set', { stream_name: s, group_id: 'forbidden', item_id: 'z', data: 1 });
  await call(A, 'set', { stream_name: s, group_id: 'g2', item_id: 'z', data: 2 });
  await c1.waitFor((f) => f.groupId === 'g2' && f.id === 'z', 5000, 'g2 create frame');
  assert.deepEqual(c1.frames.filter((f) => f.groupId === 'forbidden' && f.event?.type !== 'unauthorized'), []);

  // leave message → stream:leave with the message's fields and the context.
  c1.leave(sub1, s, 'g');
  assert.deepEqual(
    await leaves.next((p) => p.subscription_id === sub1),
    { subscription_id: sub1, stream_name: s, group_id: 'g', id: null, context: U1 },
  );

  // An auth result without `context` → context null.
  const c2 = await subscriber(engA, 'no-token-sub');
  const sub5 = c2.join(s, 'g');
  await c2.waitSync(s, 'g');
  assert.deepEqual(
    await joins.next((p) => p.subscription_id === sub5),
    { subscription_id: sub5, stream_name: s, group_id: 'g', id: null, context: null },
  );
  c2.leave(sub5, s, 'g');
  assert.deepEqual(
    await leaves.next((p) => p.subscription_id === sub5),
    { subscription_id: sub5, stream_name: s, group_id: 'g', id: null, context: null },
  );
}));

/** Connect with token abc, make two subscriptions and one refused join; returns their ids. */
async function subscribedClient(label) {
  const c = await subscriber(engA, label, { path: '/?token=abc' });
  const g = `g-${randomUUID().slice(0, 8)}`;
  const group = c.join('room', g);
  await c.waitSync('room', g);
  const item = c.join('room', g, 'i1');
  await c.waitSync('room', g, 'i1');
  const refused = c.join('room', 'forbidden');
  await c.waitFor((f) => f.event?.type === 'unauthorized', 5000, 'unauthorized frame');
  const left = c.join('room', g, 'i2');
  await c.waitSync('room', g, 'i2');
  c.leave(left, 'room', g);
  await leaves.next((p) => p.subscription_id === left, 5000, 'leave of the explicitly left subscription');
  return { c, g, group, item, refused, left };
}

async function assertLeavesOnDisconnect({ g, group, item, refused, left }) {
  const [lg, li] = await Promise.all([
    leaves.next((p) => p.subscription_id === group, 5000, `stream:leave of group subscription ${group} on disconnect`),
    leaves.next((p) => p.subscription_id === item, 5000, `stream:leave of item subscription ${item} on disconnect`),
  ]);
  assert.deepEqual(lg, { subscription_id: group, stream_name: 'room', group_id: g, id: null, context: U1 });
  assert.deepEqual(li, { subscription_id: item, stream_name: 'room', group_id: g, id: 'i1', context: U1 });
  assert.deepEqual(leaves.calls.filter((p) => p.subscription_id === refused), [], 'a refused join must not produce a leave');
  assert.equal(leaves.calls.filter((p) => p.subscription_id === left).length, 1, 'a subscription that left must not leave again');
}

test('stream:leave fires for each remaining subscription on a clean close (close frame)', T, diagnose(ctx(), async () => {
  await authEngine();
  const sc = await subscribedClient('clean-close');
  sc.c.close();
  await assertLeavesOnDisconnect(sc);
}));

test('stream:leave fires for each remaining subscription when the TCP connection drops', T, diagnose(ctx(), async () => {
  await authEngine();
  const sc = await subscribedClient('tcp-drop');
  sc.c.terminate();
  await assertLeavesOnDisconnect(sc);
}));

test('auth_required: a failing auth function refuses the upgrade with HTTP 401', T, diagnose(ctx(), async () => {
  const eng = await startEngine({ streamConfig: { auth_function: 'sauth::strict', auth_required: true } });
  engines.push(eng);
  // No auth function registered yet: the call fails → 401.
  assert.equal(await upgradeStatus(`${eng.streamUrl}/?token=good`), 401);

  const A = pool.add(eng.url, 'node-stream-strict');
  A.registerFunction('sauth::strict', async (input) => {
    if (input?.query_params?.token?.[0] !== 'good') throw new Error('denied');
    return { context: { userId: 'u2' } };
  });
  await barrier(A, A);
  assert.equal(await upgradeStatus(`${eng.streamUrl}/?token=bad`), 401);
  const c = await subscriber(eng, 'strict-ok', { path: '/?token=good' });
  c.join('s', 'g');
  await c.waitSync('s', 'g');
}));

// ---------------------------------------------------------------------------------------------
// 5. Subprotocol echo and the /stream/{s}/{g}/ URL form
// ---------------------------------------------------------------------------------------------

test('subprotocol ["Authorization", token] is accepted and "Authorization" selected', T, diagnose(ctx(), async () => {
  const c = await subscriber(engW, 'subprotocol', { protocols: ['Authorization', 'tok'] });
  assert.equal(c.ws.protocol, 'Authorization');
  const g = `g-${randomUUID().slice(0, 8)}`;
  c.join('proto', g);
  const sync = await c.waitSync('proto', g);
  assertFrame(sync, { streamName: 'proto', groupId: g, id: null, event: { type: 'sync', data: [] } }, { what: 'sync' });
}));

test('URL form /stream/{s}/{g}/ and /stream/{s}/{g}/{id} is an implicit join: sync first, then live frames', T, diagnose(ctx(), async () => {
  const s = 'urlform';
  const g = `g-${randomUUID().slice(0, 8)}`;
  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'k1', data: { k: 1 } });
  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'k2', data: { k: 2 } });

  const t0 = Date.now();
  const cg = await subscriber(engW, 'url-group', { path: `/stream/${s}/${g}/` });
  const ci = await subscriber(engW, 'url-item', { path: `/stream/${s}/${g}/k1` });
  await cg.waitSync(s, g);
  await ci.waitSync(s, g, 'k1');
  assertFrame(cg.frames[0], { streamName: s, groupId: g, id: null, event: { type: 'sync', data: [{ k: 1 }, { k: 2 }] } }, { notBefore: t0, what: 'first frame (group URL)' });
  assertFrame(ci.frames[0], { streamName: s, groupId: g, id: 'k1', event: { type: 'sync', data: { k: 1 } } }, { notBefore: t0, what: 'first frame (item URL)' });

  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'k2', data: { k: 22 } });
  await call(W, 'set', { stream_name: s, group_id: g, item_id: 'k1', data: { k: 11 } });
  const f = await cg.waitFor((x) => x.id === 'k1' && x.event?.type === 'update', 5000, 'k1 update (group URL)');
  assertFrame(f, { streamName: s, groupId: g, id: 'k1', event: { type: 'update', data: { k: 11 } } }, { what: 'update (group URL)' });
  assert.deepEqual(cg.frames.slice(1).map((x) => x.id), ['k2', 'k1']);
  const fi = await ci.waitFor((x) => x.event?.type === 'update', 5000, 'k1 update (item URL)');
  assertFrame(fi, { streamName: s, groupId: g, id: 'k1', event: { type: 'update', data: { k: 11 } } }, { what: 'update (item URL)' });
  assert.equal(ci.frames.length, 2, `item URL subscriber got: ${JSON.stringify(ci.frames)}`);
}));
