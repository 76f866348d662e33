"""How many requests the official anthropic SDK makes for one call through the gateway.

Usage: anthropic_retries.py BASE_URL KEY MODEL. Prints one JSON line: the HTTP requests the
SDK sent (its retries counted), the final status, and the x-should-retry header it saw. The
SDK is given two retries; a refusal it obeys as hopeless costs one request.
"""
import json
import sys

import anthropic

try:  # newer SDKs are built on httpx2, older ones on httpx
    import httpx2 as httpx
except ImportError:
    import httpx

base_url, key, model = sys.argv[1:4]
sent = []
seen = {}


def on_request(request):
    sent.append(request.url.path)


def on_response(response):
    seen["x-should-retry"] = response.headers.get("x-should-retry")


client = anthropic.Anthropic(
    base_url=base_url,
    api_key=key,
    max_retries=2,
    http_client=httpx.Client(
        event_hooks={"request": [on_request], "response": [on_response]}, trust_env=False
    ),
)
try:
    client.messages.create(
        model=model, max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    status = 200
except anthropic.APIStatusError as e:
    status = e.status_code
print(json.dumps({"requests": len(sent), "status": status, **seen}))
