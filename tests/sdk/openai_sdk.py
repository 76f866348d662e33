#!/usr/bin/env python3
"""The official openai SDK against llm-gateway, as an OpenAI application uses it.

Usage: openai_sdk.py BASE_URL GATEWAY_KEY  (BASE_URL ends in /v1)

Run by the Rust test tests/openai/sdk.rs, which starts the gateway in front of a fake upstream
scripted for exactly these calls (each call's first user message opens with a [tag] naming its
scenario). Prints every check; exits 0 only if all of them held, 1 otherwise, and 3 if the
openai package is missing.
"""

import json
import sys

try:
    import openai
except ImportError as e:
    print(f"cannot import openai ({e}): run `pip install -r tests/sdk/requirements.txt`",
          file=sys.stderr)
    sys.exit(3)

MODEL = "gpt-4o"  # an alias in the gateway's config: the answers must report this name
PIXEL_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJR"
             "U5ErkJggg==")
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Local time in a time zone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                       "required": ["tz"]}}},
]

failures = []


def check(ok, what, got=None):
    """Records one check; `got` is shown when it fails."""
    if ok:
        print(f"ok    {what}")
    else:
        failures.append(what)
        print(f"FAIL  {what}" + ("" if got is None else f": got {got!r}"))


def user(text):
    return {"role": "user", "content": text}


def check_usage(usage, what):
    """The scripted upstream usage: input 10 + cache creation 2 + cache read 3, output 7."""
    check(usage is not None, f"{what}: usage present")
    if usage is None:
        return
    check(usage.prompt_tokens == 15, f"{what}: prompt_tokens counts cache tokens", usage.prompt_tokens)
    check(usage.completion_tokens == 7, f"{what}: completion_tokens", usage.completion_tokens)
    check(usage.total_tokens == 22, f"{what}: total_tokens", usage.total_tokens)
    details = usage.prompt_tokens_details
    check(details is not None and details.cached_tokens == 3,
          f"{what}: prompt_tokens_details.cached_tokens", details)


def plain(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "You are terse."}, user("[plain] Say hello")],
    )
    check(r.object == "chat.completion", "plain: object", r.object)
    check(r.id.startswith("chatcmpl-"), "plain: id", r.id)
    check(r.model == MODEL, "plain: model is the name asked for", r.model)
    check(len(r.choices) == 1, "plain: one choice", len(r.choices))
    choice = r.choices[0]
    check(choice.message.role == "assistant", "plain: role", choice.message.role)
    check(choice.message.content == "Hello from Claude", "plain: content", choice.message.content)
    check(choice.finish_reason == "stop", "plain: finish_reason", choice.finish_reason)
    check_usage(r.usage, "plain")


def streamed_text(chunks):
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def stream(client, include_usage):
    what = f"stream (include_usage={include_usage})"
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[user("[stream] Count to three")], stream=True, **extra))
    check(len(chunks) > 0, f"{what}: chunks arrived")
    if not chunks:
        return
    check(all(c.object == "chat.completion.chunk" for c in chunks), f"{what}: chunk objects")
    check(all(c.model == MODEL for c in chunks), f"{what}: model on every chunk")
    check(len({c.id for c in chunks}) == 1, f"{what}: one id", {c.id for c in chunks})
    check(chunks[0].choices and chunks[0].choices[0].delta.role == "assistant",
          f"{what}: first delta has the role", chunks[0])
    check(streamed_text(chunks) == "one two three", f"{what}: content", streamed_text(chunks))
    finishes = [c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].finish_reason]
    check(finishes == ["stop"], f"{what}: exactly one finish_reason", finishes)
    if include_usage:
        last = chunks[-1]
        check(last.choices == [], f"{what}: the last chunk is the usage chunk", last)
        check_usage(last.usage, f"{what}: usage chunk")
        check(all(c.usage is None for c in chunks[:-1]), f"{what}: usage only on the last chunk")
    else:
        check(all(c.usage is None for c in chunks), f"{what}: no usage without include_usage")
        check(all(c.choices for c in chunks), f"{what}: no usage chunk")


