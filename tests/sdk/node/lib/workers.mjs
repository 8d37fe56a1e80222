// Worker-side helpers around the published `iii-sdk` 0.22.1 API.
import { registerWorker } from 'iii-sdk';

// The SDK prints "[iii] Worker registered with ID" etc. through console.debug; keep the
// test output readable unless asked otherwise.
if (!process.env.RINGCAST_TEST_VERBOSE) {
  console.debug = () => {};
}

let seq = 0;

/** Unique-ish name per worker in this process. */
export function uniqueName(prefix) {
  seq += 1;
  return `${prefix}-${process.pid}-${seq}`;
}

/**
 * Create a connected SDK worker. OTel and metrics are switched off so that each test
 * exercises only the worker protocol socket.
 */
export function makeWorker(url, name, options = {}) {
  const w = registerWorker(url, {
    workerName: name,
    otel: { enabled: false },
    enableMetricsReporting: false,
    ...options,
  });
  w.__name = name;
  tap(w);
  return w;
}

const FRAME_CAP = 300;
const FRAME_CHARS = 400;

function clip(s) {
  return s.length > FRAME_CHARS ? `${s.slice(0, FRAME_CHARS)}…(${s.length} chars)` : s;
}

/**
 * Record the JSON frames a worker sends/receives (last FRAME_CAP, clipped) so a failing
 * test can show what went over the wire. Relies on the 0.22.1 SDK binding
 * `this.onMessage` when the socket opens, which happens asynchronously after construction.
 */
function tap(w) {
  const frames = [];
  const t0 = Date.now();
  const push = (dir, data) => {
    frames.push(`${String(Date.now() - t0).padStart(6)}ms ${dir} ${clip(typeof data === 'string' ? data : data.toString('utf8'))}`);
    if (frames.length > FRAME_CAP) frames.shift();
  };
  w.__frames = frames;
  if (typeof w.sendMessageRaw === 'function') {
    const origSend = w.sendMessageRaw.bind(w);
    w.sendMessageRaw = (data) => { push('W→E', data); return origSend(data); };
  }
  if (typeof w.onMessage === 'function') {
    const origOnMessage = w.onMessage.bind(w);
    w.onMessage = (data) => { push('E→W', data); return origOnMessage(data); };
  }
}

export class WorkerPool {
  constructor() { this.workers = []; }

  add(url, prefix, options) {
    const name = uniqueName(prefix);
    const w = makeWorker(url, name, options);
    this.workers.push(w);
    return w;
  }

  async shutdownAll() {
    const ws = this.workers.splice(0);
    await Promise.allSettled(ws.map((w) => w.shutdown()));
  }
}

export function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  return { promise, resolve, reject };
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** Reject with a descriptive error if `promise` does not settle within `ms`. */
export async function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Poll `check` (async, returns truthy when done) every `intervalMs` until `timeoutMs`. */
export async function pollUntil(check, { timeoutMs = 10000, intervalMs = 50, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let lastErr;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
    } catch (err) {
      lastErr = err;
    }
    if (Date.now() > deadline) {
      const suffix = lastErr ? ` (last error: ${lastErr.message ?? lastErr})` : '';
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${suffix}`);
    }
    await sleep(intervalMs);
  }
}

/**
 * Wait until `caller` can invoke `functionId` through the engine (i.e. the owner's
 * registration has been applied). Returns the first successful result.
 */
export async function waitCallable(caller, functionId, { payload = {}, timeoutMs = 10000 } = {}) {
  let result;
  await pollUntil(async () => {
    result = await caller.trigger({ function_id: functionId, payload, timeoutMs: 2000 });
    return true;
  }, { timeoutMs, what: `function ${functionId} to become callable` });
  return result;
}

/**
 * Register a trivial `ready::<name>` function on `worker`. Because the engine applies a
 * connection's frames in order, once it is callable every registration the worker sent
 * before it has been applied too.
 */
let readySeq = 0;
export async function barrier(worker, prober = worker, timeoutMs = 10000) {
  readySeq += 1;
  const id = `ready::${worker.__name ?? 'w'}::${readySeq}`;
  worker.registerFunction(id, async () => 'ready');
  const r = await waitCallable(prober, id, { timeoutMs });
  if (r !== 'ready') throw new Error(`barrier ${id} returned ${JSON.stringify(r)}`);
  return id;
}

/** Await a rejection and return the error (fails if the promise resolves). */
export async function rejectionOf(promise) {
  try {
    const v = await promise;
    const err = new Error(`expected rejection, got resolution with ${JSON.stringify(v)?.slice(0, 200)}`);
    err.resolvedValue = v;
    throw err;
  } catch (err) {
    if (err && Object.prototype.hasOwnProperty.call(err, 'resolvedValue')) throw err;
    return err;
  }
}
