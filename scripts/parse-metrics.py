#!/usr/bin/env python3
"""Parses Prometheus text from stdin with the reference client's parser (prometheus_client,
PyPI) and prints its samples as JSON: [{"family", "type", "name", "labels", "value"}, ...].
The /metrics end-to-end test uses it, so a format error fails the test the way it would fail a
real scraper."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        samples.append(
            {"family": family.name, "type": family.type, "name": s.name, "labels": s.labels, "value": s.value}
        )
json.dump(samples, sys.stdout)
