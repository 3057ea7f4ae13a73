// The `ws` package (what Node clients use) against a running gatewayd: typed frames and JSON-RPC.
// Run by tests/test_js_clients.py with GATEWAYD_URL and GATEWAYD_TOKEN (a chat-scope token).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';

const url = process.env.GATEWAYD_URL;
const token = process.env.GATEWAYD_TOKEN;
const skip = !url || !token ? 'GATEWAYD_URL and GATEWAYD_TOKEN are not set' : false;
const wsUrl = url ? url.replace(/^http/, 'ws') : '';
const TIMEOUT_MS = 10_000;

/** Open a socket; resolves with {ws, next(), until(pred)} once open. */
function open(path, protocols, options = {}) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${wsUrl}${path}`, protocols, options);
    const inbox = [];
    const waiters = [];
    ws.on('message', (data) => {
      const msg = JSON.parse(data.toString('utf8'));
      const w = waiters.shift();
      if (w) w(msg);
      else inbox.push(msg);
    });
    const next = () =>
      new Promise((res, rej) => {
        if (inbox.length) return res(inbox.shift());
        const timer = setTimeout(() => rej(new Error('no message in time')), TIMEOUT_MS);
        waiters.push((m) => {
          clearTimeout(timer);
          res(m);
        });
      });
    const until = async (pred) => {
      const before = [];
      for (;;) {
        const m = await next();
        if (pred(m)) return { before, found: m };
        before.push(m);
      }
    };
    const send = (obj) => ws.send(JSON.stringify(obj));
    const close = () =>
      new Promise((res) => {
        if (ws.readyState === WebSocket.CLOSED) return res();
        ws.once('close', () => res());
        ws.close(1000);
      });
    ws.once('open', () => resolve({ ws, next, until, send, close }));
    ws.once('error', reject);
    ws.once('unexpected-response', (req, res) => {
      req.destroy(); // else the refused request's socket lingers and keeps node alive
      reject(new Error(`HTTP ${res.statusCode}`));
    });
  });
}

test('typed frames: chat streams deltas, then run_complete; history; ping', { skip }, async () => {
  const c = await open('/ws', ['gatewayd.v1'], { headers: { Authorization: `Bearer ${token}` } });
  try {
    assert.equal(c.ws.protocol, 'gatewayd.v1');
    c.send({ type: 'chat', message: 'hello from node ws', id: 'n1' });
    const { before, found } = await c.until((m) => m.type === 'run_complete');
    assert.deepEqual(
      before.map((m) => m.type),
      ['delta', 'delta', 'delta', 'delta'],
    );
    assert.equal(before.map((m) => m.content).join(''), 'hello from node ws');
    assert.equal(found.response, 'hello from node ws');
    assert.equal(found.ref, 'n1');
    assert.deepEqual(found.tokens, { input: 4, output: 4 });
    c.send({ type: 'history', session_id: found.session_id });
    const hist = await c.next();
    assert.equal(hist.type, 'history');
    assert.deepEqual(
      hist.messages.map((m) => m.role),
      ['user', 'assistant'],
    );
    c.send({ type: 'nonsense' });
    assert.equal((await c.next()).code, 'invalid_request');
    c.send({ type: 'ping', id: 2 });
    assert.deepEqual(await c.next(), { type: 'pong', ref: 2 });
  } finally {
    await c.close();
  }
});

test('a browser-style bearer subprotocol selects gatewayd.v1', { skip }, async () => {
  const c = await open('/ws', ['gatewayd.v1', `bearer.${token}`]);
  try {
    assert.equal(c.ws.protocol, 'gatewayd.v1');
    c.send({ type: 'ping' });
    assert.equal((await c.next()).type, 'pong');
  } finally {
    await c.close();
  }
  await assert.rejects(open('/ws', ['gatewayd.v1']), /HTTP 401/);
});

test('JSON-RPC: chat.send notifications then the result; a batch', { skip }, async () => {
  const c = await open('/ws', ['gatewayd.jsonrpc'], {
    headers: { Authorization: `Bearer ${token}` },
  });
  try {
    assert.equal(c.ws.protocol, 'gatewayd.jsonrpc');
    c.send({ jsonrpc: '2.0', id: 'c1', method: 'chat.send', params: { message: 'rpc from node' } });
    const { before, found } = await c.until((m) => m.id === 'c1');
    assert.ok(before.every((m) => m.method === 'chat.event' && m.id === undefined));
    const kinds = before.map((m) => m.params.type);
    assert.equal(kinds[0], 'run_started');
    assert.equal(kinds.at(-1), 'run_complete');
    assert.equal(found.result.response, 'rpc from node');
    assert.deepEqual(found.result.tools_used, []);
    c.send([
      { jsonrpc: '2.0', id: 1, method: 'health' },
      { jsonrpc: '2.0', id: 2, method: 'sessions.list' },
      { jsonrpc: '2.0', method: 'health' },
      { jsonrpc: '2.0', id: 3, method: 'no.such' },
    ]);
    const replies = await c.next();
    assert.ok(Array.isArray(replies));
    const byId = Object.fromEntries(replies.map((r) => [r.id, r]));
    assert.deepEqual(Object.keys(byId).sort(), ['1', '2', '3']);
    assert.equal(byId[1].result.status, 'ok');
    assert.ok(byId[2].result.sessions.some((s) => s.id === found.result.session_id));
    assert.equal(byId[3].error.code, -32601);
  } finally {
    await c.close();
  }
});
