"""Parses a Prometheus text exposition (stdin) with the reference Python parser and prints
what it found as JSON: sample name -> metric type. Exits non-zero, with the parser's error,
when the text is not valid exposition format."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    text = sys.stdin.read()
    found = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found[sample.name] = family.type
    except Exception as err:  # the parser raises ValueError and friends on bad input
        print(f"not valid Prometheus text: {err}", file=sys.stderr)
        return 1
    json.dump(found, sys.stdout, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
