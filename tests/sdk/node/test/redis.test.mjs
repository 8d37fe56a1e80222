// The redis adapter through the official SDK: two engines share one redis-server (started here
// on a free port); a worker writes through engine A and a raw subscriber of engine B sees every
// frame, in order and with the shapes of a single engine. Skipped, saying so, without
// redis-server (test.sh installs it).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import net from 'node:net';
import { randomUUID } from 'node:crypto';
import { startEngine, diagnose } from '../lib/engine.mjs';
import { WorkerPool, barrier, pollUntil } from '../lib/workers.mjs';
import { StreamClient, assertFrame } from '../lib/stream.mjs';

const T = { timeout: 30000 };
const redisServer = ['/usr/bin/redis-server', '/usr/sbin/redis-server', '/usr/local/bin/redis-server']
  .find((p) => spawnSync(p, ['--version']).status === 0)
  ?? (spawnSync('redis-server', ['--version']).status === 0 ? 'redis-server' : null);
const SKIP = redisServer ? false : 'redis-server not found (install it: apt-get install redis-server; test.sh does)';

const pool = new WorkerPool();
const engines = [];
const clients = [];
let redis;
let A;

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
  });
}

function tcpOpen(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.once('connect', () => { s.destroy(); resolve(true); });
    s.once('error', () => resolve(false));
  });
}

before(async () => {
  if (SKIP) return;
  const port = await freePort();
  redis = spawn(redisServer, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  await pollUntil(() => tcpOpen(port), { what: 'redis-server to listen' });
  const adapter = { name: 'redis', config: { redis_url: `redis://127.0.0.1:${port}` } };
  engines.push(...await Promise.all([0, 1].map(() => startEngine({ shards: 2, streamConfig: { adapter } }))));
  A = pool.add(engines[0].url, 'node-redis-a');
  await barrier(A, A);
});

after(async () => {
  for (const c of clients) c.terminate();
  await pool.shutdownAll();
  await Promise.all(engines.map(async (e) => { await e.stop(); e.cleanup(); }));
  redis?.kill('SIGKILL');
});

const call = (fn, payload) => A.trigger({ function_id: `stream::${fn}`, payload, timeoutMs: 5000 });
const ctx = () => () => ({ engines, workers: pool.workers, raws: clients });

test('writes through engine A reach a subscriber of engine B in order, frames as on one engine', { ...T, skip: SKIP }, diagnose(ctx(), async () => {
  const s = 'redis-sdk';
  const g = `room-${randomUUID().slice(0, 8)}`;
  const a1 = { id: 'a1', text: 'first' };
  await call('set', { stream_name: s, group_id: g, item_id: 'a1', data: a1 });

  const c = new StreamClient(`${engines[1].streamUrl}/`, { label: 'sub-on-B' });
  clients.push(c);
  await c.connect();
  c.join(s, g);
  const sync = await c.waitSync(s, g);
  assertFrame(sync, { streamName: s, groupId: g, id: null, event: { type: 'sync', data: [a1] } }, { what: 'sync' });

  const x1 = { id: 'x', text: 'new' };
  const x2 = { id: 'x', text: 'edited' };
  assert.deepEqual(await call('set', { stream_name: s, group_id: g, item_id: 'x', data: x1 }), { old_value: null, new_value: x1 });
  assert.deepEqual(await call('set', { stream_name: s, group_id: g, item_id: 'x', data: x2 }), { old_value: x1, new_value: x2 });
  await call('send', { stream_name: s, group_id: g, type: 'typing', data: { user: 'alice' } });
  assert.deepEqual(await call('delete', { stream_name: s, group_id: g, item_id: 'x' }), { old_value: x2 });
  assert.deepEqual(await call('delete', { stream_name: s, group_id: g, item_id: 'x' }), { old_value: null });
  const u = await call('update', { stream_name: s, group_id: g, item_id: 'u', ops: [{ type: 'set', path: 'k', value: 1 }, { type: 'merge', path: '__proto__', value: {} }] });
  assert.deepEqual(u.new_value, { k: 1 });
  assert.equal(u.errors[0].code, 'merge.path.proto_polluted');
  await call('update', { stream_name: s, group_id: g, item_id: 'u', ops: [{ type: 'increment', path: 'k', by: 2 }] });
  await call('set', { stream_name: s, group_id: g, item_id: 'end', data: 'end' });
  await c.waitFor((f) => f.id === 'end', 5000, 'the create frame of item "end"');

  const expected = [
    { id: 'x', event: { type: 'create', data: x1 } },
    { id: 'x', event: { type: 'update', data: x2 } },
    { id: null, event: { type: 'event', event: { type: 'typing', data: { user: 'alice' } } } },
    { id: 'x', event: { type: 'delete', data: x2 } },
    { id: 'u', event: { type: 'create', data: { k: 1 } } },
    { id: 'u', event: { type: 'update', data: { k: 3 } } },
    { id: 'end', event: { type: 'create', data: 'end' } },
  ];
  const live = c.frames.slice(1);
  assert.equal(live.length, expected.length, `live frames: ${JSON.stringify(live)}`);
  live.forEach((f, i) => assertFrame(f, { streamName: s, groupId: g, ...expected[i] }, { what: `live frame #${i}` }));

  // Reads agree on both engines.
  const B = pool.add(engines[1].url, 'node-redis-b');
  await barrier(B, B);
  const list = await B.trigger({ function_id: 'stream::list', payload: { stream_name: s, group_id: g }, timeoutMs: 5000 });
  assert.deepEqual([...list].sort((p, q) => JSON.stringify(p).localeCompare(JSON.stringify(q))), [a1, 'end', { k: 3 }].sort((p, q) => JSON.stringify(p).localeCompare(JSON.stringify(q))));
  const groups = await B.trigger({ function_id: 'stream::list_groups', payload: { stream_name: s }, timeoutMs: 5000 });
  assert.deepEqual(groups, [g]);
}));
