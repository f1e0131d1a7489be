// The Node openai SDK's stored Responses and Conversations against saiproxy: a chain of
// previous_response_id turns, retrieve, input items page by page, delete; a conversation.
// Usage: node responses_state.mjs <base URL ending in /v1>; prints JSON.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "unused", maxRetries: 0 });

let previous;
const chain = [];
for (let turn = 0; turn < 5; turn++) {
  const response = await client.responses.create({
    model: "sai-model",
    input: `q${turn}`,
    ...(previous ? { previous_response_id: previous } : {}),
  });
  chain.push(response.output_text);
  previous = response.id;
}
const retrieved = await client.responses.retrieve(previous);
const created = await client.responses.create({
  model: "sai-model",
  input: ["a", "b", "c"].map((text) => ({ role: "user", content: text })),
});
const listed = [];
for await (const item of client.responses.inputItems.list(created.id, { limit: 1, order: "asc" })) {
  listed.push(item.content[0].text);
}
await client.responses.delete(created.id);
let deleted;
try {
  await client.responses.retrieve(created.id);
  deleted = "still there";
} catch (error) {
  deleted = error.status;
}
const conversation = await client.conversations.create({ metadata: { who: "node" } });
await client.conversations.items.create(conversation.id, {
  items: [{ type: "message", role: "user", content: "Hi, I am Node." }],
});
const answer = await client.responses.create({
  model: "sai-model", input: "Who am I?", conversation: conversation.id,
});
const items = [];
for await (const item of client.conversations.items.list(conversation.id, { order: "asc" })) {
  items.push(item.content[0].text);
}
console.log(JSON.stringify({
  chain, retrieved: retrieved.output_text, previous: retrieved.previous_response_id !== null,
  listed, deleted, conversation: answer.conversation?.id === conversation.id, items,
}));
