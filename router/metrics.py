"""Prometheus metrics of the router, and of every node as the router last saw it.

Node gauges come from the stats the health loop already polls, so one scrape of the
router's /metrics covers the cluster (label `node`); a node that is down shows only
`pdcluster_node_healthy 0` until it answers again.

KV-cache metrics for agent workloads (README: KV-cache metrics):
* per node: prefix-cache queries and hits in blocks and tokens, the hit rate, cached
  blocks evicted (and evictions per second between two scrapes), the eviction policy;
* per request: cached prompt tokens (a histogram);
* per workflow (`workflow_id`, else `agent_id`): requests routed while some node held a
  prefix of theirs, how many landed on a node holding the longest one, and that share
  (workflow affinity);
* per agent (`agent_id`, else `workflow_id`): prompt tokens, those served from cache, and
  that share (agent reuse).
Workflow and agent series are bounded (the most recently active `MAX_TRACKED` each), so
a client inventing ids cannot grow the scrape without limit.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from router.node_client import NodeClient

# vLLM's buckets (vllm:time_to_first_token_seconds, vllm:e2e_request_latency_seconds): a long
# generation takes minutes, and one past the last bucket says only "+Inf".
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)

_NODE_GAUGES = ("running", "waiting", "waiting_for_remote_kv", "kv_blocks_total", "kv_blocks_free",
                "kv_blocks_cached")
# Cumulative since the node started: Prometheus counters (`_total`), as vLLM's
# vllm:prefix_cache_queries / vllm:num_preemptions; a restart shows as a counter reset.
_NODE_COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "prefix_cache_query_tokens",
                  "prefix_cache_hit_tokens", "kv_evictions", "kv_protected_evictions", "forks", "fork_blocks_shared",
                  "fork_blocks_copied", "fork_tokens_saved", "fork_fallbacks", "tokens_computed")
_KV_TRANSFER_GAUGES = ("requests_held",)   # the rest of a connector's stats count up
_CACHED_TOKEN_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 65536)
MAX_TRACKED = 1000


@dataclass(slots=True)
class _WorkflowCounts:
    routed_with_prefix: int = 0   # requests routed while some node held a prefix of theirs
    landed_on_prefix: int = 0     # of those, sent to a node holding the longest one


@dataclass(slots=True)
class _AgentCounts:
    prompt_tokens: int = 0
    cached_tokens: int = 0


class WorkflowKVStats:
    """Per-workflow affinity and per-agent reuse counters, bounded LRU-style."""

    def __init__(self, max_tracked: int = MAX_TRACKED):
        self.max_tracked = max_tracked
        self.workflows: OrderedDict[str, _WorkflowCounts] = OrderedDict()
        self.agents: OrderedDict[str, _AgentCounts] = OrderedDict()

    def observe_routing(self, workflow: str, landed_on_prefix: bool | None) -> None:
        """`landed_on_prefix` None: no node held any prefix of the prompt (not scored)."""
        if landed_on_prefix is None:
            return
        c = _touch(self.workflows, workflow, _WorkflowCounts, self.max_tracked)
        c.routed_with_prefix += 1
        c.landed_on_prefix += landed_on_prefix

    def observe_request(self, agent: str, prompt_tokens: int, cached_tokens: int) -> None:
        c = _touch(self.agents, agent, _AgentCounts, self.max_tracked)
        c.prompt_tokens += prompt_tokens
        c.cached_tokens += cached_tokens


def _touch(table: OrderedDict, key: str, make, limit: int):
    c = table.get(key)
    if c is None:
        c = table[key] = make()
        if len(table) > limit:
            table.popitem(last=False)
    table.move_to_end(key)
    return c


class RouterMetrics:
    def __init__(self, nodes: Sequence[NodeClient], kv_stats: WorkflowKVStats | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pdcluster_requests", "Requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("pdcluster_requests_in_flight", "Requests being served", registry=r)
        self.ttft = Histogram("pdcluster_time_to_first_token_seconds", "Time to first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.e2e = Histogram("pdcluster_request_latency_seconds", "End-to-end request latency",
                             buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pdcluster_prompt_tokens", "Prompt tokens served", registry=r)
        self.generation_tokens = Counter("pdcluster_generation_tokens", "Tokens generated", registry=r)
        self.failovers = Counter("pdcluster_failovers", "Requests moved to another node after a node failure",
                                 ["stage"], registry=r)
        self.cached_tokens = Histogram("pdcluster_request_cached_tokens",
                                       "Prompt tokens a request found in the prefix cache",
                                       buckets=_CACHED_TOKEN_BUCKETS, registry=r)
        self.prefill_decisions = Counter("pdcluster_router_prefill_decisions",
                                         "Requests by where their prompt was planned to prefill: remote (another "
                                         "node, KV pulled) or local (on the decode node), and why",
                                         ["decision", "reason"], registry=r)
        self.kv_stats = kv_stats or WorkflowKVStats()
        r.register(_NodeCollector(nodes))
        r.register(_WorkflowCollector(self.kv_stats))

    def observe_prompt_cache(self, workflow_id: str | None, agent_id: str | None, prompt_tokens: int,
                             cached_tokens: int) -> None:
        """A request's first answer came back: count its cached prompt tokens."""
        self.cached_tokens.observe(cached_tokens)
        agent = agent_id or workflow_id
        if agent:
            self.kv_stats.observe_request(agent, prompt_tokens, cached_tokens)


