// The built-in queue through the official SDK: TriggerAction.Enqueue answers a receipt once the
// message is stored; the function runs at least once, in order on a concurrency-1 queue, is
// retried after throwing, and is dead-lettered after its last attempt and redriven by id.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { TriggerAction } from 'iii-sdk';
import { startEngine, diagnose } from '../lib/engine.mjs';
import { WorkerPool, barrier, deferred, withTimeout, pollUntil } from '../lib/workers.mjs';

let engine;
const pool = new WorkerPool();
let producer;
let consumer;
const ctx = () => ({ engines: [engine], workers: [producer, consumer] });
const T = { timeout: 30000 };
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

before(async () => {
  engine = await startEngine({
    extraWorkersYaml: [
      '  - name: iii-queue',
      '    config:',
      '      queue_configs:',
      '        orders: {concurrency: 1}',
      '        flaky: {concurrency: 1, max_retries: 3, backoff_ms: 50}',
      '        doomed: {max_retries: 2, backoff_ms: 20}',
    ].join('\n'),
  });
  producer = pool.add(engine.url, 'node-producer');
  consumer = pool.add(engine.url, 'node-consumer');
});

after(async () => {
  await pool.shutdownAll();
  if (engine) {
    await engine.stop();
    engine.cleanup();
  }
});

test('TriggerAction.Enqueue answers a receipt and the function runs every message in order', T, diagnose(ctx, async () => {
  const seen = [];
  const all = deferred();
  consumer.registerFunction('orders::process', async (data) => {
    seen.push(data);
    if (seen.length === 20) all.resolve();
    return { ok: true };
  });
  await barrier(consumer, producer);
  const receipts = await Promise.all(Array.from({ length: 20 }, (_, i) => producer.trigger({
    function_id: 'orders::process',
    payload: { orderId: i },
    action: TriggerAction.Enqueue({ queue: 'orders' }),
  })));
  for (const r of receipts) assert.match(r.messageReceiptId, UUID);
  assert.equal(new Set(receipts.map((r) => r.messageReceiptId)).size, 20);
  await withTimeout(all.promise, 10000, 'all 20 deliveries');
  assert.deepEqual(seen, Array.from({ length: 20 }, (_, i) => ({ orderId: i })));
}));

test('a handler that throws is retried until it succeeds', T, diagnose(ctx, async () => {
  let calls = 0;
  const done = deferred();
  consumer.registerFunction('jobs::flaky', async (data) => {
    calls += 1;
    if (calls < 3) throw new Error(`attempt ${calls} fails`);
    done.resolve(data);
    return 'ok';
  });
  await barrier(consumer, producer);
  await producer.trigger({ function_id: 'jobs::flaky', payload: { n: 1 }, action: TriggerAction.Enqueue({ queue: 'flaky' }) });
  assert.deepEqual(await withTimeout(done.promise, 10000, 'the third attempt'), { n: 1 });
  assert.equal(calls, 3);
}));

test('a message that always fails is dead-lettered, then redriven by id', T, diagnose(ctx, async () => {
  let healthy = false;
  const redriven = deferred();
  consumer.registerFunction('jobs::doomed', async (data) => {
    if (!healthy) throw new Error('still broken');
    redriven.resolve(data);
    return null;
  });
  await barrier(consumer, producer);
  const { messageReceiptId } = await producer.trigger({
    function_id: 'jobs::doomed', payload: { x: 42 }, action: TriggerAction.Enqueue({ queue: 'doomed' }),
  });
  const dead = await pollUntil(async () => {
    const list = await producer.trigger({ function_id: 'engine::queue::dlq_messages', payload: { topic: 'doomed' } });
    return list.length === 1 ? list : null;
  }, { what: 'the dead letter' });
  assert.equal(dead[0].id, messageReceiptId);
  assert.match(dead[0].error, /still broken/);
  healthy = true;
  const r = await producer.trigger({
    function_id: 'iii::queue::redrive_message', payload: { queue: 'doomed', message_id: messageReceiptId },
  });
  assert.deepEqual(r, { queue: 'doomed', message_id: messageReceiptId, redriven: 1 });
  assert.deepEqual(await withTimeout(redriven.promise, 10000, 'the redriven delivery'), { x: 42 });
}));
