// The Vercel AI SDK's structured output through its Anthropic provider against saiproxy.
// Usage: node anthropic_object.mjs <base URL ending in /v1> <generate|stream> <mode> <model>
// mode: the provider's structuredOutputMode ("auto", "outputFormat" or "jsonTool").
// Prints one JSON object: the object, the finish reason, what the request carried.
import { createAnthropic } from "@ai-sdk/anthropic";
import { generateObject, streamObject } from "ai";
import { z } from "zod";

const [baseURL, how, mode, modelId] = process.argv.slice(2);
const sent = [];
const anthropic = createAnthropic({
  baseURL,
  apiKey: "unused",
  // Records what the provider sends, to tell which structured-output path it took.
  fetch: async (url, init) => {
    sent.push(JSON.parse(init.body));
    return fetch(url, init);
  },
});
const request = {
  model: anthropic(modelId),
  schema: z.object({ city: z.string(), temp: z.number() }),
  prompt: "Weather in Quito?",
  maxRetries: 0,
  providerOptions: { anthropic: { structuredOutputMode: mode } },
};

let object;
let finishReason;
if (how === "stream") {
  const result = streamObject({
    ...request,
    onError: ({ error }) => {
      throw error;
    },
  });
  const partials = [];
  for await (const partial of result.partialObjectStream) partials.push(partial);
  object = await result.object;
  finishReason = await result.finishReason;
} else {
  const result = await generateObject(request);
  object = result.object;
  finishReason = result.finishReason;
}
const body = sent[0];
console.log(
  JSON.stringify({
    object,
    finishReason,
    outputFormat: body.output_config?.format?.type ?? null,
    tools: (body.tools ?? []).map((tool) => tool.name),
  }),
);
