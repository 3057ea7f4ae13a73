// Autobahn|JS (what browser and Node WAMP clients use) against a running gatewayd at /wamp:
// WAMP-Ticket with a gatewayd token, calls, progressive results, events, and error mapping.
// Run by tests/test_js_clients.py with GATEWAYD_URL and GATEWAYD_TOKEN (a chat-scope token).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import autobahn from 'autobahn';

const url = process.env.GATEWAYD_URL;
const token = process.env.GATEWAYD_TOKEN;
const skip = !url || !token ? 'GATEWAYD_URL and GATEWAYD_TOKEN are not set' : false;
const TIMEOUT_MS = 10_000;

function within(promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer in time`)), TIMEOUT_MS);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Join realm "gatewayd" with `ticket`; resolves with {connection, session}, or rejects with
 * the reason the router gave. */
function join(ticket) {
  const connection = new autobahn.Connection({
    url: `${url.replace(/^http/, 'ws')}/wamp`,
    realm: 'gatewayd',
    authmethods: ['ticket'],
    authid: 'autobahn-js',
    onchallenge: (session, method) => {
      assert.equal(method, 'ticket');
      return ticket;
    },
    max_retries: 0,
  });
  return within(
    new Promise((resolve, reject) => {
      connection.onopen = (session) => resolve({ connection, session });
      connection.onclose = (reason, details) => {
        reject(new Error(`closed: ${reason} ${details && details.reason}`));
        return true; // no reconnect
      };
      connection.open();
    }),
    'join',
  );
}

function leave(connection) {
  return new Promise((resolve) => {
    connection.onclose = () => {
      resolve();
      return true;
    };
    connection.close();
  });
}

test('a wrong ticket is refused', { skip }, async () => {
  await assert.rejects(join('not-a-token-0123456789abcdef'), /closed/);
});

test('calls, progressive chat results, events and errors', { skip }, async () => {
  const { connection, session } = await join(token);
  try {
    const health = await within(session.call('gatewayd.health'), 'health');
    assert.equal(health.status, 'ok');

    const events = [];
    await within(
      session.subscribe('gatewayd.events', (args) => events.push(args[0])),
      'subscribe',
    );

    const progress = [];
    const result = await within(
      session.call('gatewayd.chat.send', [], { message: 'hello from autobahn js' }, {
        receive_progress: true,
      }).then(null, null, (p) => progress.push(p)), // one positional result: the delta itself
      'chat.send',
    );
    assert.equal(result.status, 'completed');
    assert.equal(result.response, 'hello from autobahn js');
    const deltas = progress.filter((p) => p.type === 'text_delta').map((p) => p.content);
    assert.equal(deltas.join(''), 'hello from autobahn js');

    // the run's events reach the subscriber, in id order (run_complete may trail the result)
    for (let i = 0; i < 100 && !events.some((e) => e.type === 'run_complete'); i++) {
      await new Promise((r) => setTimeout(r, 20));
    }
    const mine = events.filter((e) => e.run_id === result.run_id).map((e) => e.type);
    assert.ok(mine.includes('run_started') && mine.includes('run_complete'), String(mine));
    const ids = events.map((e) => e.id);
    assert.deepEqual(ids, [...ids].sort((a, b) => a - b));

    // errors come back as WAMP errors with gatewayd's code
    await assert.rejects(
      session.call('gatewayd.sessions.get', [], { session_id: 'missing' }),
      (err) => err.error === 'gatewayd.error.not_found' && err.kwargs.code === 'not_found',
    );
    await assert.rejects(
      session.call('gatewayd.no.such.thing'),
      (err) => err.error === 'wamp.error.no_such_procedure',
    );
  } finally {
    await leave(connection);
  }
});