class _NodeCollector:
    def __init__(self, nodes: Sequence[NodeClient]):
        self.nodes = nodes
        self._evictions: dict[str, tuple[float, int, float]] = {}  # node -> (time, count, rate) at last scrape

    def collect(self):
        healthy = GaugeMetricFamily("pdcluster_node_healthy", "1 when the node answers its health checks",
                                    labels=["node", "role"])
        families = {f: GaugeMetricFamily(f"pdcluster_node_{f}", f"Node stat {f}", labels=["node", "role"])
                    for f in _NODE_GAUGES}
        families |= {f: CounterMetricFamily(f"pdcluster_node_{f}", f"Node counter {f}", labels=["node", "role"])
                     for f in _NODE_COUNTERS}
        transfer = CounterMetricFamily("pdcluster_node_kv_transfer", "KV transfer counters of the node's connector",
                                       labels=["node", "role", "counter"])
        held = GaugeMetricFamily("pdcluster_node_kv_requests_held",
                                 "Finished requests whose KV the node holds for a consumer", labels=["node", "role"])
        hit_rate = GaugeMetricFamily("pdcluster_node_prefix_cache_hit_rate",
                                     "Prompt tokens served from the prefix cache / prompt tokens looked up",
                                     labels=["node", "role"])
        eviction_rate = GaugeMetricFamily("pdcluster_node_kv_evictions_per_second",
                                          "Cached blocks evicted per second, between the last two scrapes",
                                          labels=["node", "role"])
        policy = GaugeMetricFamily("pdcluster_node_eviction_policy", "The node's KV eviction policy (value 1)",
                                   labels=["node", "role", "policy"])
        for n in self.nodes:
            healthy.add_metric([n.id, n.role], 1.0 if n.healthy else 0.0)
            if not n.stats_current:
                continue
            e = n.last_stats.engine
            for f, fam in families.items():
                fam.add_metric([n.id, n.role], float(getattr(e, f)))
            for k, v in e.kv_transfer.items():
                if k not in _KV_TRANSFER_GAUGES:
                    transfer.add_metric([n.id, n.role, k], float(v))
            if "requests_held" in e.kv_transfer:
                held.add_metric([n.id, n.role], float(e.kv_transfer["requests_held"]))
            hit_rate.add_metric([n.id, n.role], e.prefix_cache_hit_tokens / max(e.prefix_cache_query_tokens, 1))
            eviction_rate.add_metric([n.id, n.role], self._eviction_rate(n.id, e.kv_evictions))
            if e.eviction_policy:
                policy.add_metric([n.id, n.role, e.eviction_policy], 1.0)
        yield healthy
        yield from families.values()
        yield from (transfer, held, hit_rate, eviction_rate, policy)

    def _eviction_rate(self, node: str, count: int) -> float:
        now = time.monotonic()
        last = self._evictions.get(node)
        if last is None or count < last[1]:  # first scrape, or the node restarted
            self._evictions[node] = (now, count, 0.0)
            return 0.0
        t, c, rate = last
        if now - t >= 1.0:
            rate = (count - c) / (now - t)
            self._evictions[node] = (now, count, rate)
        return rate


class _WorkflowCollector:
    def __init__(self, stats: WorkflowKVStats):
        self.stats = stats

    def collect(self):
        routed = CounterMetricFamily("pdcluster_workflow_prefix_requests",
                                     "Requests of a workflow routed while some node held a prefix of theirs",
                                     labels=["workflow"])
        landed = CounterMetricFamily("pdcluster_workflow_prefix_landed",
                                     "Of those, requests sent to a node holding the longest such prefix",
                                     labels=["workflow"])
        affinity = GaugeMetricFamily("pdcluster_workflow_affinity", "prefix_landed / prefix_requests",
                                     labels=["workflow"])
        for wf, c in list(self.stats.workflows.items()):
            routed.add_metric([wf], c.routed_with_prefix)
            landed.add_metric([wf], c.landed_on_prefix)
            affinity.add_metric([wf], c.landed_on_prefix / max(c.routed_with_prefix, 1))
        prompt = CounterMetricFamily("pdcluster_agent_prompt_tokens", "Prompt tokens of an agent's requests",
                                     labels=["agent"])
        cached = CounterMetricFamily("pdcluster_agent_cached_tokens",
                                     "Of those, tokens served from the prefix cache", labels=["agent"])
        reuse = GaugeMetricFamily("pdcluster_agent_reuse", "cached_tokens / prompt_tokens", labels=["agent"])
        for agent, c in list(self.stats.agents.items()):
            prompt.add_metric([agent], c.prompt_tokens)
            cached.add_metric([agent], c.cached_tokens)
            reuse.add_metric([agent], c.cached_tokens / max(c.prompt_tokens, 1))
        yield from (routed, landed, affinity, prompt, cached, reuse)
