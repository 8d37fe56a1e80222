// stream::update on a stream whose storage is a worker's createStream implementation (spec
// stream.md §6.5): the engine applies the ops through the implementation's get and set, one
// update of an item at a time, and subscribers get every event.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createStream } from 'iii-sdk/helpers';
import { startEngine, diagnose } from '../lib/engine.mjs';
import { WorkerPool, barrier, sleep } from '../lib/workers.mjs';
import { StreamClient } from '../lib/stream.mjs';

let engine;
const pool = new WorkerPool();
let storage;
let caller;
let subscriber;
const ctx = () => ({ engines: [engine], workers: [storage, caller], raws: [subscriber] });
const T = { timeout: 30000 };

/** An in-memory stream implementation whose get and set take a little while each. */
const items = new Map();
const log = [];
const impl = {
  async get({ group_id, item_id }) {
    log.push(`get ${item_id}`);
    await sleep(2);
    return items.get(`${group_id}/${item_id}`) ?? null;
  },
  async set({ group_id, item_id, data }) {
    log.push(`set ${item_id}`);
    await sleep(2);
    const key = `${group_id}/${item_id}`;
    const old_value = items.get(key) ?? null;
    items.set(key, data);
    return { old_value, new_value: data };
  },
  async delete({ group_id, item_id }) {
    const key = `${group_id}/${item_id}`;
    const old_value = items.get(key) ?? null;
    items.delete(key);
    return { old_value };
  },
  async list({ group_id }) {
    return [...items.entries()].filter(([k]) => k.startsWith(`${group_id}/`)).map(([, v]) => v);
  },
  async listGroups() {
    return [...new Set([...items.keys()].map((k) => k.split('/')[0]))];
  },
};

before(async () => {
  engine = await startEngine();
  storage = pool.add(engine.url, 'node-custom-stream');
  caller = pool.add(engine.url, 'node-updater');
  createStream(storage, 'tallies', impl);
  await barrier(storage, caller);
  subscriber = await new StreamClient(engine.streamUrl, { label: 'tallies' }).connect();
  subscriber.join('tallies', 'g');
  await subscriber.waitSync('tallies', 'g');
});

after(async () => {
  subscriber?.close();
  await pool.shutdownAll();
  if (engine) {
    await engine.stop();
    engine.cleanup();
  }
});

test('concurrent stream::update calls on one item all go through the custom get and set', T, diagnose(ctx, async () => {
  const N = 10;
  const results = await Promise.all(Array.from({ length: N }, () => caller.trigger({
    function_id: 'stream::update',
    payload: { stream_name: 'tallies', group_id: 'g', item_id: 't1', ops: [{ type: 'increment', path: 'n', by: 1 }] },
  })));
  assert.deepEqual(items.get('g/t1'), { n: N }, 'every increment applied to the custom storage');
  assert.deepEqual(results.map((r) => r.new_value.n).sort((a, b) => a - b), Array.from({ length: N }, (_, i) => i + 1));
  assert.deepEqual(log, Array.from({ length: N }, () => ['get t1', 'set t1']).flat(), 'read and write of one update never interleave with another');
  const last = await subscriber.waitFor((f) => f.id === 't1' && f.event?.data?.n === N, 5000, 'the last update event');
  assert.equal(last.event.type, 'update');
  const events = subscriber.frames.filter((f) => f.id === 't1');
  assert.equal(events.length, N);
  assert.equal(events[0].event.type, 'create');
}));
