"""GET /metrics parses as OpenMetrics text (prometheus_client's strict
parser, the format Prometheus asks for first) and carries the series of
SPEC §6 with their types; after the traffic the examples made, the message
and spawn counters have moved.

    python check_metrics.py URL [TOKEN]
"""

import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

EXPECTED = {
    "agentgate_sessions": "gauge",
    "agentgate_live_children": "gauge",
    "agentgate_queued_messages": "gauge",
    "agentgate_sse_subscribers": "gauge",
    "agentgate_sessions_created": "counter",
    "agentgate_sessions_closed": "counter",
    "agentgate_messages": "counter",
    "agentgate_oneshot_runs": "counter",
    "agentgate_first_delta_latency_seconds": "histogram",
    "agentgate_reply_latency_seconds": "histogram",
    "agentgate_spawns": "counter",
    "agentgate_reaps": "counter",
    "agentgate_restarts": "counter",
    "agentgate_child_crashes": "counter",
}


def main() -> int:
    url = sys.argv[1].rstrip("/") + "/metrics"
    req = urllib.request.Request(url)
    if len(sys.argv) > 2:
        req.add_header("Authorization", f"Bearer {sys.argv[2]}")
    with urllib.request.urlopen(req, timeout=10) as res:
        ctype = res.headers["Content-Type"]
        text = res.read().decode("utf-8")
    assert ctype.startswith("application/openmetrics-text"), ctype
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in EXPECTED.items():
        assert name in families, f"{name} missing; have {sorted(families)}"
        assert families[name].type == kind, f"{name} is a {families[name].type}, not a {kind}"
    assert families["agentgate_first_delta_latency_seconds"].unit == "seconds"

    def value(family, sample, **labels):
        for s in families[family].samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        raise AssertionError(f"no {sample} {labels} in {families[family].samples}")

    completed = value("agentgate_messages", "agentgate_messages_total", outcome="completed")
    spawned = value("agentgate_spawns", "agentgate_spawns_total", kind="session", result="ok")
    replies = value("agentgate_reply_latency_seconds", "agentgate_reply_latency_seconds_count")
    assert completed >= 1 and spawned >= 1, (completed, spawned)
    assert replies == completed, f"one reply latency per completed message: {replies} != {completed}"
    print(f"metrics: {len(families)} families, OpenMetrics-valid; {completed:.0f} completed messages, "
          f"{spawned:.0f} session children spawned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
