// Raw subscriber client for the iii-stream WebSocket (spec stream.md §1), using `ws`.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import WebSocket from 'ws';

/**
 * One subscriber connection. Records every received frame in order (`frames`, parsed JSON)
 * and a textual log (`frameLog`, used by `diagnose`). `waitFor` is event-driven.
 */
export class StreamClient {
  constructor(url, { label = 'subscriber', protocols } = {}) {
    this.url = url;
    this.label = label;
    this.protocols = protocols;
    this.frames = [];
    this.binaryFrames = 0;
    this.frameLog = [];
    this.waiters = [];
    this.t0 = Date.now();
    this.closeInfo = null;
  }

  log(dir, text) {
    const clipped = text.length > 400 ? `${text.slice(0, 400)}…(${text.length} chars)` : text;
    this.frameLog.push(`${String(Date.now() - this.t0).padStart(6)}ms ${dir} ${clipped}`);
    if (this.frameLog.length > 300) this.frameLog.shift();
  }

  /** Open the socket; resolves with this once the upgrade succeeded. */
  async connect(timeoutMs = 5000) {
    this.ws = this.protocols
      ? new WebSocket(this.url, this.protocols, { handshakeTimeout: timeoutMs })
      : new WebSocket(this.url, { handshakeTimeout: timeoutMs });
    this.ws.on('message', (data, isBinary) => {
      const text = data.toString('utf8');
      this.log(isBinary ? 'S→C(bin)' : 'S→C', text);
      if (isBinary) this.binaryFrames += 1;
      let msg;
      try { msg = JSON.parse(text); } catch { msg = { __unparsed: text }; }
      this.frames.push(msg);
      for (const w of [...this.waiters]) {
        if (w.pred(msg)) {
          this.waiters.splice(this.waiters.indexOf(w), 1);
          clearTimeout(w.timer);
          w.resolve(msg);
        }
      }
    });
    this.closed = new Promise((resolve) => this.ws.once('close', (code, reason) => {
      this.closeInfo = { code, reason: reason.toString() };
      this.log('close', `${code} ${reason}`);
      resolve(this.closeInfo);
    }));
    await new Promise((resolve, reject) => {
      this.ws.once('open', resolve);
      this.ws.once('error', reject);
    });
    this.ws.on('error', () => {});
    return this;
  }

  get open() { return this.ws?.readyState === WebSocket.OPEN; }

  send(obj) {
    const text = JSON.stringify(obj);
    this.log('C→S', text);
    this.ws.send(text);
  }

  /** Send a join; returns the subscriptionId. `id` = item id (omitted for a group join). */
  join(streamName, groupId, id, subscriptionId = randomUUID()) {
    const data = { subscriptionId, streamName, groupId };
    if (id !== undefined) data.id = id;
    this.send({ type: 'join', data });
    return subscriptionId;
  }

  leave(subscriptionId, streamName, groupId) {
    this.send({ type: 'leave', data: { subscriptionId, streamName, groupId } });
  }

  /** Resolve with the first frame (already received or future) matching `pred`. */
  waitFor(pred, timeoutMs = 5000, what = 'frame') {
    const existing = this.frames.find(pred);
    if (existing) return Promise.resolve(existing);
    return new Promise((resolve, reject) => {
      const w = { pred, resolve };
      w.timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new Error(`${this.label}: timed out after ${timeoutMs} ms waiting for ${what}; ` +
          `frames so far: ${JSON.stringify(this.frames).slice(-1500)}`));
      }, timeoutMs);
      this.waiters.push(w);
    });
  }

  /** Wait for the sync frame of (stream, group[, id]). */
  waitSync(streamName, groupId, id = null, timeoutMs = 5000) {
    return this.waitFor(
      (f) => f.event?.type === 'sync' && f.streamName === streamName && f.groupId === groupId && f.id === id,
      timeoutMs,
      `sync frame for ${streamName}/${groupId}/${id}`,
    );
  }

  close() {
    try { this.ws?.close(); } catch { /* ignore */ }
  }

  terminate() {
    try { this.ws?.terminate(); } catch { /* ignore */ }
  }
}

/**
 * Try an upgrade that is expected to be refused; resolves with the HTTP status code of the
 * refusal, or rejects if the upgrade succeeds.
 */
export function upgradeStatus(url, { protocols, timeoutMs = 5000 } = {}) {
  return new Promise((resolve, reject) => {
    const ws = protocols ? new WebSocket(url, protocols, { handshakeTimeout: timeoutMs })
      : new WebSocket(url, { handshakeTimeout: timeoutMs });
    ws.once('unexpected-response', (req, res) => {
      resolve(res.statusCode);
      req.destroy();
    });
    ws.once('open', () => {
      ws.terminate();
      reject(new Error(`upgrade to ${url} succeeded (expected an HTTP refusal)`));
    });
    ws.once('error', (err) => reject(err));
  });
}

/**
 * Assert that `frame` is exactly a stream frame (§1.5): keys {type, timestamp, streamName,
 * groupId, id, event}, type "stream", timestamp an integer epoch-ms taken at or after
 * `notBefore` (minus 1 s slack for clocks) and not in the future; and the rest deep-equal.
 */
export function assertFrame(frame, expected, { notBefore, what = 'frame' } = {}) {
  assert.ok(frame && typeof frame === 'object', `${what}: not an object: ${JSON.stringify(frame)}`);
  assert.deepEqual(
    Object.keys(frame).sort(),
    ['event', 'groupId', 'id', 'streamName', 'timestamp', 'type'],
    `${what}: keys of ${JSON.stringify(frame)}`,
  );
  assert.ok(Number.isInteger(frame.timestamp), `${what}: timestamp not an integer: ${frame.timestamp}`);
  const now = Date.now();
  const lo = (notBefore ?? now - 60000) - 1000;
  assert.ok(
    frame.timestamp >= lo && frame.timestamp <= now + 1000,
    `${what}: timestamp ${frame.timestamp} is not epoch milliseconds in [${lo}, ${now + 1000}]`,
  );
  const { timestamp, ...rest } = frame;
  assert.deepEqual(rest, { type: 'stream', ...expected }, `${what}: ${JSON.stringify(frame)}`);
}
