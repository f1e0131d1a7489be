// The Node Anthropic SDK's stream helper against saiproxy: text, then a tool call.
// Usage: node messages_stream.mjs <base URL>; prints one JSON object.
import Anthropic from "@anthropic-ai/sdk";

const client = new Anthropic({ baseURL: process.argv[2], maxRetries: 0 });

const texts = [];
const stream = client.messages
  .stream({
    model: "claude-sonnet-4-5",
    max_tokens: 100,
    messages: [{ role: "user", content: "Say hello" }],
  })
  .on("text", (text) => texts.push(text));
const message = await stream.finalMessage();

const toolStream = client.messages.stream({
  model: "claude-sonnet-4-5",
  max_tokens: 100,
  tools: [
    {
      name: "get_weather",
      description: "Current weather in a city",
      input_schema: {
        type: "object",
        properties: { city: { type: "string" } },
        required: ["city"],
      },
    },
  ],
  messages: [{ role: "user", content: "Weather in Paris?" }],
});
const withTool = await toolStream.finalMessage();
const toolUse = withTool.content.find((block) => block.type === "tool_use");

console.log(
  JSON.stringify({
    texts,
    text: message.content[0].text,
    stop_reason: message.stop_reason,
    tool: {
      stop_reason: withTool.stop_reason,
      id: toolUse.id,
      input: toolUse.input,
    },
  }),
);
