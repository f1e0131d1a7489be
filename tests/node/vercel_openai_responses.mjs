// The Vercel AI SDK's OpenAI provider (the Responses API) against saiproxy: a tool loop
// that runs the tool and answers, then a second turn that sends the first one back.
// Usage: node vercel_openai_responses.mjs <base url> <generate|stream> <store|nostore>;
// prints JSON.
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

const [baseURL, mode, store] = process.argv.slice(2);
const openai = createOpenAI({ baseURL, apiKey: "unused" });
const ran = [];
const request = {
  model: openai.responses("sai-model"),
  tools: {
    get_weather: tool({
      description: "Current weather of a city",
      inputSchema: z.object({ city: z.string() }),
      execute: async ({ city }) => {
        ran.push(city);
        return { city, celsius: 18 };
      },
    }),
  },
  stopWhen: stepCountIs(4),
  maxRetries: 0,
  // store: true (the default) refers to items saiproxy kept; store: false sends them whole.
  providerOptions: store === "nostore" ? { openai: { store: false } } : {},
};

async function turn(messages) {
  if (mode === "stream") {
    const result = streamText({ ...request, messages });
    const parts = new Set();
    for await (const part of result.fullStream) {
      if (part.type === "error") throw part.error;
      parts.add(part.type);
    }
    const steps = await result.steps;
    return { text: await result.text, steps: steps.length, parts: [...parts],
             messages: (await result.response).messages };
  }
  const result = await generateText({ ...request, messages });
  return { text: result.text, steps: result.steps.length, messages: result.response.messages };
}

const question = { role: "user", content: "Weather in Quito?" };
const first = await turn([question]);
const second = await turn([question, ...first.messages, { role: "user", content: "Thanks!" }]);
console.log(JSON.stringify({
  ran,
  first: { text: first.text, steps: first.steps, parts: first.parts },
  second: { text: second.text, steps: second.steps },
}));
