// The `eventsource` package against GET /api/events?token=…: it reconnects by itself when the
// connection drops, and resumes with Last-Event-ID with no event lost and none repeated.
// Run by tests/test_js_clients.py with GATEWAYD_URL and GATEWAYD_TOKEN (a chat-scope token).
//
// The drop is made by a TCP proxy between the client and the gateway: destroying its sockets
// is, for the client, exactly a server that went away (the gateway itself keeps running, so
// the events published meanwhile are still in its replay buffer).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { EventSource } from 'eventsource';

const url = process.env.GATEWAYD_URL;
const token = process.env.GATEWAYD_TOKEN;
const skip = !url || !token ? 'GATEWAYD_URL and GATEWAYD_TOKEN are not set' : false;

function proxy(target) {
  const { hostname, port } = new URL(target);
  const sockets = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      s.on('error', () => {});
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => {
      resolve({
        url: `http://127.0.0.1:${server.address().port}`,
        drop: () => {
          for (const s of sockets) s.destroy();
        },
        close: () =>
          new Promise((res) => {
            for (const s of sockets) s.destroy();
            server.close(() => res());
          }),
      });
    });
  });
}

async function chat(message) {
  const resp = await fetch(`${url}/api/chat`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ message }),
  });
  assert.equal(resp.status, 200);
  return resp.json();
}

function waitFor(predicate, what, timeoutMs = 15_000) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const tick = () => {
      if (predicate()) return resolve();
      if (Date.now() - started > timeoutMs) return reject(new Error(`timed out: ${what}`));
      setTimeout(tick, 20);
    };
    tick();
  });
}

test('EventSource reconnects by itself and resumes by Last-Event-ID', { skip }, async () => {
  const p = await proxy(url);
  const seen = []; // {id, type, run_id}
  let opens = 0;
  let resets = 0;
  const es = new EventSource(
    `${p.url}/api/events?types=run_started,run_complete&token=${encodeURIComponent(token)}`,
  );
  try {
    es.addEventListener('open', () => {
      opens += 1;
    });
    for (const type of ['run_started', 'run_complete']) {
      es.addEventListener(type, (e) => {
        const data = JSON.parse(e.data);
        assert.equal(String(data.id), e.lastEventId);
        seen.push({ id: data.id, type, run_id: data.run_id });
      });
    }
    es.addEventListener('reset', () => {
      resets += 1;
    });
    await waitFor(() => opens === 1, 'the first connection');

    const runs = [];
    runs.push((await chat('before the drop')).run_id);
    await waitFor(() => seen.length === 2, 'the first run');

    p.drop(); // the connection goes away under the client
    runs.push((await chat('while away one')).run_id);
    runs.push((await chat('while away two')).run_id);
    await waitFor(() => opens === 2, 'the reconnect');
    await waitFor(() => seen.length === 6, 'the missed events, replayed');
    runs.push((await chat('after the reconnect')).run_id);
    await waitFor(() => seen.length === 8, 'live events after the reconnect');

    assert.equal(resets, 0);
    const ids = seen.map((e) => e.id);
    assert.deepEqual(
      ids,
      [...ids].sort((a, b) => a - b),
    );
    assert.equal(new Set(ids).size, ids.length, 'no event twice');
    for (const runId of runs) {
      const kinds = seen.filter((e) => e.run_id === runId).map((e) => e.type);
      assert.deepEqual(kinds, ['run_started', 'run_complete'], `run ${runId}`);
    }
  } finally {
    es.close();
    await p.close();
  }
});