def tools(client):
    messages = [user("[tools] Weather in Paris and the time in Tokyo?")]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                       tool_choice="auto")
    choice = r.choices[0]
    msg = choice.message
    check(choice.finish_reason == "tool_calls", "tools: finish_reason", choice.finish_reason)
    check(msg.content is None, "tools: content is null with only tool calls", msg.content)
    calls = msg.tool_calls or []
    check(len(calls) == 2, "tools: two tool calls", len(calls))
    expected = [("toolu_01W", "get_weather", {"city": "Paris"}),
                ("toolu_01T", "get_time", {"tz": "Asia/Tokyo"})]
    for call, (cid, name, args) in zip(calls, expected):
        check(call.type == "function", f"tools: {name} is a function call", call.type)
        check(call.id == cid, f"tools: {name} id", call.id)
        check(call.function.name == name, f"tools: {name} name", call.function.name)
        try:
            parsed = json.loads(call.function.arguments)
        except (TypeError, ValueError) as e:
            parsed = f"not JSON: {e}"
        check(parsed == args, f"tools: {name} arguments are a JSON string", call.function.arguments)

    # The usual application loop: append the message as returned, then one result per call.
    messages.append(msg)
    results = {"get_weather": {"sky": "sunny"}, "get_time": {"time": "21:00"}}
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call.id,
                         "content": json.dumps(results[call.function.name])})
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    check(r.choices[0].message.content == "Sunny in Paris; 21:00 in Tokyo.",
          "tools: the answer after the tool results", r.choices[0].message.content)
    check(r.choices[0].finish_reason == "stop", "tools: then finish_reason stop",
          r.choices[0].finish_reason)


def stream_tools(client):
    """The SDK's own stream helper assembles the tool calls from their deltas."""
    with client.chat.completions.stream(
            model=MODEL, messages=[user("[stream-tools] Weather in Paris, time in Tokyo?")],
            tools=TOOLS) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    choice = final.choices[0]
    check(choice.finish_reason == "tool_calls", "stream-tools: finish_reason", choice.finish_reason)
    check(choice.message.content == "Checking.", "stream-tools: content", choice.message.content)
    calls = choice.message.tool_calls or []
    got = []
    for call in calls:
        try:
            got.append((call.id, call.function.name, json.loads(call.function.arguments)))
        except (TypeError, ValueError) as e:
            got.append((call.id, call.function.name, f"not JSON: {e}"))
    check(got == [("toolu_S1", "get_weather", {"city": "Paris"}),
                  ("toolu_S2", "get_time", {"tz": "Asia/Tokyo"})],
          "stream-tools: calls assembled from interleaved deltas", got)


def image(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "text", "text": "[image] What is in this picture?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL_PNG}",
                                            "detail": "low"}},
    ]}])
    check(r.choices[0].message.content == "A single red pixel.", "image: answered",
          r.choices[0].message.content)


def refused(client):
    try:
        client.chat.completions.create(model=MODEL, n=2, messages=[user("[refused] Two answers")])
        check(False, "n=2: raises BadRequestError")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "n=2: status 400", e.status_code)
        check(e.param == "n", "n=2: param is n", e.param)
        check(e.type == "invalid_request_error", "n=2: type", e.type)


def stream_error(client):
    received = []
    try:
        for chunk in client.chat.completions.create(
                model=MODEL, messages=[user("[stream-error] Hello")], stream=True):
            received.append(chunk)
        check(False, "mid-stream error: raises APIError", streamed_text(received))
    except openai.APIError as e:
        check(e.message == "Overloaded", "mid-stream error: the upstream's message", e.message)
    check(streamed_text(received) == "Hel", "mid-stream error: text before the error",
          streamed_text(received))


def rate_limited(client):
    try:
        client.chat.completions.create(model=MODEL, messages=[user("[rate-limit] Hello")])
        check(False, "429: raises RateLimitError")
    except openai.RateLimitError as e:
        check(e.status_code == 429, "429: status", e.status_code)
        check(e.response.headers.get("retry-after") == "7", "429: retry-after kept",
              e.response.headers.get("retry-after"))
        check(e.code == "rate_limit_exceeded", "429: code", e.code)
        check(e.type == "rate_limit_error", "429: type", e.type)


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    base_url, key = sys.argv[1], sys.argv[2]
    print(f"openai {openai.__version__} against {base_url}")
    # No retries: a 429 must surface, not be retried into the next scripted answer.
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=20)
    steps = [plain, lambda c: stream(c, False), lambda c: stream(c, True), tools, stream_tools,
             image, refused, stream_error,
             # Last: the 429 rests the gateway's only account.
             rate_limited]
    for step in steps:
        try:
            step(client)
        except Exception as e:  # an unexpected exception is a failed check, and the run goes on
            check(False, f"{getattr(step, '__name__', 'step')} raised {type(e).__name__}", str(e))
    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
