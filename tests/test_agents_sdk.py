"""The OpenAI Agents SDK against saiproxy's stored Responses and Conversations.

The SDK's own Runner drives each run through the proxy's /v1/responses
(its ``OpenAIResponsesModel`` with an ``AsyncOpenAI`` client pointed at the
proxy, tracing off so nothing leaves loopback). The fake SAI's scripted
answers play the model; what it was sent shows that the state the SDK left
on the server (a ``previous_response_id`` chain, a conversation) reached SAI.
"""

from __future__ import annotations

from typing import Any

import openai
from agents import (
    Agent,
    OpenAIConversationsSession,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
)

from .conftest import FakeSai, MakeProxy, Received, Reply, openai_url

RUN = RunConfig(tracing_disabled=True)


def _client(proxy: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=openai_url(proxy), api_key="unused", max_retries=0)


def _agent(client: openai.AsyncOpenAI, **extra: Any) -> Agent[Any]:
    model = OpenAIResponsesModel(model="sai-model", openai_client=client)
    return Agent(name="assistant", instructions="Be brief.", model=model, **extra)


def history(call: Received) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in call.json.get("chatMessages", [])]


async def test_a_tool_loop_chained_by_previous_response_id(
    make_proxy: MakeProxy, sai: FakeSai
) -> None:
    proxy = await make_proxy()
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Return the weather in a city."""
        asked.append(city)
        return "18 C and cloudy"

    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Quito"}}</tool_call>'
    sai.script(Reply(body="Checking. " + call), Reply(body="It is 18 C in Quito."))
    async with _client(proxy) as client:
        result = await Runner.run(
            _agent(client, tools=[get_weather]),
            "Weather in Quito?",
            auto_previous_response_id=True,
            run_config=RUN,
        )
        # The run's last response is stored, chained to the first.
        last = await client.responses.retrieve(result.last_response_id or "")
        first = await client.responses.retrieve(last.previous_response_id or "")
        # The SDK sent the second request only the tool's output (the chain did the rest).
        second_input = (await client.responses.input_items.list(last.id)).data
    assert result.final_output == "It is 18 C in Quito."
    assert asked == ["Quito"]
    assert first.output_text.startswith("Checking.")
    assert [item.type for item in second_input] == ["function_call_output"]

    assert len(sai.received) == 2
    assert history(sai.received[0]) == [("user", "Weather in Quito?")]
    # The second call sent only the tool's output and the previous response's id;
    # the proxy rebuilt the whole history from its store.
    sent = history(sai.received[1])
    assert [role for role, _ in sent] == ["user", "assistant", "user"]
    assert sent[0] == ("user", "Weather in Quito?")
    assert sent[1][1].startswith("Checking.") and '"get_weather"' in sent[1][1]
    assert '"Quito"' in sent[1][1]
    assert sent[2][1].startswith('<tool_result name="get_weather"')
    assert "18 C and cloudy" in sent[2][1]
    # Instructions come with each request, not from the chain.
    assert sai.received[1].json["inputs"]["system"].startswith("Be brief.")


async def test_a_conversations_session_over_two_runs(make_proxy: MakeProxy, sai: FakeSai) -> None:
    proxy = await make_proxy()
    sai.script(Reply(body="Hello Ana."), Reply(body="Your name is Ana."))
    async with _client(proxy) as client:
        session = OpenAIConversationsSession(openai_client=client)
        agent = _agent(client)
        first = await Runner.run(agent, "My name is Ana.", session=session, run_config=RUN)
        second = await Runner.run(agent, "What is my name?", session=session, run_config=RUN)
        assert first.final_output == "Hello Ana."
        assert second.final_output == "Your name is Ana."
        # The conversation on the server holds both runs' turns, in order.
        items = await session.get_items()
        assert session.session_id.startswith("conv_")
        stored = await client.conversations.retrieve(session.session_id)
        assert stored.id == session.session_id

    def text(item: Any) -> str:
        content = item["content"]
        return content if isinstance(content, str) else content[0]["text"]

    assert [(item["role"], text(item)) for item in items] == [
        ("user", "My name is Ana."), ("assistant", "Hello Ana."),
        ("user", "What is my name?"), ("assistant", "Your name is Ana."),
    ]  # fmt: skip
    assert len(sai.received) == 2
    assert history(sai.received[0]) == [("user", "My name is Ana.")]
    assert history(sai.received[1]) == [
        ("user", "My name is Ana."), ("assistant", "Hello Ana."), ("user", "What is my name?"),
    ]  # fmt: skip
