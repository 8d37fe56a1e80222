// Helpers to run a ringcast engine process for the Node SDK compatibility tests.
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, rmSync, existsSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const SUITE_DIR = path.resolve(HERE, '..');

export function engineBinary() {
  const fromEnv = process.env.RINGCAST_BIN;
  const bin = fromEnv && fromEnv.length > 0
    ? path.resolve(SUITE_DIR, fromEnv)
    : path.resolve(SUITE_DIR, '../../../target/release/ringcast');
  return bin;
}

/** Bind port 0 on 127.0.0.1, read the assigned port, close. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close((err) => (err ? reject(err) : resolve(port)));
    });
  });
}

function tcpProbe(port) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    const done = (ok) => {
      sock.removeAllListeners();
      sock.destroy();
      resolve(ok);
    };
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
    sock.setTimeout(1000, () => done(false));
  });
}

/**
 * True if 127.0.0.1:port can be bound right now (node sets SO_REUSEADDR, so only a socket
 * still in LISTEN state makes this fail, not TIME_WAIT leftovers).
 */
export function portBindable(port) {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once('error', () => resolve(false));
    srv.listen({ port, host: '127.0.0.1', exclusive: true }, () => srv.close(() => resolve(true)));
  });
}

/** Poll until the port can be bound again; resolves with the wait in ms. */
export async function waitPortFree(port, timeoutMs = 5000) {
  const t0 = Date.now();
  while (!(await portBindable(port))) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`port ${port} still in use ${timeoutMs} ms after the engine exited`);
    await new Promise((r) => setTimeout(r, 5));
  }
  return Date.now() - t0;
}

const live = new Set();
process.on('exit', () => {
  for (const child of live) {
    try { child.kill('SIGKILL'); } catch { /* already gone */ }
  }
});

const LOG_CAP = 4 * 1024 * 1024;

class EngineProcess {
  constructor({ port, streamPort, dir, child, configPath }) {
    this.port = port;
    this.streamPort = streamPort;
    this.dir = dir;
    this.child = child;
    this.configPath = configPath;
    this.url = `ws://127.0.0.1:${port}`;
    this.streamUrl = `ws://127.0.0.1:${streamPort}`; // subscriber WebSocket (iii-stream)
    this.log = '';
    this.exitInfo = null;
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        live.delete(child);
        this.exitInfo = { code, signal };
        resolve(this.exitInfo);
      });
    });
    const append = (chunk) => {
      this.log += chunk.toString('utf8');
      if (this.log.length > LOG_CAP) this.log = this.log.slice(this.log.length - LOG_CAP);
    };
    child.stdout.on('data', append);
    child.stderr.on('data', append);
  }

  get pid() { return this.child.pid; }

  logTail(chars = 6000) {
    const t = this.log.length > chars ? `…${this.log.slice(this.log.length - chars)}` : this.log;
    return t.length ? t : '(engine wrote nothing to stdout/stderr)';
  }

  /**
   * SIGTERM, then wait for exit. If it has not exited after `graceMs`, SIGKILL.
   * Returns { code, signal, forced }.
   */
  async stop({ graceMs = 5000 } = {}) {
    if (this.exitInfo) return { ...this.exitInfo, forced: false };
    this.child.kill('SIGTERM');
    let timer;
    const timedOut = new Promise((resolve) => { timer = setTimeout(() => resolve(null), graceMs); });
    const res = await Promise.race([this.exited, timedOut]);
    clearTimeout(timer);
    if (res) return { ...res, forced: false };
    this.child.kill('SIGKILL');
    const info = await this.exited;
    return { ...info, forced: true };
  }

  cleanup() {
    try { rmSync(this.dir, { recursive: true, force: true }); } catch { /* ignore */ }
  }
}

/**
 * Start an engine. `port`/`streamPort` may be given (e.g. to restart on the same port),
 * otherwise free ports are picked. `shards` is passed as `--shards` (default 1).
 * `streamConfig` adds keys to the `iii-stream` config block (values written as JSON, which
 * is valid YAML), e.g. `{ auth_function: 'auth::check', auth_required: true }`.
 * `extraWorkersYaml` is appended to the `workers:` list as it is (whole entries, indented by
 * two spaces), e.g. a second `iii-worker-manager` with an `rbac` block or an `iii-queue` block.
 * Resolves once TCP connects to the worker port and the stream (subscriber) port succeed.
 */
