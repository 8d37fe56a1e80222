// Worker telemetry (spec §10.1): an SDK worker with OpenTelemetry on (the SDK default) logs
// through its Logger; the records travel as `LOGS` frames on its /otel socket and the engine
// logs them under target `worker` with the level, the worker's name and the message.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { fork } from 'node:child_process';
import path from 'node:path';
import { startEngine, diagnose, SUITE_DIR } from '../lib/engine.mjs';
import { WorkerPool, barrier, waitCallable, uniqueName, pollUntil } from '../lib/workers.mjs';

// This file's engine shows worker lines down to debug (the default filter is info).
process.env.RUST_LOG = 'info,worker=debug';

let engine;
const pool = new WorkerPool();
let caller;
let child;
const childDiag = () => (child ? [{ label: `telemetry worker pid ${child.pid} output`, frameLog: child.output.split('\n') }] : []);

before(async () => {
  engine = await startEngine();
  caller = pool.add(engine.url, 'node-telemetry-caller');
  await barrier(caller, caller);
});

after(async () => {
  if (child && child.exitCode === null) {
    child.send({ type: 'shutdown' });
    await Promise.race([child.exited, new Promise((r) => setTimeout(r, 3000))]);
    child.kill('SIGKILL');
  }
  await pool.shutdownAll();
  if (engine) {
    await engine.stop();
    engine.cleanup();
  }
});

function forkTelemetryWorker(url, name, functionId) {
  // The suite runs with OTEL_ENABLED=false; this worker gets the SDK default (on).
  const env = { ...process.env };
  delete env.OTEL_ENABLED;
  delete env.OTEL_SERVICE_NAME;
  delete env.RUST_LOG;
  const c = fork(path.join(SUITE_DIR, 'fixtures', 'telemetry-worker.mjs'), [url, name, functionId], {
    stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
    env,
  });
  c.output = '';
  c.stdout.on('data', (d) => { c.output += d; });
  c.stderr.on('data', (d) => { c.output += d; });
  c.exited = new Promise((resolve) => c.once('exit', (code, signal) => resolve({ code, signal })));
  return c;
}

/** The engine log line of target `worker` at `level` that contains `text`. */
function workerLine(level, text) {
  return engine.log.split('\n').find((l) => l.includes(` ${level} worker: `) && l.includes(text));
}

test('Logger lines of a worker with telemetry on appear in the engine log with level and worker name', { timeout: 30000 },
  diagnose(() => ({ engines: [engine], workers: [caller], raws: childDiag() }), async () => {
    const name = uniqueName('node-telemetry-worker');
    const functionId = `telemetry::log::${name}`;
    child = forkTelemetryWorker(engine.url, name, functionId);
    const tag = `tag-${process.pid}`;
    const result = await waitCallable(caller, functionId, { payload: { tag } });
    assert.deepEqual(result, { logged: tag });

    const lines = {};
    for (const level of ['DEBUG', 'INFO', 'WARN', 'ERROR']) {
      const text = `${level.toLowerCase()} line ${tag}`;
      lines[level] = await pollUntil(() => workerLine(level, text), { what: `the engine's ${level} line "${text}"` });
      // The worker's registered name, not the SDK's default OTel service name (iii-node).
      assert.match(lines[level], new RegExp(`worker=${name}( |$)`), lines[level]);
    }
    assert.match(lines.INFO, /data=\{"orderId":"ord_123","status":"completed"\}/);
    assert.match(lines.ERROR, /data=\{"errorCode":"card_declined"\}/);
    // Logged inside the call's span: one trace id on all four lines.
    const traceIds = new Set(Object.values(lines).map((l) => l.match(/trace_id=([0-9a-f]{32})( |$)/)?.[1]));
    assert.equal(traceIds.size, 1, `one trace id: ${[...traceIds]}`);
    assert.ok([...traceIds][0], 'a trace id is shown');
    // The line logged at start-up, outside any call, is there too, without a trace id. It may
    // reach the engine before the worker's registration does: then it carries the SDK's OTel
    // service name.
    const startup = await pollUntil(() => workerLine('INFO', `worker ${name} starting`), { what: 'the start-up line' });
    assert.match(startup, new RegExp(`worker=(${name}|iii-node)( |$)`), startup);
    assert.doesNotMatch(startup, /trace_id=/);

    // Every frame the SDK sent (logs, spans) decoded.
    assert.ok(!engine.log.includes('malformed worker telemetry frame'), 'no malformed telemetry frame from the SDK');
  }));
