"""The latency gate: a candidate is replayed on sampled real requests beside the champion, in a separate
process through the production serving path (`recloop.latency.replay`), and refused when its p99 is over
the absolute budget or too far above the champion's (`recloop.latency.gate`). See docs/latency.md."""

from recloop.latency.gate import LatencyConfig, LatencyDecision, decide_latency

__all__ = ["LatencyConfig", "LatencyDecision", "decide_latency"]
