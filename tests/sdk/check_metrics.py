"""Parses a Prometheus text exposition with the official prometheus_client parser.

Reads the exposition on stdin and prints, as one JSON object, every metric family the parser
found: {"families": [{"name", "type", "samples": [{"name", "labels", "value"}]}]}. The Rust
test (tests/team/metrics.rs) checks the numbers; this script only proves that a real
Prometheus parser reads the text, and hands over what it read.

Exit codes: 0 parsed; 2 the text does not parse; 3 prometheus_client is not installed
(`pip install -r tests/sdk/requirements.txt`).
"""

import json
import math
import sys

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as e:  # The test must fail, not skip, when the parser is missing.
    print(f"prometheus_client is not installed ({e}): pip install -r tests/sdk/requirements.txt",
          file=sys.stderr)
    sys.exit(3)


def number(value):
    """A sample value as JSON can carry it (infinities and NaN as strings)."""
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return value


def main():
    text = sys.stdin.read()
    try:
        families = [
            {
                "name": family.name,
                "type": family.type,
                "samples": [
                    {"name": s.name, "labels": dict(s.labels), "value": number(s.value)}
                    for s in family.samples
                ],
            }
            for family in text_string_to_metric_families(text)
        ]
    except Exception as e:  # Any parser complaint means the exposition is malformed.
        print(f"the exposition does not parse: {e!r}", file=sys.stderr)
        sys.exit(2)
    json.dump({"families": families}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
