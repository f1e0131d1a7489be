// The Node openai SDK's background Responses against saiproxy: create and poll, cancel,
// stream then resume with starting_after.
// Usage: node responses_background.mjs <base URL ending in /v1>; prints JSON.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "unused", maxRetries: 0 });
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function ended(id) {
  for (let i = 0; i < 300; i++) {
    const response = await client.responses.retrieve(id);
    if (!["queued", "in_progress"].includes(response.status)) return response;
    await sleep(50);
  }
  throw new Error(`${id} did not end`);
}

const created = await client.responses.create({ model: "sai-model", input: "poll me", background: true });
const polled = await ended(created.id);

const slow = await client.responses.create({ model: "sai-model", input: "slow", background: true });
await sleep(200);
const cancelled = await client.responses.cancel(slow.id);

const stream = await client.responses.create({
  model: "sai-model", input: "stream me", background: true, stream: true,
});
const events = [];
for await (const event of stream) events.push(event);
const id = events[0].response.id;
const resumed = [];
for await (const event of await client.responses.retrieve(id, { stream: true, starting_after: 2 })) {
  resumed.push(event.sequence_number);
}
console.log(JSON.stringify({
  first: created.status,
  polled: [polled.status, polled.output_text],
  cancelled: cancelled.status,
  numbers: events.map((event) => event.sequence_number),
  last: [events.at(-1).type, events.at(-1).response.output[0].content[0].text],
  resumed,
}));
