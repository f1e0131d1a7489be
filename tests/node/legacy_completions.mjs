// The official Node openai SDK against saiproxy's legacy Completions and model lookup.
// Usage: node legacy_completions.mjs <base URL ending in /v1>; prints one JSON object.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "unused", maxRetries: 0 });

const plain = await client.completions.create({ model: "sai-model", prompt: ["a", "b"], echo: true });
const stream = await client.completions.create({
  model: "sai-model",
  prompt: "s",
  stream: true,
  stream_options: { include_usage: true },
});
let streamed = "";
let finish = null;
let usage = null;
for await (const chunk of stream) {
  for (const choice of chunk.choices) {
    streamed += choice.text;
    finish = choice.finish_reason ?? finish;
  }
  if (chunk.usage) usage = chunk.usage;
}
const model = await client.models.retrieve("sai-model");
let missing = null;
try {
  await client.models.retrieve("nope");
} catch (error) {
  missing = { status: error.status, code: error.code };
}
console.log(
  JSON.stringify({
    texts: plain.choices.map((c) => [c.index, c.text, c.finish_reason]),
    usage: plain.usage,
    streamed,
    finish,
    streamUsage: usage,
    model: model.id,
    missing,
  }),
);
