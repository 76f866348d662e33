#!/usr/bin/env python3
"""The official openai SDK's Responses API against llm-gateway: `responses.create` and
`responses.stream`, with text, a function-call round trip, and reasoning replayed.

Usage: openai_responses.py BASE_URL GATEWAY_KEY  (BASE_URL ends in /v1)

Run by tests/openai/responses.rs, which scripts the fake upstream for exactly these calls (each
call's first user message opens with a [tag] naming its scenario). Prints every check; exits 0
only if all of them held, 1 otherwise, and 3 if the openai package is missing.
"""

import sys

try:
    import openai
except ImportError as e:
    print(f"cannot import openai ({e}): run `pip install -r tests/sdk/requirements.txt`",
          file=sys.stderr)
    sys.exit(3)

MODEL = "gpt-4o"  # an alias in the gateway's config: answers must report this name
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}

failures = []


def check(ok, what, got=None):
    if ok:
        print(f"ok    {what}")
    else:
        failures.append(what)
        print(f"FAIL  {what}" + ("" if got is None else f": got {got!r}"))


def check_usage(usage, what):
    """The scripted usage: input 10 + cache creation 2 + cache read 3, output 7."""
    check(usage is not None, f"{what}: usage present")
    if usage is None:
        return
    check(usage.input_tokens == 15, f"{what}: input_tokens counts cache tokens", usage.input_tokens)
    check(usage.output_tokens == 7, f"{what}: output_tokens", usage.output_tokens)
    check(usage.total_tokens == 22, f"{what}: total_tokens", usage.total_tokens)
    check(usage.input_tokens_details.cached_tokens == 3, f"{what}: cached_tokens",
          usage.input_tokens_details.cached_tokens)


def main():
    base_url, key = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)

    # Plain text.
    r = client.responses.create(model=MODEL, instructions="Be brief.", input="[r-plain] hi")
    check(r.output_text == "Hello from Claude", "create: output_text", r.output_text)
    check(r.status == "completed", "create: status", r.status)
    check(r.model == MODEL, "create: model is the one asked for", r.model)
    check(r.id.startswith("resp_"), "create: id", r.id)
    check_usage(r.usage, "create")

    # Streamed text: deltas as they come, and the final response assembled by the SDK.
    deltas = []
    types = []
    with client.responses.stream(model=MODEL, input="[r-stream] count") as stream:
        for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    check(deltas == ["one", " two", " three"], "stream: text deltas", deltas)
    check(types[0] == "response.created" and types[-1] == "response.completed",
          "stream: created first, completed last", types)
    check(final.output_text == "one two three", "stream: final output_text", final.output_text)
    check_usage(final.usage, "stream")

    # A function-call round trip: the call, then its output sent back with the history.
    history = [{"role": "user", "content": "[r-tools] weather in Paris?"}]
    r = client.responses.create(model=MODEL, input=history, tools=[WEATHER])
    calls = [item for item in r.output if item.type == "function_call"]
    check(len(calls) == 1, "tools: one function_call", r.output)
    if calls:
        call = calls[0]
        check(call.name == "get_weather", "tools: name", call.name)
        check(call.arguments == '{"city":"Paris"}', "tools: arguments", call.arguments)
        history += r.output
        history.append({"type": "function_call_output", "call_id": call.call_id,
                        "output": '{"temp": 21}'})
        r = client.responses.create(model=MODEL, input=history, tools=[WEATHER])
        check(r.output_text == "Sunny, 21 degrees.", "tools: the answer after the output",
              r.output_text)

    # A streamed function call: arguments as deltas, the item whole at the end.
    with client.responses.stream(model=MODEL, input="[r-stream-tools] weather?",
                                 tools=[WEATHER]) as stream:
        arguments = "".join(e.delta for e in stream
                            if e.type == "response.function_call_arguments.delta")
        final = stream.get_final_response()
    check(arguments == '{"city":"Paris"}', "stream tools: argument deltas", arguments)
    items = [i for i in final.output if i.type == "function_call"]
    check(len(items) == 1 and items[0].call_id == "toolu_S1", "stream tools: the call item",
          final.output)

    # Reasoning: an effort turns thinking on; the summary and its signature come back, and a
    # replayed history carries them to the next turn.
    history = [{"role": "user", "content": "[r-reason] why?"}]
    r = client.responses.create(model=MODEL, input=history,
                                reasoning={"effort": "low", "summary": "auto"},
                                include=["reasoning.encrypted_content"])
    reasoning = [i for i in r.output if i.type == "reasoning"]
    check(len(reasoning) == 1, "reasoning: one item", r.output)
    if reasoning:
        item = reasoning[0]
        check(item.summary and item.summary[0].text == "Because.", "reasoning: summary",
              item.summary)
        check(item.encrypted_content == "sig-reason", "reasoning: encrypted_content",
              item.encrypted_content)
    check(r.output_text == "That is why.", "reasoning: text", r.output_text)
    history += r.output
    history.append({"role": "user", "content": "and then?"})
    r = client.responses.create(model=MODEL, input=history,
                                reasoning={"effort": "low", "summary": "auto"},
                                include=["reasoning.encrypted_content"])
    check(r.output_text == "Then more.", "reasoning: the replayed turn", r.output_text)

    # No server-side state: a clear 400.
    try:
        client.responses.create(model=MODEL, input="[r-plain] again", previous_response_id="resp_x")
        check(False, "previous_response_id: refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "previous_response_id" in str(e),
              "previous_response_id: a 400 naming it", str(e))

    if failures:
        print(f"{len(failures)} checks failed")
        sys.exit(1)
    print("all checks passed")


main()
