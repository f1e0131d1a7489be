// The Node openai SDK's Responses stream helper against saiproxy.
// Usage: node responses_stream.mjs <base URL ending in /v1>; prints JSON.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "unused", maxRetries: 0 });

// The final Response's text, from its message items.
const textOf = (response) =>
  response.output
    .filter((item) => item.type === "message")
    .flatMap((item) => item.content.map((part) => part.text))
    .join("");

async function text() {
  const stream = client.responses.stream({ model: "sai-model", input: "Greet me in Spanish" });
  const events = [];
  const deltas = [];
  for await (const event of stream) {
    events.push(event.type);
    if (event.type === "response.output_text.delta") deltas.push(event.delta);
  }
  const final = await stream.finalResponse();
  return { events, deltas, final: textOf(final) };
}

async function tool() {
  const stream = client.responses.stream({
    model: "sai-model",
    input: "Set x to 2",
    tools: [
      {
        type: "custom",
        name: "apply_patch",
        description: "Edit files with a patch.",
        format: { type: "grammar", syntax: "lark", definition: 'start: "*** Begin Patch" /.+/' },
      },
    ],
  });
  let inputDeltas = "";
  for await (const event of stream) {
    if (event.type === "response.custom_tool_call_input.delta") inputDeltas += event.delta;
  }
  const final = await stream.finalResponse();
  return { output: final.output, final_text: textOf(final), input_deltas: inputDeltas };
}

console.log(JSON.stringify({ text: await text(), tool: await tool() }));
