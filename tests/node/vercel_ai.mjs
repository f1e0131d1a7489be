// The Vercel AI SDK against saiproxy: generateText and streamText with a tool.
// Usage: node vercel_ai.mjs <base url> <generate|stream|required>; prints JSON.
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateText, streamText, tool } from "ai";
import { z } from "zod";

const [baseURL, mode] = process.argv.slice(2);
const sai = createOpenAICompatible({ name: "saiproxy", baseURL, apiKey: "unused" });
const tools = {
  get_weather: tool({
    description: "Current weather of a city",
    inputSchema: z.object({ city: z.string() }),
  }),
};
const request = {
  model: sai("sai-model"),
  tools,
  prompt: "Weather in Quito?",
  maxRetries: 0,
};

if (mode === "stream") {
  const result = streamText(request);
  const parts = [];
  for await (const part of result.fullStream) {
    if (part.type === "error") throw part.error;
    parts.push(part.type);
  }
  const calls = await result.toolCalls;
  console.log(JSON.stringify({
    text: await result.text,
    finishReason: await result.finishReason,
    toolCalls: calls.map((c) => ({ name: c.toolName, input: c.input })),
    parts,
  }));
} else {
  const result = await generateText({
    ...request,
    toolChoice: mode === "required" ? "required" : "auto",
  });
  console.log(JSON.stringify({
    text: result.text,
    finishReason: result.finishReason,
    toolCalls: result.toolCalls.map((c) => ({ name: c.toolName, input: c.input })),
  }));
}
