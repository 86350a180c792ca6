"""The orchestrator (router/orchestrator.py) against real serving nodes: NodeServers of
builtin:tiny on threads of this process, reached through the router's own NodeClients."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator

import pytest
import zmq.asyncio

from engine import SamplingParams
from engine.config import CacheConfig, EngineConfig, KVEventsConfig
from decode_node.service import DecodeNodeServer
from engine.node_server import NodeServer
from kv_connector.config import KVTransferConfig
from prefill_node.service import PrefillNodeServer
from router.disaggregation import DisaggregationRule
from router.node_client import NodeClient
from router.orchestrator import ForkGroup, Orchestrator
from router.policy import RoutingPolicy
from router.spec import NodeAddress


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving(*nodes: tuple[type[NodeServer], str, str, str | None]):
    """(server class, node id, role, kv_role) each: nodes serving on threads until the
    module's tests are done."""
    servers, loops = [], []
    try:
        for cls, node_id, role, kv_role in nodes:
            kv = KVTransferConfig(kv_connector="tcp", kv_role=kv_role) if kv_role else None
            config = EngineConfig(model="builtin:tiny", dtype="float32", device="cpu",
                                  cache=CacheConfig(num_blocks=128), kv_events=KVEventsConfig(enable=False),
                                  kv_transfer=kv)
            servers.append(cls(node_id, role, config, "127.0.0.1", _free_port()))
            loops.append(threading.Thread(target=servers[-1].serve_forever, kwargs={"handle_signals": False},
                                          daemon=True))
            loops[-1].start()
        yield servers
    finally:
        for s in servers:
            s.request_stop()
        for t in loops:
            t.join(30)


@pytest.fixture(scope="module")
def both_nodes():
    yield from _serving((NodeServer, "both-0", "both", None), (NodeServer, "both-1", "both", None))


@pytest.fixture(scope="module")
def split_nodes():
    yield from _serving((PrefillNodeServer, "prefill-0", "prefill", "kv_producer"),
                        (DecodeNodeServer, "decode-0", "decode", "kv_consumer"))


@contextlib.asynccontextmanager
async def connected(servers) -> AsyncIterator[list[NodeClient]]:
    """The router's clients of `servers`, healthy; closed (and their context) at the end."""
    ctx = zmq.asyncio.Context()
    nodes = [NodeClient(NodeAddress(s.node_id, s.role, s.address), ctx) for s in servers]
    try:
        for n in nodes:
            n.connect()
        deadline = time.monotonic() + 30
        while not all(n.healthy for n in nodes):
            assert time.monotonic() < deadline, "the nodes did not answer"
            await asyncio.gather(*(n.check_health() for n in nodes))
        yield nodes
    finally:
        for n in nodes:
            await n.close()
        ctx.term()


async def _drain(stream) -> list[int]:
    tokens = []
    async for d in stream:
        assert d.error is None, d.error
        tokens += d.token_ids
        if d.finished:
            return tokens
    raise AssertionError("the stream ended without a finished delta")


def test_n_choices_leave_the_next_request_its_turn(both_nodes):
    """Round robin over two nodes with n=2 requests: the forks follow choice 0 and take
    no turn of their own, so consecutive requests still alternate between the nodes."""
    async def main():
        async with connected(both_nodes) as nodes:
            placed: list[str] = []
            orch = Orchestrator(nodes, RoutingPolicy("round_robin", 16), disaggregation=DisaggregationRule(),
                                on_prefill_decision=lambda plan: placed.append(plan.decode.id))
            params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
            for r in range(4):
                group = ForkGroup(f"req{r}")
                choices = [orch.generate(f"req{r}" if i == 0 else f"req{r}-{i}", [5, 6, 7, 8 + r], params,
                                         fork=group) for i in range(2)]
                outs = await asyncio.wait_for(asyncio.gather(*map(_drain, choices)), 60)
                assert all(len(t) == 2 for t in outs)
            assert placed == ["both-0", "both-1", "both-0", "both-1"], placed
            assert all(n.in_flight == 0 for n in nodes)

    asyncio.run(main())


def test_a_client_gone_as_its_prefill_answers_leaves_no_kv_lent(split_nodes):
    """The prefill's answer (its KV lent) is already in the request's queue when the
    client's task is cancelled: nobody will read it, so the lent KV is released at once,
    not held until abort_timeout_s."""
    prefill_server = split_nodes[0]

    async def main():
        async with connected(split_nodes) as nodes:
            prefill = nodes[0]
            orch = Orchestrator(nodes, RoutingPolicy("round_robin", 16), dispatch_to_both=False)
            params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
            task = asyncio.create_task(_drain(orch.generate("gone", list(range(5, 70)), params)))
            deadline = time.monotonic() + 60
            while "gone-p" not in prefill._queues:  # submitted
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0)
            while "gone-p" in prefill._queues:  # its answer is on the way to the task's queue
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0)
            task.cancel()  # the client hangs up before the task reads it
            with pytest.raises(asyncio.CancelledError):
                await task
            held = lambda: prefill_server.engine.connector.stats()["requests_held"]  # noqa: E731
            while held() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert held() == 0, "the lent KV is held for a consumer that will never come"
            assert nodes[1].aborts_sent == 0, "the task read the answer first: the race was not hit"
            assert all(n.in_flight == 0 for n in nodes)

    asyncio.run(main())