export async function startEngine({
  port, streamPort, shards = 1, streamConfig = {}, readyTimeoutMs = 10000, extraWorkersYaml = '',
} = {}) {
  const bin = engineBinary();
  if (!existsSync(bin)) {
    throw new Error(`ringcast binary not found at ${bin} (set RINGCAST_BIN)`);
  }
  const P = port ?? await freePort();
  const S = streamPort ?? await freePort();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ringcast-node-'));
  const configPath = path.join(dir, 'config.yaml');
  writeFileSync(configPath, [
    'workers:',
    '  - name: iii-worker-manager',
    '    config:',
    '      host: 127.0.0.1',
    `      port: ${P}`,
    '  - name: iii-stream',
    '    config:',
    '      host: 127.0.0.1',
    `      port: ${S}`,
    ...Object.entries(streamConfig).map(([k, v]) => `      ${k}: ${JSON.stringify(v)}`),
    extraWorkersYaml,
    '',
  ].join('\n'));

  const child = spawn(bin, ['--config', configPath, '--shards', String(shards)], {
    cwd: dir,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env },
  });
  live.add(child);
  const engine = new EngineProcess({ port: P, streamPort: S, dir, child, configPath });
  let spawnError = null;
  child.once('error', (err) => { spawnError = err; });

  const deadline = Date.now() + readyTimeoutMs;
  for (;;) {
    if (spawnError) {
      throw new Error(`failed to spawn ${bin}: ${spawnError.message}`);
    }
    if (engine.exitInfo) {
      throw new Error(
        `engine exited before listening (code=${engine.exitInfo.code} signal=${engine.exitInfo.signal})\n` +
        `--- engine output ---\n${engine.logTail()}`,
      );
    }
    if (await tcpProbe(P) && await tcpProbe(S)) return engine;
    if (Date.now() > deadline) {
      await engine.stop({ graceMs: 1000 });
      throw new Error(
        `engine did not accept TCP connections on 127.0.0.1:${P} and :${S} within ${readyTimeoutMs} ms\n` +
        `--- engine output ---\n${engine.logTail()}`,
      );
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Wrap a test body so that on failure the engine output tail and the recorded frames of
 * the involved workers / raw clients are appended to the error message.
 * `getCtx` returns { engines?: EngineProcess[], workers?: sdk workers, raws?: RawClient[] }.
 */
export function diagnose(getCtx, fn) {
  return async (t) => {
    try {
      await fn(t);
    } catch (err) {
      let report = '';
      try {
        const ctx = getCtx() ?? {};
        for (const e of [].concat(ctx.engines ?? []).filter(Boolean)) {
          report += `\n--- engine pid ${e.pid} (port ${e.port}) output tail ---\n${e.logTail()}`;
        }
        for (const w of [].concat(ctx.workers ?? []).filter(Boolean)) {
          const frames = w.__frames ?? [];
          report += `\n--- frames of SDK worker ${w.__name} (worker_id ${w.workerId ?? '?'}), last ${Math.min(frames.length, 40)} ---\n`;
          report += frames.slice(-40).join('\n');
        }
        for (const r of [].concat(ctx.raws ?? []).filter(Boolean)) {
          report += `\n--- frames of raw client ${r.label}, last 40 ---\n${r.frameLog.slice(-40).join('\n')}`;
        }
      } catch (e) {
        report += `\n(diagnostics failed: ${e.message})`;
      }
      if (report && err && typeof err === 'object') {
        try {
          const stack = typeof err.stack === 'string' ? err.stack : null;
          err.message = `${err.message}${report}`;
          // util.inspect (used by the test reporter) prints .stack, which was captured
          // with the old message.
          if (stack !== null) err.stack = `${stack}${report}`;
        } catch {
          process.stderr.write(`${report}\n`);
        }
      }
      throw err;
    }
  };
}
