// Minimal raw WebSocket client for protocol-level checks (uses `ws`, like the SDK).
import { randomUUID } from 'node:crypto';
import WebSocket from 'ws';

export class RawClient {
  constructor(url, label = 'raw') {
    this.url = url;
    this.label = label;
    this.frames = []; // parsed JSON frames received, in order
    this.frameLog = []; // textual log of both directions
    this.waiters = [];
    this.t0 = Date.now();
  }

  log(dir, text) {
    const clipped = text.length > 400 ? `${text.slice(0, 400)}…(${text.length} chars)` : text;
    this.frameLog.push(`${String(Date.now() - this.t0).padStart(6)}ms ${dir} ${clipped}`);
    if (this.frameLog.length > 300) this.frameLog.shift();
  }

  async connect(timeoutMs = 5000) {
    this.ws = new WebSocket(this.url, { handshakeTimeout: timeoutMs });
    this.ws.on('message', (data, isBinary) => {
      const text = data.toString('utf8');
      this.log(isBinary ? 'E→W(bin)' : 'E→W', text);
      let msg;
      try { msg = JSON.parse(text); } catch { msg = { __unparsed: text }; }
      msg.__binary = isBinary;
      this.frames.push(msg);
      for (const w of [...this.waiters]) {
        if (w.pred(msg)) {
          this.waiters.splice(this.waiters.indexOf(w), 1);
          clearTimeout(w.timer);
          w.resolve(msg);
        }
      }
    });
    this.closed = new Promise((resolve) => this.ws.once('close', (code) => resolve(code)));
    await new Promise((resolve, reject) => {
      this.ws.once('open', resolve);
      this.ws.once('error', reject);
    });
    this.ws.on('error', () => {});
    return this;
  }

  send(obj) {
    const text = JSON.stringify(obj);
    this.log('W→E', text);
    this.ws.send(text);
  }

  /** Resolve with the first frame (already received or future) matching `pred`. */
  waitFor(pred, timeoutMs = 5000, what = 'frame') {
    const existing = this.frames.find(pred);
    if (existing) return Promise.resolve(existing);
    return new Promise((resolve, reject) => {
      const w = { pred, resolve };
      w.timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new Error(`${this.label}: timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      this.waiters.push(w);
    });
  }

  /** Send the metadata call the SDKs send on connect, so registrations are not buffered. */
  announce(name) {
    this.send({
      type: 'invokefunction',
      function_id: 'engine::workers::register',
      data: { runtime: 'node', name, pid: process.pid, version: 'raw-test' },
      action: { type: 'void' },
    });
  }

  /** Sync call; resolves with the matching invocationresult frame. */
  call(functionId, data, timeoutMs = 5000) {
    const id = randomUUID();
    this.send({ type: 'invokefunction', invocation_id: id, function_id: functionId, data });
    return this.waitFor(
      (m) => m.type === 'invocationresult' && m.invocation_id === id,
      timeoutMs,
      `invocationresult for ${functionId} (${id})`,
    );
  }

  close() {
    try { this.ws?.close(); } catch { /* ignore */ }
  }
}
