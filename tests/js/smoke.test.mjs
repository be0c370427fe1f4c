// The official OpenAI JavaScript client against a running Ferry (FERRY_BASE_URL).
import assert from "node:assert/strict";
import { test } from "node:test";
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.FERRY_BASE_URL, apiKey: "unused", maxRetries: 0 });

test("chat completion", async () => {
  const r = await client.chat.completions.create({
    model: "smollm2", temperature: 0, max_tokens: 8,
    messages: [{ role: "user", content: "Say hello" }],
  });
  assert.equal(r.object, "chat.completion");
  assert.ok(r.choices[0].message.content.length > 0);
  assert.equal(r.usage.completion_tokens <= 8, true);
});

test("streaming equals non-streaming at temperature 0", async () => {
  const args = { model: "smollm2", temperature: 0, max_tokens: 12,
                 messages: [{ role: "user", content: "Name a colour." }] };
  const whole = (await client.chat.completions.create(args)).choices[0].message.content;
  let streamed = "";
  let finish = null;
  for await (const chunk of await client.chat.completions.create({ ...args, stream: true })) {
    streamed += chunk.choices[0]?.delta?.content ?? "";
    finish = chunk.choices[0]?.finish_reason ?? finish;
  }
  assert.equal(streamed, whole);
  assert.ok(finish === "stop" || finish === "length");
});

test("models and errors", async () => {
  const list = await client.models.list();
  assert.ok(list.data.some((m) => m.id === "smollm2"));
  await assert.rejects(client.models.retrieve("gpt-4o"), (e) => e.status === 404);
});

test("embeddings", { skip: process.env.FERRY_EMBEDDINGS ? false : "no embedding model served" }, async () => {
  const r = await client.embeddings.create({ model: "all-minilm", input: ["why is the sky blue?", "why is the grass green?"] });
  assert.equal(r.data.length, 2);
  assert.equal(r.data[0].embedding.length, 384);
});
