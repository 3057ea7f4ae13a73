// The official `openai` npm package against a running gatewayd, unchanged (CONTRACT §7).
// Run by the pytest launcher with GATEWAYD_URL and GATEWAYD_TOKEN (a chat-scope token).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';

const url = process.env.GATEWAYD_URL;
const token = process.env.GATEWAYD_TOKEN;
const skip = !url || !token ? 'GATEWAYD_URL and GATEWAYD_TOKEN are not set' : false;

function client(apiKey = token) {
  return new OpenAI({ baseURL: `${url}/v1`, apiKey, maxRetries: 0, timeout: 10_000 });
}

async function firstModel() {
  const page = await client().models.list();
  assert.ok(page.data.length >= 1);
  return page.data[0].id;
}

test('models.list names the configured model and the agents', { skip }, async () => {
  const page = await client().models.list();
  const ids = page.data.map((m) => m.id);
  assert.ok(ids.includes('default'));
  for (const m of page.data) assert.equal(m.object, 'model');
});

test('chat completion, not streamed', { skip }, async () => {
  const model = await firstModel();
  const completion = await client().chat.completions.create({
    model,
    messages: [
      { role: 'system', content: 'be brief' },
      { role: 'user', content: 'hello from node' },
    ],
  });
  assert.match(completion.id, /^chatcmpl-/);
  assert.equal(completion.object, 'chat.completion');
  assert.equal(completion.choices[0].message.role, 'assistant');
  assert.equal(completion.choices[0].message.content, 'hello from node');
  assert.equal(completion.choices[0].finish_reason, 'stop');
  assert.equal(completion.usage.completion_tokens, 3);
  assert.equal(
    completion.usage.total_tokens,
    completion.usage.prompt_tokens + completion.usage.completion_tokens,
  );
});

test('chat completion, streamed with usage', { skip }, async () => {
  const model = await firstModel();
  const stream = await client().chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'streamed from node' }],
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  assert.equal(chunks[0].choices[0].delta.role, 'assistant');
  const text = chunks.map((c) => c.choices[0]?.delta?.content ?? '').join('');
  assert.equal(text, 'streamed from node');
  assert.ok(chunks.every((c) => c.object === 'chat.completion.chunk'));
  assert.equal(chunks.at(-2).choices[0].finish_reason, 'stop');
  const last = chunks.at(-1);
  assert.deepEqual(last.choices, []);
  assert.equal(last.usage.completion_tokens, 3);
});

test('chat completion, streamed through the SDK helper', { skip }, async () => {
  const model = await firstModel();
  const runner = client().chat.completions.stream({
    model,
    messages: [{ role: 'user', content: 'one two' }],
  });
  const deltas = [];
  runner.on('content', (delta) => deltas.push(delta));
  const final = await runner.finalChatCompletion();
  assert.equal(final.choices[0].message.content, 'one two');
  assert.equal(deltas.join(''), 'one two');
});

test('errors are the SDK error classes', { skip }, async () => {
  await assert.rejects(client('not-a-valid-token-0123456789').models.list(), OpenAI.AuthenticationError);
  await assert.rejects(
    client().chat.completions.create({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] }),
    (err) => err instanceof OpenAI.NotFoundError && err.code === 'model_not_found',
  );
  await assert.rejects(
    client().chat.completions.create({ model: await firstModel(), messages: [] }),
    OpenAI.BadRequestError,
  );
});
