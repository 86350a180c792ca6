"""Prometheus metrics of the router, and of every node as the router last saw it.

Node gauges come from the stats the health loop already polls, so one scrape of the
router's /metrics covers the cluster (label `node`)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from router.node_client import NodeClient

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

_NODE_FIELDS = ("running", "waiting", "waiting_for_remote_kv", "kv_blocks_total", "kv_blocks_free",
                "kv_blocks_cached", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions")


class RouterMetrics:
    def __init__(self, nodes: Sequence[NodeClient]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pdcluster_requests", "Requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("pdcluster_requests_in_flight", "Requests being served", registry=r)
        self.ttft = Histogram("pdcluster_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pdcluster_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pdcluster_prompt_tokens", "Prompt tokens served", registry=r)
        self.generation_tokens = Counter("pdcluster_generation_tokens", "Tokens generated", registry=r)
        self.failovers = Counter("pdcluster_failovers", "Requests moved to another node after a node failure",
                                 ["stage"], registry=r)
        r.register(_NodeCollector(nodes))


class _NodeCollector:
    def __init__(self, nodes: Sequence[NodeClient]):
        self.nodes = nodes

    def collect(self):
        healthy = GaugeMetricFamily("pdcluster_node_healthy", "1 when the node answers its health checks",
                                    labels=["node", "role"])
        families = {f: GaugeMetricFamily(f"pdcluster_node_{f}", f"Node stat {f}", labels=["node", "role"])
                    for f in _NODE_FIELDS}
        transfer = GaugeMetricFamily("pdcluster_node_kv_transfer", "KV transfer counters of the node's connector",
                                     labels=["node", "role", "counter"])
        for n in self.nodes:
            healthy.add_metric([n.id, n.role], 1.0 if n.healthy else 0.0)
            if n.last_stats is None:
                continue
            e = n.last_stats.engine
            for f, fam in families.items():
                fam.add_metric([n.id, n.role], float(getattr(e, f)))
            for k, v in e.kv_transfer.items():
                transfer.add_metric([n.id, n.role, k], float(v))
        yield healthy
        yield from families.values()
        yield transfer
