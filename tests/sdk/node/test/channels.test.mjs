// Channels between SDK workers (spec §2.3, §7): refs travel inside invocation payloads, the
// SDK turns them into live readers and writers, and 100 MiB of binary data with interleaved
// text messages crosses intact (SHA-256 compared) in both directions.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { createChannel } from 'iii-sdk/helpers';
import { startEngine, diagnose } from '../lib/engine.mjs';
import { WorkerPool, barrier, withTimeout } from '../lib/workers.mjs';

const MIB = 1024 * 1024;
const TOTAL_MIB = Number(process.env.RINGCAST_CHANNEL_TEST_MIB ?? 100);
const TEXT_EVERY_MIB = 5;
const T = { timeout: 120000 };
const CALL = { timeoutMs: 110000 };

let engine;
const pool = new WorkerPool();
let A;
let B;
const ctx = () => ({ engines: [engine], workers: [A, B] });

/** A write of `chunk` to a Node Writable that resolves once the SDK has sent it. */
function write(stream, chunk) {
  return new Promise((resolve, reject) => stream.write(chunk, (err) => (err ? reject(err) : resolve())));
}

/**
 * Writes TOTAL_MIB of random bytes (1 MiB writes; the SDK cuts them into 64 KiB frames) with a
 * text message after every TEXT_EVERY_MIB, then ends the stream. Returns what it sent.
 */
async function produce(writer) {
  const hash = createHash('sha256');
  const texts = [];
  for (let i = 1; i <= TOTAL_MIB; i += 1) {
    const chunk = randomBytes(MIB);
    hash.update(chunk);
    await write(writer.stream, chunk);
    if (i % TEXT_EVERY_MIB === 0) {
      const text = JSON.stringify({ type: 'progress', mib: i, note: 'déjà ✓' });
      texts.push(text);
      writer.sendMessage(text);
    }
  }
  await new Promise((resolve) => writer.stream.end(resolve));
  return { sha256: hash.digest('hex'), length: TOTAL_MIB * MIB, texts };
}

/** Reads a channel to its end: the bytes' length and SHA-256, and the text messages in order. */
async function consume(reader) {
  const texts = [];
  reader.onMessage((m) => texts.push(m));
  const hash = createHash('sha256');
  let length = 0;
  for await (const chunk of reader.stream) {
    hash.update(chunk);
    length += chunk.length;
  }
  return { sha256: hash.digest('hex'), length, texts };
}

before(async () => {
  engine = await startEngine();
  A = pool.add(engine.url, 'node-chan-a');
  B = pool.add(engine.url, 'node-chan-b');
  // B reads a channel whose read ref came in the payload.
  B.registerFunction('chan::consume', async (data) => consume(data.input));
  // B writes into a channel whose write ref came in the payload.
  B.registerFunction('chan::produce', async (data) => produce(data.output));
  // B reads everything with readAll.
  B.registerFunction('chan::read_all', async (data) => {
    const all = await data.input.readAll();
    return { sha256: createHash('sha256').update(all).digest('hex'), length: all.length };
  });
  await barrier(B, A);
});

after(async () => {
  await pool.shutdownAll();
  if (engine) {
    await engine.stop();
    engine.cleanup();
  }
});

test('the refs are StreamChannelRefs with one id and key for both ends', T, diagnose(ctx, async () => {
  const channel = await createChannel(A, 8);
  for (const [ref, direction] of [[channel.writerRef, 'write'], [channel.readerRef, 'read']]) {
    assert.deepEqual(Object.keys(ref).sort(), ['access_key', 'channel_id', 'direction']);
    assert.equal(ref.direction, direction);
  }
  assert.equal(channel.writerRef.channel_id, channel.readerRef.channel_id);
  assert.equal(channel.writerRef.access_key, channel.readerRef.access_key);
}));

test(`A writes ${TOTAL_MIB} MiB and text messages into a channel B reads (read ref in the payload)`, T, diagnose(ctx, async () => {
  const channel = await createChannel(A);
  const reading = B.trigger({ function_id: 'chan::consume', payload: { input: channel.readerRef }, ...CALL });
  const sent = await produce(channel.writer);
  const got = await withTimeout(reading, CALL.timeoutMs, 'B to read the channel');
  assert.equal(got.length, sent.length);
  assert.equal(got.sha256, sent.sha256, 'the bytes B read are the bytes A wrote');
  assert.deepEqual(got.texts, sent.texts, 'every text message, in order');
}));

test(`B writes ${TOTAL_MIB} MiB and text messages into a channel A reads (write ref in the payload)`, T, diagnose(ctx, async () => {
  const channel = await createChannel(A);
  const reading = consume(channel.reader);
  const sent = await B.trigger({ function_id: 'chan::produce', payload: { output: channel.writerRef }, ...CALL });
  const got = await withTimeout(reading, CALL.timeoutMs, 'A to read the channel');
  assert.equal(got.length, sent.length);
  assert.equal(got.sha256, sent.sha256, 'the bytes A read are the bytes B wrote');
  assert.deepEqual(got.texts, sent.texts, 'every text message, in order');
}));

test('readAll gets everything a writer sent before it ended', T, diagnose(ctx, async () => {
  const channel = await createChannel(A);
  const reading = B.trigger({ function_id: 'chan::read_all', payload: { input: channel.readerRef }, ...CALL });
  const hash = createHash('sha256');
  let length = 0;
  for (let i = 0; i < 40; i += 1) {
    const chunk = randomBytes(100000 + i * 777);
    hash.update(chunk);
    length += chunk.length;
    await write(channel.writer.stream, chunk);
  }
  channel.writer.stream.end();
  const got = await withTimeout(reading, CALL.timeoutMs, 'readAll');
  assert.deepEqual(got, { sha256: hash.digest('hex'), length });
}));
